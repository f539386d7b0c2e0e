#!/usr/bin/env python3
"""LM head + cross entropy, forward + backward: torch (materialised logits) vs megaswift's chunked linear cross
entropy (and, on a GPU with the extension built, its CUDA kernels), measured side by side in one run.

    python benchmarks/linear_ce.py                          # CPU: N 1k/4k/8k, H 512, V 49152/151936, bf16
    python benchmarks/linear_ce.py --tokens 8192 --vocab 49152 --hidden 512 --repeats 3
    python benchmarks/linear_ce.py --device cuda            # GPU: N 4k/16k/32k, H 4096 (+ the cuda kernel)

Every (impl, N, V) runs in a fresh subprocess, so one measurement's allocator state cannot leak into the next:
- time: the median of ``--repeats`` forward+backward runs after one warm-up;
- peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak RSS
  (``ru_maxrss``) minus its RSS once the inputs exist, measured on the first (cold) run. It includes the
  gradients dX and dW, so the floor is ``dX + dW`` (``floor_mb``);
- % of the GEMM floor: ``6 N H V`` FLOPs over the time, against the peak rate: on GPU the datasheet dense
  rate of the card (H100/H200 989 TFLOP/s bf16); on CPU the measured rate of one ``[N, H] x [H, V]`` matmul
  of the same shape and dtype (``gemm_tflops``), since a CPU has no single datasheet number.
The torch variant is ``F.cross_entropy((x @ W.T).float(), y)`` as HF models compute it. Sizes whose
materialised logits would not fit (``--max-gb``) are skipped for torch and reported as such.
Rows are appended to benchmarks/results.csv (date, benchmark, tool, variant, wall_s, samples, samples_per_s, notes).
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from results_csv import RESULTS_CSV, append_csv  # noqa: E402  (benchmarks/)
PEAK_TFLOPS_BF16 = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _sync(device):
    import torch
    if device == 'cuda':
        torch.cuda.synchronize()


def run_one(impl: str, n: int, h: int, v: int, dtype_name: str, device: str, repeats: int) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import torch
    import torch.nn.functional as F

    from megaswift.ops import linear_cross_entropy
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    x = (torch.randn(n, h, device=device) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=device) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    y[::7] = -100

    def step():
        x.grad = w.grad = None
        if impl == 'torch':
            loss = F.cross_entropy((x @ w.t()).float(), y)
        else:
            loss = linear_cross_entropy(x, w, y, impl=impl)
        loss.backward()
        return loss

    _sync(device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    cold = time.perf_counter() - t0
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # the achievable GEMM rate of this shape: the floor's reference on a CPU
    with torch.no_grad():
        x.detach() @ w.detach().t()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(2):
            x.detach() @ w.detach().t()
        _sync(device)
        gemm_s = (time.perf_counter() - t0) / 2
    return {'impl': impl, 'loss': float(loss), 'cold_s': cold, 'times': times, 'peak_bytes': int(peak),
            'gemm_tflops': 2.0 * n * h * v / gemm_s / 1e12,
            'device_name': torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}


def measure(impl, n, h, v, dtype, device, repeats) -> dict:
    cmd = [sys.executable, __file__, '--one', impl, '--tokens', str(n), '--hidden', str(h), '--vocab', str(v),
           '--dtype', dtype, '--device', device, '--repeats', str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {'impl': impl, 'error': (proc.stderr or proc.stdout)[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rate_tflops(result: dict, device: str) -> tuple[float, str]:
    if device == 'cuda':
        for key, rate in PEAK_TFLOPS_BF16.items():
            if key in result['device_name']:
                return rate, f'{key} datasheet bf16 dense'
    return result['gemm_tflops'], 'measured GEMM of the same shape'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--tokens', type=int, nargs='+')
    ap.add_argument('--hidden', type=int)
    ap.add_argument('--vocab', type=int, nargs='+', default=[49152, 151936])
    ap.add_argument('--dtype', default='bfloat16')
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--impls', nargs='+')
    ap.add_argument('--max-gb', type=float, default=14.0, help='skip torch when its logits would exceed this')
    ap.add_argument('--csv', default=str(RESULTS_CSV))
    ap.add_argument('--no-csv', action='store_true')
    ap.add_argument('--one', help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device == 'cuda'
    tokens = args.tokens or ([4096, 16384, 32768] if gpu else [1024, 4096, 8192])
    hidden = args.hidden or (4096 if gpu else 512)
    if args.one:
        print(json.dumps(run_one(args.one, tokens[0], hidden, args.vocab[0], args.dtype, args.device, args.repeats)))
        return
    impls = args.impls or (['torch', 'chunked', 'cuda'] if gpu else ['torch', 'chunked'])
    elem = 2 if args.dtype in ('bfloat16', 'float16') else 4
    rows = []
    print(f'{"N":>6} {"V":>7} {"impl":>8} {"time_s":>8} {"peak_MB":>9} {"floor_MB":>9} {"%floor":>7} {"TFLOP/s":>8}')
    for v in args.vocab:
        for n in tokens:
            flops = 6.0 * n * hidden * v
            floor_mb = (n + v) * hidden * elem / 2 ** 20
            # torch: bf16 logits + their fp32 copy + the fp32 softmax grad + the bf16 grad
            torch_gb = n * v * (elem + 4 + 4 + elem) / 2 ** 30
            results = {}
            for impl in impls:
                if impl == 'torch' and torch_gb > args.max_gb:
                    print(f'{n:>6} {v:>7} {impl:>8}  skipped: logits need ~{torch_gb:.1f} GB > --max-gb')
                    continue
                r = measure(impl, n, hidden, v, args.dtype, args.device, args.repeats)
                if 'error' in r:
                    print(f'{n:>6} {v:>7} {impl:>8}  failed: {r["error"].strip().splitlines()[-1]}')
                    continue
                t = statistics.median(r['times'])
                rate, rate_src = peak_rate_tflops(r, args.device)
                pct = 100.0 * flops / t / (rate * 1e12)
                results[impl] = (t, r)
                print(f'{n:>6} {v:>7} {impl:>8} {t:>8.3f} {r["peak_bytes"] / 2**20:>9.0f} {floor_mb:>9.0f} '
                      f'{pct:>6.1f}% {flops / t / 1e12:>8.3f}')
                rows.append({'benchmark': f'linear_ce_N{n}_H{hidden}_V{v}', 'tool': f'megaswift-{impl}',
                             'variant': f'{args.device}-{args.dtype}', 'wall_s': round(t, 4), 'samples': n,
                             'samples_per_s': round(n / t, 1),
                             'notes': f'fwd+bwd median of {args.repeats} ({", ".join(f"{x:.3f}" for x in r["times"])});'
                                      f' peak {r["peak_bytes"] / 2**20:.0f} MB above inputs, floor dX+dW '
                                      f'{floor_mb:.0f} MB; {pct:.1f}% of the 6NHV floor at {rate:.3f} TFLOP/s '
                                      f'({rate_src}); loss {r["loss"]:.5f}; {r["device_name"]}'})
            if 'torch' in results and 'chunked' in results:
                (tt, rt), (tc, rc) = results['torch'], results['chunked']
                print(f'{"":>6} {"":>7} {"ratio":>8} torch/chunked: time {tt / tc:.2f}x, peak memory '
                      f'{rt["peak_bytes"] / max(rc["peak_bytes"], 1):.1f}x; |loss diff| {abs(rt["loss"] - rc["loss"]):.2e}')
    if rows and not args.no_csv:
        now = datetime.datetime.now().isoformat(timespec='seconds')
        append_csv(args.csv, [{'date': now, **row} for row in rows])


if __name__ == '__main__':
    main()
