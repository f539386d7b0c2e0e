"""Answer extraction/equivalence and the ``math`` / ``accuracy`` ORMs on real cases."""
from __future__ import annotations

import threading

import pytest

from megaswift.rewards import get_orm
from megaswift.rewards.math_answer import (answers_equal, extract_answer, extract_gold_answer, last_boxed,
                                           normalize_answer, sympy_equal)

WORKED = ('Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n'
          'So the answer is $\\boxed{72}$.')


def test_last_boxed_balanced_braces_and_fbox():
    assert last_boxed('a \\boxed{1} then \\boxed{\\frac{1}{2}}') == '\\frac{1}{2}'
    assert last_boxed('\\fbox{x^{2}}') == 'x^{2}'
    assert last_boxed('\\boxed 7') == '7'
    assert last_boxed('\\boxed{unclosed') is None
    assert last_boxed('no box') is None


@pytest.mark.parametrize('text, expected', [
    ('so $\\boxed{5}$.', '5'),
    ('<think>2+3</think><answer>5</answer>', '5'),
    ('<answer>The answer is 12</answer>', '12'),
    ('The answer is 42.', '42'),
    ('Total: 1,234 apples', '1,234'),
    ('#### 18', '18'),
    ('no digits at all', None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_gold_answer_worked_vs_bare():
    assert extract_gold_answer(WORKED) == '72'
    assert extract_gold_answer('Janet has 3 ducks and then 5 more, so 8 ducks\n#### 8') == '8'
    assert extract_gold_answer('\\frac{1}{2}') == '\\frac{1}{2}'
    assert extract_gold_answer('We add them and get 9 in total') == '9'
    assert extract_gold_answer(None) is None


@pytest.mark.parametrize('a, b', [
    ('\\frac{1}{2}', '0.5'), ('\\dfrac12', '1/2'), ('1,000', '1000'), ('50\\%', '0.5'), ('$5$.', '5'),
    ('\\text{(B)}', '(B)'), ('\\left( 1, 2 \\right)', '(1,2)'), ('x = 3', '3'), ('2\\sqrt{2}', '\\sqrt{8}'),
    ('x^2+2x+1', '(x+1)^2'), ('90^\\circ', '90'), ('3.0000001', '3'),
])
def test_answers_equal(a, b):
    assert answers_equal(a, b)
    assert answers_equal(b, a)


@pytest.mark.parametrize('a, b', [('5', '6'), ('(1,2)', '(2,1)'), ('x+1', 'x-1'), ('', '5'), (None, '5'),
                                  ('3.01', '3')])
def test_answers_not_equal(a, b):
    assert not answers_equal(a, b)


def test_sympy_guard_rejects_huge_or_unsafe_inputs():
    assert not sympy_equal('9^9^9', '1')
    assert not sympy_equal('2^(99*99*99)', '1')
    assert not sympy_equal('__import__(os)', '1')
    assert normalize_answer('\\$12.') == '12'


@pytest.mark.parametrize('name', ['math', 'accuracy'])
def test_math_and_accuracy_real_cases(name):
    orm = get_orm(name)
    completions = ['The sum is \\boxed{5}.', 'So x = \\boxed{\\frac{1}{2}}', 'The answer is 42.',
                   'She sold \\boxed{72} clips.', 'It is \\boxed{7}.', 'The answer is 41.', '\\boxed{5}',
                   '<think>half</think><answer>0.5</answer>']
    solutions = ['5', '0.5', '42', WORKED, '5', '42', None, '\\frac{1}{2}']
    assert orm(completions, solution=solutions, messages=[None] * 8, extra=[0] * 8) == \
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_accuracy_without_solution_column_and_in_a_thread():
    orm = get_orm('accuracy')
    assert orm(['\\boxed{5}']) == [0.0]
    out = []
    t = threading.Thread(target=lambda: out.append(orm(['\\boxed{5}'], solution=['5'])))
    t.start()
    t.join(30)
    assert out == [[1.0]]


def test_accuracy_falls_back_to_math_when_gold_unparsable():
    orm = get_orm('accuracy')
    assert orm.parse('(B)', extraction_mode='first_match') == []
    assert orm(['The choice is \\boxed{(B)}', '\\boxed{(C)}'], solution=['(B)', '(B)']) == [1.0, 0.0]
