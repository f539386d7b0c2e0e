"""examples/rlhf (the RFT loop): the prompt splits are disjoint and deterministic, the committed splits are what
make_prompts.py writes, and pass_rate.py scores with the math ORM per sample and per prompt. (The loop itself,
sampling + DPO on SmolLM2, takes ~15 min on 2 cores: examples/rlhf/run_rft.sh, numbers in its README.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / 'examples' / 'rlhf'


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _question(row: dict) -> tuple:
    a, op, b = row['messages'][0]['content'].removeprefix('What is ').removesuffix('?').split()
    return (op, a, b) if op == '-' else (op, *sorted((a, b)))


def test_prompt_splits_are_disjoint_and_reproducible(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLE / 'make_prompts.py'), '--out_dir', str(tmp_path)], check=True,
                   capture_output=True)
    splits = {name: _rows(tmp_path / f'{name}.jsonl') for name in ('train', 'dev', 'heldout')}
    assert [len(splits[n]) for n in ('train', 'dev', 'heldout')] == [120, 40, 40]
    keys = {n: {_question(r) for r in rows} for n, rows in splits.items()}
    assert sum(map(len, keys.values())) == 200  # no question twice, in any split or operand order
    for name, rows in splits.items():
        for row in rows:
            a, op, b = row['messages'][0]['content'].removeprefix('What is ').removesuffix('?').split()
            assert int(row['solution']) == eval(f'{a} {op} {b}')  # noqa: S307 - our own digits
        assert (EXAMPLE / 'data' / f'{name}.jsonl').read_text() == (tmp_path / f'{name}.jsonl').read_text()


def test_pass_rate_scores_each_sample_with_the_math_orm(tmp_path):
    rows = [('p1', '12', 'The answer is 12.'), ('p1', '12', '13'), ('p2', '7', 'It is \\boxed{7}'),
            ('p3', '5', 'no idea')]
    path = tmp_path / 'samples.jsonl'
    path.write_text(''.join(json.dumps({'id': i, 'solution': s, 'messages': [
        {'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': c}]}) + '\n' for i, s, c in rows))
    out = subprocess.run([sys.executable, str(EXAMPLE / 'pass_rate.py'), str(path), '--json',
                          str(tmp_path / 'r.json')], check=True, capture_output=True, text=True)
    result = json.loads((tmp_path / 'r.json').read_text())
    assert (result['samples'], result['passed'], result['prompts'], result['prompts_solved']) == (4, 2, 3, 2)
    assert '2/4 samples pass' in out.stdout
