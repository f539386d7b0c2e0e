#!/usr/bin/env python3
"""Checkpoint conversion cost: ``megaswift export --to_mcore`` and ``--to_hf``, time and peak memory.

    python benchmarks/convert.py                    # tiny llama + SmolLM2-135M (fp32), TP1; appends to results.csv
    python benchmarks/convert.py --tp2              # also HF -> mcore in 2 processes (TP2, or PP2 if heads forbid)
    python benchmarks/convert.py --only tiny --no-csv

Each conversion is one CLI process, timed from start to exit (imports included, as a user waits for it); the
conversion's own time is the one the CLI prints. Peak RSS is ``ru_maxrss`` from ``os.wait4`` of that process (for
a torchrun launch: the largest of the launcher and its workers). Both are set against the checkpoint's size on disk
(the HF safetensors for --to_mcore, the mcore checkpoint for --to_hf), and the mcore -> HF output is checked to be
bit-identical to the source weights.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))
from results_csv import RESULTS_CSV, append_csv  # noqa: E402  (benchmarks/)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
MODEL_ID = 'HuggingFaceTB/SmolLM2-135M-Instruct'


def dir_bytes(path: Path, pattern: str = '**/*') -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def cpu_busy_s() -> float:
    with open('/proc/stat') as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf('SC_CLK_TCK')


def run_cli(args, env_extra=None):
    """(wall_s, peak_rss_bytes, own_cpu_s, other_cpu_s, stdout+stderr) of one ``megaswift`` CLI process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1', **(env_extra or {}))
    with tempfile.TemporaryFile('w+') as log:
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        rc, rss, own = measured([sys.executable, '-m', 'megaswift.cli.main', *map(str, args)], env, log)
        wall = time.perf_counter() - t0
        other = max(0.0, cpu_busy_s() - busy0 - own)
        log.seek(0)
        out = log.read()
    if rc != 0:
        raise SystemExit(f'megaswift {" ".join(map(str, args))} failed ({rc}):\n{out[-4000:]}')
    return wall, rss, own, other, out


# Linux counts the RSS a child had *before* exec (a forked copy of its parent) in its ru_maxrss, so a fat
# benchmark process would inflate every number. A small wrapper process starts and measures the command.
_WRAPPER = ('import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, st, ru = os.wait4(p.pid, 0); '
            'print(json.dumps([os.waitstatus_to_exitcode(st), ru.ru_maxrss * 1024, ru.ru_utime + ru.ru_stime]), '
            'file=sys.__stderr__)')


def measured(cmd, env, log):
    """(exit code, peak RSS bytes, CPU s) of ``cmd`` (and its waited-for children), output to ``log``."""
    proc = subprocess.run([sys.executable, '-S', '-c', _WRAPPER, *cmd], stdout=log, stderr=subprocess.PIPE,
                          env=env, cwd=ROOT, text=True)
    lines = proc.stderr.strip().splitlines()
    log.write('\n'.join(lines[:-1]))
    rc, rss, cpu = json.loads(lines[-1])
    return rc, rss, cpu


def import_baseline():
    """(wall_s, peak RSS) of a process that only imports what a conversion imports."""
    code = ('import megaswift.cli.main, megaswift.export.convert, megaswift.megatron.build, '
            'megaswift.megatron.convert, megaswift.megatron.checkpoint, transformers; '
            'from transformers import AutoModelForCausalLM')
    t0 = time.perf_counter()
    with tempfile.TemporaryFile('w+') as log:
        _, rss, _ = measured([sys.executable, '-W', 'ignore', '-c', code], dict(os.environ, PYTHONPATH=str(ROOT)), log)
    return time.perf_counter() - t0, rss


def convert_pair(name: str, model_dir: str, work: Path, tp2: bool):
    rows = []
    src_bytes = dir_bytes(Path(model_dir), '*.safetensors')
    variants = [('hf_to_mcore-tp1', {}, ['--tensor_model_parallel_size', '1'])]
    if tp2:  # TP2 when the heads allow it (SmolLM2 has 9 heads / 3 KV heads: PP2 instead)
        cfg = json.loads((Path(model_dir) / 'config.json').read_text())
        heads = (cfg['num_attention_heads'], cfg.get('num_key_value_heads') or cfg['num_attention_heads'])
        flag = 'tensor' if all(h % 2 == 0 for h in heads) else 'pipeline'
        variants.append((f'hf_to_mcore-{flag[0]}p2-nproc2', {'NPROC_PER_NODE': '2'},
                         [f'--{flag}_model_parallel_size', '2']))
    for variant, env, extra in variants:
        mcore = work / f'{name}-{variant}'
        wall, rss, own, other, out = run_cli(['export', '--model', model_dir, '--to_mcore', 'true',
                                              '--output_dir', mcore, *extra], env)
        rows.append(_row(name, variant, wall, rss, own, other, out, src_bytes, dir_bytes(mcore / 'release')))
    mcore = work / f'{name}-hf_to_mcore-tp1'
    hf_out = work / f'{name}-hf'
    wall, rss, own, other, out = run_cli(['export', '--mcore_model', mcore, '--to_hf', 'true', '--output_dir', hf_out])
    rows.append(_row(name, 'mcore_to_hf-tp1', wall, rss, own, other, out, dir_bytes(mcore / 'release'),
                     dir_bytes(hf_out, '*.safetensors')))
    rows[-1]['identical'] = _identical(model_dir, hf_out)
    return rows


def _row(name, variant, wall, rss, own, other, out, in_bytes, out_bytes):
    m = re.search(r'\[megaswift export\] .*?\((\d+\.\d+) s', out)
    return {'model': name, 'variant': variant, 'wall_s': wall, 'convert_s': float(m.group(1)) if m else float('nan'),
            'peak_rss': rss, 'in_bytes': in_bytes, 'out_bytes': out_bytes, 'own_cpu': own, 'other_cpu': other}


def _identical(src: str, dst: Path) -> bool:
    import torch
    from safetensors.torch import load_file
    a, b = {}, {}
    for p in Path(src).glob('*.safetensors'):
        a.update(load_file(p))
    for p in dst.glob('*.safetensors'):
        b.update(load_file(p))
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', choices=['tiny', 'smollm2'], help='run one model only')
    ap.add_argument('--tp2', action='store_true', help='also HF -> mcore at TP2 under torchrun (2 processes)')
    ap.add_argument('--csv', default=str(RESULTS_CSV))
    ap.add_argument('--no-csv', action='store_true')
    args = ap.parse_args()
    from megaswift.model import resolve_model_dir
    smollm2 = resolve_model_dir(MODEL_ID)
    load1 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_convert_') as tmp:
        work = Path(tmp)
        models = []
        if args.only in (None, 'tiny'):
            from conftest import build_tiny_model
            models.append(('tiny_llama', build_tiny_model(work / 'tiny-llama', 'llama', smollm2,
                                                          num_key_value_heads=2)))
        if args.only in (None, 'smollm2'):
            models.append(('smollm2_135m', smollm2))
        for name, model_dir in models:
            rows += convert_pair(name, model_dir, work, args.tp2)
    mb = 1e6
    base_wall, base_rss = import_baseline()
    print(f'\nimport baseline (no conversion): {base_wall:.2f} s, peak RSS {base_rss / mb:.0f} MB')
    print(f'\n{"model":<14} {"variant":<24} {"wall s":>7} {"convert s":>9} {"peak RSS MB":>11} '
          f'{"over base":>9} {"read MB":>8} {"written MB":>10} {"RSS/written":>11} {"other CPU s":>11}')
    for r in rows:
        print(f'{r["model"]:<14} {r["variant"]:<24} {r["wall_s"]:7.2f} {r["convert_s"]:9.2f} '
              f'{r["peak_rss"] / mb:11.0f} {(r["peak_rss"] - base_rss) / mb:9.0f} {r["in_bytes"] / mb:8.1f} '
              f'{r["out_bytes"] / mb:10.1f} {r["peak_rss"] / r["out_bytes"]:11.2f} {r["other_cpu"]:11.1f}'
              + (f'  identical={r["identical"]}' if 'identical' in r else ''))
    if args.no_csv:
        return
    date = datetime.datetime.now().isoformat(timespec='seconds')
    out_rows = []
    for r in rows:
        contended = r['other_cpu'] > 0.1 * r['wall_s'] * os.cpu_count()
        notes = (f'conversion {r["convert_s"]:.2f}s of the wall time; peak RSS {r["peak_rss"] / mb:.0f} MB '
                 f'({(r["peak_rss"] - base_rss) / mb:.0f} MB over the {base_rss / mb:.0f} MB import baseline); '
                 f'read {r["in_bytes"] / mb:.1f} MB; wrote {r["out_bytes"] / mb:.1f} MB; '
                 f'RSS/written {r["peak_rss"] / r["out_bytes"]:.2f}'
                 + (f'; bit-identical to the source: {r["identical"]}' if 'identical' in r else '')
                 + f'; load1 at start {load1:.2f}; CPU-s used by other processes {r["other_cpu"]:.1f}; '
                 + ('CONTENDED' if contended else 'quiet machine') + f'; {os.cpu_count()} cores; fp32')
        out_rows.append({'date': date, 'benchmark': f'convert_{r["model"]}', 'tool': 'megaswift',
                         'variant': r['variant'], 'wall_s': f'{r["wall_s"]:.2f}',
                         'samples': f'{r["out_bytes"] / mb:.1f}',
                         'samples_per_s': f'{r["out_bytes"] / mb / r["convert_s"]:.1f}', 'notes': notes})
    append_csv(args.csv, out_rows)


if __name__ == '__main__':
    main()
