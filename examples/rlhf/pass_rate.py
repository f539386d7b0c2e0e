"""ORM pass rate of a `megaswift sample` output written without a reward model (every sample kept).

Each line is one sampled completion (the last assistant turn) with its prompt's `solution`; the
math ORM (`megaswift.rewards.get_orm('math')`, the same one `megaswift sample --orm_model math`
uses) scores it 1.0 or 0.0. Prints and returns: samples, passing samples, pass rate, prompts, and
prompts with at least one passing sample; `--json` writes them to a file.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from megaswift.rewards import get_orm


def pass_rate(path: str) -> dict:
    rows = [json.loads(line) for line in open(path)]
    completions = [r['messages'][-1]['content'] for r in rows]
    scores = get_orm('math')(completions, solution=[r['solution'] for r in rows])
    per_prompt = defaultdict(list)
    for r, s in zip(rows, scores):
        per_prompt[r['id']].append(s > 0)
    passed = sum(s > 0 for s in scores)
    return {'file': path, 'samples': len(rows), 'passed': passed, 'pass_rate': passed / max(len(rows), 1),
            'prompts': len(per_prompt), 'prompts_solved': sum(any(v) for v in per_prompt.values()),
            'samples_per_prompt': sorted({len(v) for v in per_prompt.values()})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('samples', help='jsonl written by megaswift sample without --orm_model')
    p.add_argument('--json', help='also write the numbers here')
    args = p.parse_args()
    r = pass_rate(args.samples)
    print(f"{r['file']}: {r['passed']}/{r['samples']} samples pass the math ORM ({100 * r['pass_rate']:.1f}%); "
          f"{r['prompts_solved']}/{r['prompts']} prompts solved at least once")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(r, f, indent=2)


if __name__ == '__main__':
    main()
