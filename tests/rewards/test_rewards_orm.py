"""format / react_format / cosine / repetition / soft_overlong ORMs."""
from __future__ import annotations

import math

import pytest

from megaswift.rewards import ORM, get_orm, orms


def test_every_builtin_orm_is_instantiable_and_accepts_unknown_columns():
    for name, cls in orms.items():
        orm = cls()
        assert isinstance(orm, ORM)
        out = orm(['<think>a</think><answer>1</answer>'], solution=['1'], messages=[[]], response_token_ids=[None],
                  some_other_column=['x'])
        assert len(out) == 1 and isinstance(out[0], float), name


def test_misaligned_column_is_an_error():
    with pytest.raises(ValueError, match="'solution' has 1 entries but there are 2"):
        get_orm('math')(['1', '2'], solution=['1'])


def test_format():
    orm = get_orm('format')
    good = ['<think>reason</think><answer>4</answer>', '<think>multi\nline</think>\n\n<answer>x\ny</answer>']
    bad = ['<answer>4</answer>', '<think>r</think>4', '<think>r</think><answer>4</answer> trailing',
           'pre <think>r</think><answer>4</answer>', '']
    assert orm(good + bad) == [1.0] * len(good) + [0.0] * len(bad)


def test_react_format():
    orm = get_orm('react_format')
    good = ['<think>need search</think>\nAction: search\nAction Input: {"q": "x"}',
            '<think>t</think>Action: calc Action Input: 1+1']
    bad = ['Action: search\nAction Input: x', '<think>t</think>\nAction Input: x', '<think>t</think> Final answer: 3']
    assert orm(good + bad) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_cosine_monotonic_and_endpoints():
    orm = get_orm('cosine', cosine_max_len=100)
    lengths = [0, 10, 50, 90, 100, 500]
    ids = [list(range(n)) for n in lengths]
    right = orm(['\\boxed{5}'] * len(ids), solution=['5'] * len(ids), response_token_ids=ids)
    wrong = orm(['\\boxed{6}'] * len(ids), solution=['5'] * len(ids), response_token_ids=ids)
    assert right[0] == pytest.approx(1.0) and right[4] == pytest.approx(0.5) and right[5] == pytest.approx(0.5)
    assert wrong[0] == pytest.approx(-0.5) and wrong[4] == pytest.approx(0.0) and wrong[5] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(right[:5], right[1:5]))  # longer correct -> lower
    assert all(a < b for a, b in zip(wrong[:5], wrong[1:5]))  # longer wrong -> higher
    assert min(right) > max(wrong)
    assert right[2] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_cosine_word_count_fallback_and_custom_accuracy():
    orm = get_orm('cosine', cosine_max_len=10, accuracy_orm='math')
    short, long = '\\boxed{5}', ' '.join(['word'] * 9) + ' \\boxed{5}'
    out = orm([short, long], solution=['5', '5'], response_token_ids=[None, None])
    assert out[0] > out[1]


def test_repetition():
    orm = get_orm('repetition')
    assert orm(['a b', 'the cat sat on the mat', 'a b c a b c a b c'])[:2] == [0.0, 0.0]
    assert orm(['a b c a b c a b c'])[0] == pytest.approx(-(1 - 3 / 7))
    assert orm(['x x x x x x'])[0] == pytest.approx(-(1 - 1 / 4))
    half = get_orm('repetition', repetition_n_grams=2, repetition_max_penalty=-0.5)
    assert half(['a b a b'])[0] == pytest.approx(-0.5 * (1 - 2 / 3))
    with pytest.raises(ValueError):
        get_orm('repetition', repetition_max_penalty=1.0)


@pytest.mark.parametrize('length, expected', [(0, 0.0), (768, 0.0), (769, -1 / 256), (896, -0.5), (1024, -1.0),
                                              (5000, -1.0)])
def test_soft_overlong_boundaries(length, expected):
    orm = get_orm('soft_overlong')
    assert orm(['x'], response_token_ids=[list(range(length))])[0] == pytest.approx(expected)


def test_soft_overlong_word_fallback():
    orm = get_orm('soft_overlong', soft_max_length=10, soft_cache_length=4)
    assert orm(['w ' * 6, 'w ' * 8, 'w ' * 10, 'w ' * 11]) == pytest.approx([0.0, -0.5, -1.0, -1.0])
