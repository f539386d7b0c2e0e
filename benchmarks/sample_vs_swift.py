#!/usr/bin/env python3
"""Time the same sampling job with `megaswift sample` and ms-swift's `swift sample`, side by side.

Job: SmolLM2-135M-Instruct (megaswift's embedded model, already converted to an HF directory), 5 prompts from
benchmarks/data/math5.jsonl x 4 samples (num_return_sequences 4) x at most 64 new tokens, transformers engine,
bf16, temperature 0.7, no reward model.  Wall time is the whole CLI process, start to exit (what a user waits
for), measured with time.perf_counter around subprocess.run; best of --repeats per tool, tools alternating.

    python benchmarks/sample_vs_swift.py --setup            # create .venv-swift (ms-swift 4.6.0) if missing
    python benchmarks/sample_vs_swift.py --repeats 2 --only both

Rows are appended to benchmarks/results.csv (date, benchmark, tool, variant, wall_s, samples, samples_per_s, notes).
"""
import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from results_csv import RESULTS_CSV, append_csv  # noqa: E402  (benchmarks/)
MAIN_PY = ROOT / '.venv' / 'bin' / 'python'
SWIFT_VENV = ROOT / '.venv-swift'
DATASET = ROOT / 'benchmarks' / 'data' / 'math5.jsonl'
MODEL_ID = 'HuggingFaceTB/SmolLM2-135M-Instruct'
BENCHMARK = 'sample_smollm2_5x4x64'
VARIANT = 'transformers-bf16'
JOB = ['--num_return_sequences', '4', '--max_new_tokens', '64', '--temperature', '0.7',
       '--torch_dtype', 'bfloat16', '--sampler_engine', 'transformers']
EXPECTED_SAMPLES = 5 * 4
SWIFT_TORCH = '2.13.0'
SWIFT_VERSION = '4.6.0'


def sh(cmd, **kw):
    print('+', ' '.join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def setup_swift():
    """Create .venv-swift with torch 2.13.0 (CPU) and ms-swift 4.6.0, unless it already works."""
    py = SWIFT_VENV / 'bin' / 'python'
    if not (SWIFT_VENV / 'bin' / 'swift').exists():
        sh(['python3.11', '-m', 'venv', SWIFT_VENV])
        sh([py, '-m', 'pip', 'install', '-q', f'torch=={SWIFT_TORCH}'])
        sh([py, '-m', 'pip', 'install', '-q', f'ms-swift=={SWIFT_VERSION}'])
    # swift's GRPO trainer imports msgspec, which ms-swift 4.6.0 does not declare (benchmarks/grpo_step.py)
    sh([py, '-m', 'pip', 'install', '-q', 'msgspec'])
    out = subprocess.run([str(py), '-c', 'import torch, swift, transformers; '
                          'print(torch.__version__, swift.__version__, transformers.__version__)'],
                         capture_output=True, text=True, check=True).stdout.split()
    print(f'.venv-swift: torch {out[0]}, ms-swift {out[1]}, transformers {out[2]}')
    if not out[0].startswith(SWIFT_TORCH):
        sys.exit(f'ms-swift install replaced torch: {out[0]} (expected {SWIFT_TORCH}+cpu)')


def resolve_model():
    """Ask megaswift (main venv) where the converted SmolLM2 HF directory is; both tools get that directory."""
    code = f'from megaswift.model import resolve_model_dir; print(resolve_model_dir({MODEL_ID!r}))'
    out = subprocess.run([str(MAIN_PY), '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


def require_clis(swift: bool, megaswift: bool) -> None:
    """Exit with a hint when a CLI the run needs is missing."""
    if swift and not (SWIFT_VENV / 'bin' / 'swift').exists():
        sys.exit(f'{SWIFT_VENV}/bin/swift not found: run `python benchmarks/sample_vs_swift.py --setup` first')
    if megaswift and megaswift_entry() is None:
        sys.exit('megaswift CLI not found (.venv/bin/megaswift or megaswift/cli/main.py)')


def megaswift_entry():
    """The megaswift CLI: console script if installed, else `python -m megaswift.cli.main`; None if neither."""
    exe = ROOT / '.venv' / 'bin' / 'megaswift'
    if exe.exists():
        return [str(exe)]
    if (ROOT / 'megaswift' / 'cli' / 'main.py').exists():
        return [str(MAIN_PY), '-m', 'megaswift.cli.main']
    return None


def command(tool, model_dir, out_dir):
    common = ['--model', model_dir, '--dataset', str(DATASET), *JOB, '--output_dir', out_dir,
              '--output_file', 'out.jsonl', '--override_exist_file', 'true']
    if tool == 'swift':
        # ms-swift 4.6 workarounds (shared/notes/engines-cpu.md §2.1): `pt` is not a CLI choice, a local Llama dir
        # needs --model_type, and the transformers engine ignores --template unless template_type is in engine_kwargs.
        return [str(SWIFT_VENV / 'bin' / 'swift'), 'sample', *common, '--model_type', 'llama',
                '--template', 'chatml', '--engine_kwargs', json.dumps({'template_type': 'chatml'})]
    return [*megaswift_entry(), 'sample', *common]


def cpu_busy_s():
    """Seconds of CPU time the whole machine has spent busy (all processes, from /proc/stat)."""
    with open('/proc/stat') as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf('SC_CLK_TCK')  # all but idle and iowait


def child_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(limit_s, threshold=1.0):
    """Wait up to limit_s until the 1-min load is < threshold and the CPUs were >= 85 % idle for the last 3 s."""
    t0 = time.monotonic()
    while True:
        b0 = cpu_busy_s()
        time.sleep(3)
        idle = 1 - (cpu_busy_s() - b0) / (3 * os.cpu_count())
        if (os.getloadavg()[0] < threshold and idle >= 0.85) or time.monotonic() - t0 >= limit_s:
            return os.getloadavg()[0], time.monotonic() - t0


def measured_run(name, build_cmd, log_dir, max_wait, collect):
    """Wait for a quiet machine, run ``build_cmd(tmp)`` with its output in ``log_dir/name.log``, and call
    ``collect(tmp)`` while the temporary directory still exists (only when the process succeeded).

    Returns a dict: proc, cmd, log, wall, own (CPU s of the run), other (CPU s of other processes
    meanwhile), load (1-min load at the start), result (what ``collect`` returned, else None).
    """
    load, waited = wait_quiet(max_wait)
    print(f'[{name}] load avg (1/5/15 min) = {"/".join(f"{x:.2f}" for x in os.getloadavg())}'
          f'{f" after waiting {waited:.0f}s" if waited >= 5 else ""}')
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONUNBUFFERED='1')
    with tempfile.TemporaryDirectory(prefix=f'bench_{name}_') as tmp:
        cmd = build_cmd(tmp)
        log = Path(log_dir) / f'{name}.log'
        with open(log, 'w') as fh:
            busy0, own0 = cpu_busy_s(), child_cpu_s()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            wall = time.perf_counter() - t0
            own = child_cpu_s() - own0
            other = max(0.0, cpu_busy_s() - busy0 - own)
        result = collect(tmp) if proc.returncode == 0 else None
    return {'proc': proc, 'cmd': cmd, 'log': log, 'wall': wall, 'own': own, 'other': other, 'load': load,
            'result': result}


def log_tail(log, lines=25):
    return ''.join(Path(log).read_text(errors='replace').splitlines(True)[-lines:])


def run_once(tool, model_dir, keep_log_dir, max_wait):
    """Run one CLI process; return (wall_s, output lines, load at start, CPU s used by other processes meanwhile)."""
    def count_lines(tmp):
        out = Path(tmp) / 'out.jsonl'
        return sum(1 for ln in out.read_text().splitlines() if ln.strip()) if out.exists() else 0

    run = measured_run(tool, lambda tmp: command(tool, model_dir, tmp), keep_log_dir, max_wait, count_lines)
    if run['result'] is None:
        print(f'[{tool}] FAILED rc={run["proc"].returncode}; command:\n  {" ".join(run["cmd"])}\n'
              f'--- log tail ---\n{log_tail(run["log"])}')
        return None
    print(f'[{tool}] wall {run["wall"]:.2f}s, {run["result"]} output lines, own CPU {run["own"]:.1f}s, '
          f'other processes\' CPU {run["other"]:.1f}s')
    return run['wall'], run['result'], run['load'], run['other']


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--setup', action='store_true', help='create .venv-swift (torch 2.13.0 + ms-swift 4.6.0) if missing')
    ap.add_argument('--repeats', type=int, default=2, help='runs per tool; the best wall time is reported')
    ap.add_argument('--only', choices=['swift', 'megaswift', 'both'], default='both')
    ap.add_argument('--max-wait', type=float, default=60.0, help='seconds to wait for a quiet machine before each run')
    ap.add_argument('--csv', default=str(RESULTS_CSV), help='results CSV to append to')
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)

    if args.setup:
        setup_swift()
    tools = ['megaswift', 'swift'] if args.only == 'both' else [args.only]
    require_clis(swift='swift' in tools, megaswift='megaswift' in tools)
    model_dir = resolve_model()
    print(f'model dir: {model_dir}\ndataset:   {DATASET}')
    for t in tools:
        print(f'{t}: {" ".join(command(t, model_dir, "<tmp>"))}')

    runs = {t: [] for t in tools}
    log_dir = tempfile.mkdtemp(prefix='bench_logs_')
    for _ in range(args.repeats):
        for t in tools:  # alternate the tools, so drifting machine load hits both alike
            r = run_once(t, model_dir, log_dir, args.max_wait)
            if r is not None:
                runs[t].append(r)

    date = datetime.datetime.now().isoformat(timespec='seconds')
    rows, best = [], {}
    print(f'\n{"tool":<10} {"best wall s":>11}  {"all runs (s)":<24} {"lines":>5} {"samples/s":>9}')
    for t in tools:
        if not runs[t]:
            print(f'{t:<10} {"FAILED":>11}  (logs in {log_dir})')
            continue
        walls = [r[0] for r in runs[t]]
        wall, lines, _, _ = min(runs[t])
        best[t] = wall
        loads = [r[2] for r in runs[t]]
        # contended: busy machine at start, or other processes took >= 10 % of one core during the run
        contended = [f'{w:.1f}s (load {ld:.2f}, others {o:.0f} CPU-s)' for w, _, ld, o in runs[t]
                     if ld >= 1.0 or o >= 0.1 * w]
        all_lines = sorted({r[1] for r in runs[t]})
        sps = lines / wall
        print(f'{t:<10} {wall:>11.2f}  {", ".join(f"{w:.2f}" for w in walls):<24} {lines:>5} {sps:>9.2f}')
        notes = [f'best of {len(walls)}: ' + '/'.join(f'{w:.2f}' for w in walls),
                 'load1 at start ' + '/'.join(f'{ld:.2f}' for ld in loads),
                 'CPU-s used by other processes ' + '/'.join(f'{r[3]:.0f}' for r in runs[t]),
                 f'CONTENDED runs: {", ".join(contended)}' if contended else 'quiet machine',
                 f'{os.cpu_count()} cores']
        if all_lines != [EXPECTED_SAMPLES]:
            notes.append(f'output lines {all_lines} != {EXPECTED_SAMPLES}')
        rows.append({'date': date, 'benchmark': BENCHMARK, 'tool': t, 'variant': VARIANT, 'wall_s': f'{wall:.2f}',
                     'samples': lines, 'samples_per_s': f'{sps:.3f}', 'notes': '; '.join(notes)})
    if 'megaswift' in best and 'swift' in best:
        ratio = best['megaswift'] / best['swift']
        print(f'ratio megaswift/swift (best wall): {ratio:.3f}  ({"megaswift" if ratio < 1 else "swift"} faster, '
              f'{max(ratio, 1 / ratio):.2f}x)')
        for r in rows:
            if r['tool'] == 'megaswift':
                r['notes'] += f'; ratio megaswift/swift {ratio:.3f}'
    ok = all(len(runs[t]) == args.repeats for t in tools)
    return finish(args.csv, rows, ok, log_dir, 'tool')


def finish(csv_path, rows: list[dict], ok: bool, log_dir, what: str) -> int:
    """Append the CSV rows; keep the per-run logs only when something failed. Returns the exit code."""
    if rows:
        append_csv(csv_path, rows)
    if ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print(f'logs of the last run per {what}: {log_dir}')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
