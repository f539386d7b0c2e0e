"""Write the arithmetic prompts of the RFT example: heldout.jsonl, dev.jsonl and train.jsonl (disjoint).

Single-operation questions SmolLM2-135M-Instruct sometimes answers right: sums and differences of
two-digit numbers and products of a one-digit by a one- or two-digit number. Each row is
{"messages": [{"role": "user", ...}], "solution": "<answer>"}, the format `megaswift sample` reads.
Deterministic (fixed seed); no (a, op, b) question appears in two files, in either operand order.
train.jsonl builds the DPO pairs; heldout.jsonl measures the result; dev.jsonl (same distribution, never
trained on) is where the hyperparameters were chosen, so the held-out set played no part in that choice.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def question(rng: random.Random) -> tuple[str, int, int]:
    op = rng.choice('+-*')
    if op == '+':
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    elif op == '-':
        a, b = rng.randint(20, 99), rng.randint(10, 99)
        a, b = max(a, b), min(a, b)      # non-negative results
    else:
        a, b = rng.randint(2, 9), rng.randint(3, 29)
        if rng.random() < 0.5:
            a, b = b, a
    return op, a, b


def value(op: str, a: int, b: int) -> int:
    return a + b if op == '+' else a - b if op == '-' else a * b


def canonical(op: str, a: int, b: int) -> tuple:
    return (op, a, b) if op == '-' else (op, min(a, b), max(a, b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out_dir', default=str(Path(__file__).parent / 'data'))
    p.add_argument('--num_train', type=int, default=120)
    p.add_argument('--num_heldout', type=int, default=40)
    p.add_argument('--num_dev', type=int, default=40)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    seen, rows = set(), []
    while len(rows) < args.num_train + args.num_heldout + args.num_dev:
        op, a, b = question(rng)
        key = canonical(op, a, b)
        if key in seen or a == b:
            continue
        seen.add(key)
        rows.append({'messages': [{'role': 'user', 'content': f'What is {a} {op} {b}?'}],
                     'solution': str(value(op, a, b))})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # held-out first and dev second, so changing --num_train changes neither
    h, d = args.num_heldout, args.num_heldout + args.num_dev
    splits = {'heldout.jsonl': rows[:h], 'dev.jsonl': rows[h:d], 'train.jsonl': rows[d:]}
    for name, split in splits.items():
        with open(out / name, 'w') as f:
            for row in split:
                f.write(json.dumps(row) + '\n')
        print(f'{out / name}: {len(split)} prompts')


if __name__ == '__main__':
    main()
