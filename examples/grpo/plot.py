"""Reward curves of the GRPO example: the mean math-ORM reward of each step's 32 completions (and its 6-step moving
average), per run, from the runs' logging.jsonl; the held-out pass rates before and after, from eval.sh's JSON.

    python examples/grpo/plot.py examples/grpo/output examples/grpo/reward_curve.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

RUNS = (('colocate', 'colocate (transformers engine in the trainer)', 4.0),
        ('server', 'server (megaswift rollout, weights pushed every step)', 1.5))  # wide under narrow: both show


def main(out_dir: str, png: str) -> None:
    out = Path(out_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, label, width in RUNS:
        log = out / name / 'logging.jsonl'
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [r['step'] for r in rows if 'reward' in r]
        rewards = [r['reward'] for r in rows if 'reward' in r]
        smooth = [sum(rewards[max(0, i - 5):i + 1]) / len(rewards[max(0, i - 5):i + 1]) for i in range(len(rewards))]
        line, = ax.plot(steps, rewards, alpha=0.35, marker='.')
        after = out / f'after_{name}.json'
        held = f'; held-out {json.loads(after.read_text())["pass_rate"]:.1%}' if after.exists() else ''
        ax.plot(steps, smooth, color=line.get_color(), linewidth=width, label=f'{label}{held}')
    before = out / 'before.json'
    if before.exists():
        ax.axhline(json.loads(before.read_text())['pass_rate'], color='gray', linestyle='--',
                   label=f"base model, held-out {json.loads(before.read_text())['pass_rate']:.1%}")
    ax.set_xlabel('step')
    ax.set_ylabel('mean reward of the step\'s completions')
    ax.set_title('GRPO on SmolLM2-135M-Instruct, math ORM, CPU (faint: per step; solid: 6-step mean)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f'wrote {png}')


if __name__ == '__main__':
    main(*sys.argv[1:3])
