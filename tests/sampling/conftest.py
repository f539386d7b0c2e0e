import json

import pytest



@pytest.fixture
def math_rows():
    qs = [('2 + 3', '5'), ('7 * 6', '42'), ('10 - 4', '6'), ('9 + 8', '17'), ('3 * 4', '12'), ('1 + 1', '2'),
          ('6 * 5', '30')]
    return [{'messages': [{'role': 'user', 'content': f'What is {q}?'},
                          {'role': 'assistant', 'content': f'The answer is \\boxed{{{a}}}.'}], 'solution': a}
            for q, a in qs]


@pytest.fixture
def math_file(tmp_path, math_rows):
    path = tmp_path / 'math.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in math_rows))
    return str(path)
