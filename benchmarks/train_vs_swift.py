#!/usr/bin/env python3
"""Time the same full fine-tuning job with `megaswift sft` and ms-swift's `swift sft` (HF trainer), side by side.

Job: SmolLM2-135M-Instruct (megaswift's embedded model as an HF directory, the same one for both tools), the 64 chats
of benchmarks/data/sft64.jsonl (the first 64 rows of examples/data/chat_mix.jsonl that are <= 500 tokens with the
chat template, so nothing is truncated or dropped at max_length 512), full fine-tuning, bf16, max_length 512,
--steps optimizer steps (default 8) of 8 rows each, lr 1e-5, no eval, no checkpoint.  Variants:

  megaswift  packed:   --micro_batch_size 1 --global_batch_size 8 --packing true   (8 packed rows of <= 512 per step)
  swift      unpacked: --per_device_train_batch_size 1 --gradient_accumulation_steps 8   (8 samples per step)
  swift      packed:   the same plus --packing true   (8 packed rows per step)

tokens/s = real (non-padding) tokens trained / training time.  Training time is the tool's own figure (megaswift:
last `elapsed_s` in logging.jsonl; swift: `train_runtime`); the whole-process wall time (start to exit) is reported
too.  Real tokens: megaswift logs `packing_efficiency` = real / (rows * max_length) per step (logging_steps 1);
swift logs `num_input_tokens_seen` (--include_num_input_tokens_seen true; batch size 1 or padding-free packing, so
no padding is counted).  Best of --repeats per variant, variants alternating.

    python benchmarks/train_vs_swift.py --repeats 1
    python benchmarks/train_vs_swift.py --only swift --steps 4

Rows are appended to benchmarks/results.csv; samples_per_s holds tokens/s (training time), notes say so.
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
from results_csv import RESULTS_CSV  # noqa: E402
from sample_vs_swift import (MAIN_PY, ROOT, SWIFT_VENV, finish, log_tail, measured_run, require_clis,  # noqa: E402
                             megaswift_entry, resolve_model)

DATASET = ROOT / 'benchmarks' / 'data' / 'sft64.jsonl'
MAX_LENGTH = 512
ROWS_PER_STEP = 8
LR = '1e-5'
VARIANTS = {  # name -> (tool, packing)
    'megaswift-packed': ('megaswift', True),
    'swift-unpacked': ('swift', False),
    'swift-packed': ('swift', True),
}


def dataset_tokens(model_dir):
    """Real tokens of each row of DATASET with the SmolLM2 tokenizer and its chat template (main venv)."""
    code = ('import json, sys\nfrom transformers import AutoTokenizer\n'
            f'tok = AutoTokenizer.from_pretrained({model_dir!r})\n'
            f'rows = [json.loads(l) for l in open({str(DATASET)!r}) if l.strip()]\n'
            'ids = [tok.apply_chat_template(r["messages"], tokenize=True) for r in rows]\n'
            'print(json.dumps([len(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]))')
    out = subprocess.run([str(MAIN_PY), '-c', code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1'))
    return json.loads(out.stdout.strip().splitlines()[-1])


def command(variant, model_dir, out_dir, steps):
    tool, packing = VARIANTS[variant]
    common = ['--model', model_dir, '--dataset', str(DATASET), '--tuner_type', 'full', '--torch_dtype', 'bfloat16',
              '--max_length', str(MAX_LENGTH), '--max_steps', str(steps), '--logging_steps', '1',
              '--output_dir', out_dir]
    if tool == 'megaswift':
        return [*megaswift_entry(), 'sft', *common, '--micro_batch_size', '1',
                '--global_batch_size', str(ROWS_PER_STEP), '--packing', 'true', '--lr', LR,
                '--save_steps', '1000000', '--save_last', 'false']
    # ms-swift 4.6 on CPU (shared/notes/engines-cpu.md §2 and benchmarks/README.md): --model_type/--template for the
    # local Llama dir; bf16 needs --use_cpu true or HF's TrainingArguments raises "Your setup doesn't support bf16/gpu".
    cmd = [str(SWIFT_VENV / 'bin' / 'swift'), 'sft', *common, '--model_type', 'llama', '--template', 'chatml',
           '--use_cpu', 'true', '--per_device_train_batch_size', '1',
           '--gradient_accumulation_steps', str(ROWS_PER_STEP), '--learning_rate', LR,
           '--save_strategy', 'no', '--eval_strategy', 'no', '--split_dataset_ratio', '0',
           '--dataloader_num_workers', '0', '--include_num_input_tokens_seen', 'true', '--report_to', 'none']
    if packing:
        cmd += ['--packing', 'true']
    return cmd


def read_jsonl(path):
    out = []
    for ln in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            pass
    return out


def parse_megaswift(out_dir):
    """(train_s, real tokens, steps) from output_dir/logging.jsonl."""
    logs = [r for r in read_jsonl(Path(out_dir) / 'logging.jsonl') if 'elapsed_s' in r]
    if not logs:
        return None
    tokens = sum(r['packing_efficiency'] * ROWS_PER_STEP * MAX_LENGTH for r in logs)
    return float(logs[-1]['elapsed_s']), int(round(tokens)), int(logs[-1]['step'])


def run_logs(out_dir) -> list[dict]:
    """Every logging.jsonl row under ``out_dir`` (swift writes output_dir/v*-*/logging.jsonl)."""
    logs = []
    for p in sorted(Path(out_dir).rglob('logging.jsonl')):
        logs += read_jsonl(p)
    return logs


def parse_swift(out_dir):
    """(train_s, real tokens, steps) from swift's logging.jsonl (output_dir/v*-*/logging.jsonl)."""
    logs = run_logs(out_dir)
    final = [r for r in logs if 'train_runtime' in r]
    seen = [r['num_input_tokens_seen'] for r in logs if 'num_input_tokens_seen' in r]
    if not final:
        return None
    steps = final[-1].get('global_step/max_steps', '')
    steps = int(str(steps).split('/')[0]) if steps else None
    return float(final[-1]['train_runtime']), int(max(seen)) if seen else None, steps


def run_once(variant, model_dir, steps, log_dir, max_wait):
    tool = VARIANTS[variant][0]
    parse = parse_megaswift if tool == 'megaswift' else parse_swift
    run = measured_run(variant, lambda tmp: command(variant, model_dir, tmp, steps), log_dir, max_wait, parse)
    proc, wall, parsed = run['proc'], run['wall'], run['result']
    if parsed is None:
        tail = log_tail(run['log'])
        print(f'[{variant}] FAILED rc={proc.returncode}; command:\n  {" ".join(run["cmd"])}\n--- log tail ---\n{tail}')
        return {'failed': True, 'rc': proc.returncode, 'wall': wall, 'log': str(run['log']),
                'error': next((ln.strip() for ln in reversed(tail.splitlines())
                               if 'Error' in ln or 'error' in ln), f'rc={proc.returncode}')}
    train_s, tokens, done_steps = parsed
    print(f'[{variant}] wall {wall:.2f}s, train {train_s:.2f}s, {tokens} real tokens, {done_steps} steps, '
          f'own CPU {run["own"]:.1f}s, other processes\' CPU {run["other"]:.1f}s')
    return {'failed': False, 'wall': wall, 'train_s': train_s, 'tokens': tokens, 'steps': done_steps,
            'load': run['load'], 'other': run['other']}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repeats', type=int, default=1, help='runs per variant; the best training time is reported')
    ap.add_argument('--steps', type=int, default=8, help='optimizer steps of 8 rows each')
    ap.add_argument('--only', choices=['megaswift', 'swift', 'both'], default='both')
    ap.add_argument('--no-swift-packing', action='store_true', help='skip the swift --packing true variant')
    ap.add_argument('--max-wait', type=float, default=60.0, help='seconds to wait for a quiet machine before each run')
    ap.add_argument('--csv', default=str(RESULTS_CSV), help='results CSV to append to')
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    variants = [v for v, (t, p) in VARIANTS.items() if args.only in ('both', t)
                and not (t == 'swift' and p and args.no_swift_packing)]
    tools = {VARIANTS[v][0] for v in variants}
    require_clis(swift='swift' in tools, megaswift='megaswift' in tools)
    model_dir = resolve_model()
    lens = dataset_tokens(model_dir)
    print(f'model dir: {model_dir}\ndataset:   {DATASET} ({len(lens)} rows, {sum(lens)} tokens, max {max(lens)})')
    for v in variants:
        print(f'{v}: HF_HUB_OFFLINE=1 {" ".join(command(v, model_dir, "<tmp>", args.steps))}')

    runs = {v: [] for v in variants}
    log_dir = tempfile.mkdtemp(prefix='bench_train_logs_')
    for _ in range(args.repeats):
        for v in variants:  # alternate, so drifting machine load hits all alike
            runs[v].append(run_once(v, model_dir, args.steps, log_dir, args.max_wait))

    date = datetime.datetime.now().isoformat(timespec='seconds')
    benchmark = f'sft_smollm2_full_bf16_L{MAX_LENGTH}_{args.steps}x{ROWS_PER_STEP}'
    rows, best = [], {}
    print(f'\n{"variant":<17} {"train s":>8} {"wall s":>8} {"steps":>5} {"tokens":>7} {"tok/s train":>11} '
          f'{"tok/s wall":>10}')
    for v in variants:
        ok = [r for r in runs[v] if not r['failed']]
        tool = VARIANTS[v][0]
        if not ok:
            err = runs[v][-1]['error']
            print(f'{v:<17} FAILED: {err} (log {runs[v][-1]["log"]})')
            rows.append({'date': date, 'benchmark': benchmark, 'tool': tool, 'variant': v, 'wall_s': '',
                         'samples': '', 'samples_per_s': '', 'notes': f'FAILED: {err}'[:300]})
            continue
        r = min(ok, key=lambda x: x['train_s'])
        tps, tpw = r['tokens'] / r['train_s'], r['tokens'] / r['wall']
        best[v] = tps
        print(f'{v:<17} {r["train_s"]:>8.2f} {r["wall"]:>8.2f} {r["steps"] or "?":>5} {r["tokens"]:>7} {tps:>11.1f} '
              f'{tpw:>10.1f}')
        contended = [f'{x["train_s"]:.1f}s (load {x["load"]:.2f}, others {x["other"]:.0f} CPU-s)' for x in ok
                     if x['load'] >= 1.0 or x['other'] >= 0.1 * x['wall']]
        notes = ['samples=real tokens trained, samples_per_s=tokens/s over the training time '
                 f'({"logging.jsonl elapsed_s" if tool == "megaswift" else "train_runtime"})',
                 f'train_s {r["train_s"]:.2f}', f'tokens/s over process wall {tpw:.1f}', f'steps {r["steps"]}',
                 f'best of {len(ok)}: train ' + '/'.join(f'{x["train_s"]:.2f}' for x in ok)
                 + ' wall ' + '/'.join(f'{x["wall"]:.2f}' for x in ok),
                 'load1 at start ' + '/'.join(f'{x["load"]:.2f}' for x in ok),
                 'CPU-s used by other processes ' + '/'.join(f'{x["other"]:.0f}' for x in ok),
                 f'CONTENDED runs: {", ".join(contended)}' if contended else 'quiet machine',
                 f'{os.cpu_count()} cores']
        rows.append({'date': date, 'benchmark': benchmark, 'tool': tool, 'variant': v, 'wall_s': f'{r["wall"]:.2f}',
                     'samples': r['tokens'], 'samples_per_s': f'{tps:.1f}', 'notes': '; '.join(notes)})
    if 'megaswift-packed' in best:
        for v in [v for v in best if VARIANTS[v][0] == 'swift']:
            ratio = best['megaswift-packed'] / best[v]
            print(f'ratio tokens/s megaswift-packed / {v}: {ratio:.2f}x')
            rows[0]['notes'] += f'; tokens/s ratio vs {v} {ratio:.2f}x'
    ok = all(not r['failed'] for v in variants for r in runs[v])
    return finish(args.csv, rows, ok, log_dir, 'variant')


if __name__ == '__main__':
    sys.exit(main())
