#!/usr/bin/env python3
"""GRPO step time and its split: `megaswift rlhf --rlhf_type grpo` (colocated transformers engine, and a
`megaswift rollout` server) against ms-swift's `swift rlhf --rlhf_type grpo` (TRL's GRPOTrainer, generating with
transformers: no vLLM on CPU), side by side on the same CPU, model and prompts.

Job: SmolLM2-135M-Instruct (the embedded model as an HF directory, the same for every tool), the first --prompts
arithmetic prompts of examples/rlhf/data/train.jsonl, --steps optimizer steps of 4 prompts x 4 completions
(16 completions a step), at most 32 new tokens each, temperature 0.7, beta 0 (no reference model), fp32, full
fine-tuning, lr 1e-6, the `format` reward (both tools have it; its value does not matter for timing).

Step time = the tool's training time / steps (megaswift: the last logged elapsed_s; swift: train_runtime). For
megaswift the split of a step is the mean of its logged time/weight_sync, time/rollout, time/reward, time/logps
and time/train. The server variant starts `megaswift rollout` first (its start-up is not in the step time).

    python benchmarks/grpo_step.py --only megaswift
    python benchmarks/grpo_step.py
"""
import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_vs_swift import (MAIN_PY, ROOT, SWIFT_VENV, finish, log_tail, measured_run, megaswift_entry,  # noqa: E402
                             require_clis, resolve_model)
from results_csv import RESULTS_CSV  # noqa: E402
from train_vs_swift import run_logs  # noqa: E402

PROMPTS = ROOT / 'examples' / 'rlhf' / 'data' / 'train.jsonl'
GENERATIONS, PROMPTS_PER_STEP, MAX_NEW = 4, 4, 32
SPLIT = ('time/weight_sync', 'time/rollout', 'time/reward', 'time/logps', 'time/train')
VARIANTS = {'megaswift-colocate': 'megaswift', 'megaswift-server': 'megaswift', 'swift': 'swift'}


def command(variant, model_dir, data, out_dir, steps, url=None):
    common = ['--model', model_dir, '--dataset', str(data), '--rlhf_type', 'grpo', '--reward_funcs', 'format',
              '--num_generations', str(GENERATIONS), '--max_completion_length', str(MAX_NEW), '--temperature', '0.7',
              '--beta', '0', '--max_steps', str(steps), '--logging_steps', '1', '--output_dir', out_dir]
    if VARIANTS[variant] == 'megaswift':
        extra = ['--vllm_mode', 'server', '--rollout_url', url] if url else []
        return [*megaswift_entry(), 'rlhf', *common, '--global_batch_size', str(GENERATIONS * PROMPTS_PER_STEP),
                '--micro_batch_size', '4', '--max_length', '256', '--lr', '1e-6', '--save_steps', '1000000',
                '--save_last', 'false', *extra]
    return [str(SWIFT_VENV / 'bin' / 'swift'), 'rlhf', *common, '--model_type', 'llama', '--template', 'chatml',
            '--use_vllm', 'false', '--use_cpu', 'true', '--torch_dtype', 'float32',
            '--per_device_train_batch_size', str(GENERATIONS), '--gradient_accumulation_steps', str(PROMPTS_PER_STEP),
            '--learning_rate', '1e-6', '--save_strategy', 'no', '--eval_strategy', 'no', '--split_dataset_ratio', '0',
            '--dataloader_num_workers', '0', '--report_to', 'none']


def parse(tool, out_dir, steps):
    """(train_s, split means or {}) from the tool's logs, or None unless it trained ``steps`` steps."""
    logs = run_logs(out_dir)
    if tool == 'megaswift':
        done = [r for r in logs if 'elapsed_s' in r]
        if not done or done[-1]['step'] != steps:
            return None
        split = {k: sum(r.get(k, 0.0) for r in done) / steps for k in SPLIT}
        return float(done[-1]['elapsed_s']), split
    final = [r for r in logs if 'train_runtime' in r]
    return (float(final[-1]['train_runtime']), {}) if final else None


def start_server(model_dir, log_path):
    proc = subprocess.Popen([*megaswift_entry(), 'rollout', '--model', model_dir, '--port', '0',
                             '--torch_dtype', 'float32'], stdout=subprocess.PIPE,
                            stderr=open(log_path, 'w'), text=True, cwd=ROOT)
    line = proc.stdout.readline()
    if ' at http://' not in line:
        proc.kill()
        sys.exit(f'megaswift rollout did not start:\n{Path(log_path).read_text()[-3000:]}')
    return proc, line.split(' at ')[1].strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--steps', type=int, default=3)
    ap.add_argument('--prompts', type=int, default=16)
    ap.add_argument('--only', choices=['megaswift', 'swift', 'both'], default='both')
    ap.add_argument('--max-wait', type=float, default=60.0)
    ap.add_argument('--csv', default=str(RESULTS_CSV))
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    variants = [v for v, t in VARIANTS.items() if args.only in ('both', t)]
    require_clis(swift='swift' in variants, megaswift=any(VARIANTS[v] == 'megaswift' for v in variants))
    if not PROMPTS.exists():
        subprocess.run([str(MAIN_PY), str(ROOT / 'examples' / 'rlhf' / 'make_prompts.py')], check=True, cwd=ROOT)
    model_dir = resolve_model()
    log_dir = tempfile.mkdtemp(prefix='bench_grpo_logs_')
    data = Path(log_dir) / 'prompts.jsonl'
    data.write_text(''.join(PROMPTS.read_text().splitlines(True)[:args.prompts]))
    print(f'{args.steps} steps of {PROMPTS_PER_STEP} prompts x {GENERATIONS} completions (<= {MAX_NEW} tokens)')
    results = {}
    for v in variants:
        server, url = (start_server(model_dir, Path(log_dir) / 'server.log') if v == 'megaswift-server'
                       else (None, None))
        try:
            run = measured_run(v, lambda tmp, v=v: command(v, model_dir, data, tmp, args.steps, url), log_dir,
                               args.max_wait, lambda tmp, v=v: parse(VARIANTS[v], tmp, args.steps))
        finally:
            if server is not None:
                server.send_signal(signal.SIGKILL)
                server.wait()
        if run['result'] is None:
            print(f'[{v}] FAILED rc={run["proc"].returncode}\n{log_tail(run["log"])}')
            results[v] = None
            continue
        train_s, split = run['result']
        results[v] = {'wall': run['wall'], 'step': train_s / args.steps, 'split': split, 'load': run['load'],
                      'other': run['other']}
        print(f'[{v}] wall {run["wall"]:.1f}s, {train_s / args.steps:.1f} s/step'
              + ''.join(f', {k} {s:.1f}s' for k, s in split.items()))
    date = datetime.datetime.now().isoformat(timespec='seconds')
    benchmark = f'grpo_smollm2_full_fp32_{PROMPTS_PER_STEP}x{GENERATIONS}_new{MAX_NEW}_{args.steps}steps'
    print(f'\n{"variant":<20} {"s/step":>7} ' + ' '.join(f'{k.split("/")[1]:>11}' for k in SPLIT))
    rows = []
    for v in variants:
        r = results[v]
        if r is None:
            print(f'{v:<20} FAILED')
            rows.append({'date': date, 'benchmark': benchmark, 'tool': VARIANTS[v], 'variant': v, 'wall_s': '',
                         'samples': '', 'samples_per_s': '', 'notes': 'FAILED'})
            continue
        print(f'{v:<20} {r["step"]:>7.1f} ' + ' '.join(f'{r["split"].get(k, float("nan")):>11.2f}' for k in SPLIT))
        rows.append({'date': date, 'benchmark': benchmark, 'tool': VARIANTS[v], 'variant': v,
                     'wall_s': f'{r["wall"]:.2f}', 'samples': args.steps * GENERATIONS * PROMPTS_PER_STEP,
                     'samples_per_s': f'{GENERATIONS * PROMPTS_PER_STEP / r["step"]:.3f}',
                     'notes': f'samples = completions trained; step {r["step"]:.2f} s; '
                              + ''.join(f'{k} {s:.2f} s; ' for k, s in r['split'].items())
                              + f'load1 {r["load"]:.2f}; other CPU-s {r["other"]:.0f}; {os.cpu_count()} cores'})
    return finish(args.csv, rows, all(results.values()), log_dir, 'variant')


if __name__ == '__main__':
    sys.exit(main())
