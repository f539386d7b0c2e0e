#!/usr/bin/env python3
"""DPO training speed and peak memory: `megaswift rlhf --rlhf_type dpo` (reference every step, and with
--precompute_ref_log_probs) against ms-swift's `swift rlhf --rlhf_type dpo` (TRL's DPOTrainer), side by side.

Job: SmolLM2-135M-Instruct (the embedded model as an HF directory, the same for both tools), DPO pairs built from
the first --pairs rows (default 32) of benchmarks/data/sft64.jsonl (chosen: the row's answer; rejected: the next
row's answer to this prompt), full fine-tuning, bf16, max_length 512, beta 0.1, sigmoid loss, one epoch (the same
pairs for every variant: --pairs / 8 optimizer steps of 8 pairs), lr 5e-7, no eval, no checkpoint. Variants:

  megaswift             packed pairs (chosen and rejected as two sequences of a padding-free row), the reference
                        model runs every step
  megaswift-precompute  the same with --precompute_ref_log_probs true (the reference runs once before training
                        and is freed: its time is in the wall time, not in the training time)
  swift                 swift rlhf, --per_device_train_batch_size 1 --gradient_accumulation_steps 8 (TRL pads a
                        pair's chosen and rejected sequences to the longer one)

tokens/s = the epoch's real tokens (both sequences of every pair, encoded with megaswift's template: the same
number for every variant, padding never counted) / the tool's training time (megaswift: the last logged
elapsed_s; swift: train_runtime). Peak RSS: the largest resident set of the run's process (GNU time). ms-swift is
run from .venv-swift (`python benchmarks/sample_vs_swift.py --setup`).

    python benchmarks/dpo_vs_swift.py --only megaswift
    python benchmarks/dpo_vs_swift.py --repeats 2
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_vs_swift import (MAIN_PY, ROOT, SWIFT_VENV, finish, log_tail, measured_run, megaswift_entry,  # noqa: E402
                             require_clis, resolve_model)
from results_csv import RESULTS_CSV  # noqa: E402
from train_vs_swift import DATASET, read_jsonl, run_logs  # noqa: E402

MAX_LENGTH = 512
PAIRS_PER_STEP = 8
LR = '5e-7'
VARIANTS = {'megaswift': ('megaswift', []),
            'megaswift-precompute': ('megaswift', ['--precompute_ref_log_probs', 'true']), 'swift': ('swift', [])}


def write_pairs(path: Path, n: int) -> Path:
    """DPO pairs from the first ``n`` SFT chats: the next row's answer is the rejected one."""
    rows = read_jsonl(DATASET)[:n]
    with open(path, 'w') as fh:
        for i, row in enumerate(rows):
            other = rows[(i + 1) % len(rows)]['messages'][-1]['content']
            fh.write(json.dumps({'messages': row['messages'], 'rejected_response': other}) + '\n')
    return path


def real_tokens(model_dir: str, data: Path) -> int:
    """Tokens of both sequences of every pair, as megaswift's template encodes them (no pair is truncated)."""
    code = ('import sys; from megaswift.dataset import load_rows; from megaswift.dataset.encode import encode_rows; '
            'from megaswift.model import load_tokenizer; from megaswift.template import get_template; '
            f't = get_template(load_tokenizer({model_dir!r}), max_length={MAX_LENGTH}); t.set_mode("rlhf"); '
            f'd = load_rows([{str(data)!r}], 42, chat=True); e = encode_rows(t, d.rows, d.sources); '
            'assert e.num_skipped == 0; print(int(e.lengths.sum()))')
    out = subprocess.run([str(MAIN_PY), '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def command(variant, model_dir, data, out_dir):
    tool, extra = VARIANTS[variant]
    common = ['--model', model_dir, '--dataset', str(data), '--rlhf_type', 'dpo', '--beta', '0.1',
              '--torch_dtype', 'bfloat16', '--max_length', str(MAX_LENGTH), '--num_train_epochs', '1',
              '--logging_steps', '1', '--output_dir', out_dir]
    if tool == 'megaswift':
        return [*megaswift_entry(), 'rlhf', *common, '--loss_type', 'sigmoid', '--micro_batch_size', '1',
                '--global_batch_size', str(PAIRS_PER_STEP), '--padding_free', 'true', '--lr', LR, '--bf16', 'true',
                '--save_steps', '1000000', '--save_last', 'false', *extra]
    return [str(SWIFT_VENV / 'bin' / 'swift'), 'rlhf', *common, '--model_type', 'llama', '--template', 'chatml',
            '--loss_type', 'sigmoid', '--use_cpu', 'true', '--per_device_train_batch_size', '1',
            '--gradient_accumulation_steps', str(PAIRS_PER_STEP), '--learning_rate', LR, '--save_strategy', 'no',
            '--eval_strategy', 'no', '--split_dataset_ratio', '0', '--dataloader_num_workers', '0',
            '--include_num_input_tokens_seen', 'true', '--report_to', 'none']


def parse(tool, out_dir, steps):
    """(train_s, optimizer steps) from the tool's logging.jsonl, or None unless it trained ``steps`` steps."""
    logs = run_logs(out_dir)
    if tool == 'megaswift':
        done = [r for r in logs if 'elapsed_s' in r]
        return (float(done[-1]['elapsed_s']), int(done[-1]['step'])) if done and done[-1]['step'] == steps else None
    final = [r for r in logs if 'train_runtime' in r]
    step = max((int(r.get('global_step/max_steps', '0/0').split('/')[0]) for r in logs
                if 'global_step/max_steps' in r), default=None)
    return (float(final[-1]['train_runtime']), step) if final and step in (None, steps) else None


TIME = ['/usr/bin/time', '-f', 'MAXRSS_KB %M']


def peak_rss_mb(log) -> float:
    lines = [ln for ln in Path(log).read_text(errors='replace').splitlines() if ln.startswith('MAXRSS_KB ')]
    return int(lines[-1].split()[1]) / 1024 if lines else float('nan')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repeats', type=int, default=1)
    ap.add_argument('--pairs', type=int, default=32, help='pairs trained (one epoch; a multiple of 8)')
    ap.add_argument('--only', choices=['megaswift', 'swift', 'both'], default='both')
    ap.add_argument('--max-wait', type=float, default=60.0)
    ap.add_argument('--csv', default=str(RESULTS_CSV))
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    variants = [v for v, (t, _) in VARIANTS.items() if args.only in ('both', t)]
    require_clis(swift='swift' in variants, megaswift=any(v.startswith('megaswift') for v in variants))
    model_dir = resolve_model()
    log_dir = tempfile.mkdtemp(prefix='bench_dpo_logs_')
    data = write_pairs(Path(log_dir) / 'pairs.jsonl', args.pairs)
    tokens, steps = real_tokens(model_dir, data), args.pairs // PAIRS_PER_STEP
    print(f'{args.pairs} pairs, {tokens} real tokens (chosen + rejected), {steps} steps of {PAIRS_PER_STEP} pairs')
    results = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            # GNU time reports the peak resident set of this run's process (its last log line)
            run = measured_run(v, lambda tmp, v=v: [*TIME, *command(v, model_dir, data, tmp)],
                               log_dir, args.max_wait, lambda tmp, v=v: parse(VARIANTS[v][0], tmp, steps))
            if run['result'] is None:
                print(f'[{v}] FAILED rc={run["proc"].returncode}\n{log_tail(run["log"])}')
                results[v].append(None)
                continue
            train_s, tps = run['result'][0], tokens / run['result'][0]
            rss = peak_rss_mb(run['log'])
            results[v].append({'wall': run['wall'], 'train_s': train_s, 'tps': tps, 'load': run['load'],
                               'other': run['other'], 'rss': rss})
            print(f'[{v}] wall {run["wall"]:.1f}s, train {train_s:.1f}s, {tps:.1f} tokens/s, peak RSS {rss:.0f} MB')
    date = datetime.datetime.now().isoformat(timespec='seconds')
    benchmark = f'dpo_smollm2_full_bf16_L{MAX_LENGTH}_{steps}x{PAIRS_PER_STEP}_epoch'
    rows = []
    print(f'\n{"variant":<22} {"train s":>8} {"wall s":>8} {"tok/s":>8} {"peak RSS MB":>11}')
    for v in variants:
        ok = [r for r in results[v] if r]
        if not ok:
            rows.append({'date': date, 'benchmark': benchmark, 'tool': VARIANTS[v][0], 'variant': v, 'wall_s': '',
                         'samples': '', 'samples_per_s': '', 'notes': 'FAILED'})
            print(f'{v:<22} FAILED')
            continue
        r = max(ok, key=lambda x: x['tps'])
        print(f'{v:<22} {r["train_s"]:>8.1f} {r["wall"]:>8.1f} {r["tps"]:>8.1f} {r["rss"]:>11.0f}')
        rows.append({'date': date, 'benchmark': benchmark, 'tool': VARIANTS[v][0], 'variant': v,
                     'wall_s': f'{r["wall"]:.2f}', 'samples_per_s': f'{r["tps"]:.1f}',
                     'samples': tokens,
                     'notes': f'samples = real tokens of the epoch, samples_per_s = them over the training time; '
                              f'peak RSS {r["rss"]:.0f} MB; '
                              f'train_s {r["train_s"]:.2f}; '
                              f'load1 {r["load"]:.2f}; other CPU-s {r["other"]:.0f}; {os.cpu_count()} cores'})
    return finish(args.csv, rows, all(all(results[v]) for v in variants), log_dir, 'variant')


if __name__ == '__main__':
    sys.exit(main())
