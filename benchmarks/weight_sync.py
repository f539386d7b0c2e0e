#!/usr/bin/env python3
"""Weight sync and rollout throughput on CPU: seconds per GB that a megatron-core trainer (TP=1, TP=3, PP=2) takes to
push its weights into a running `megaswift rollout` (transformers backend), and the /infer throughput of that
server against the same engine in-process, side by side in one run.

Model: SmolLM2-135M-Instruct (the embedded model as an HF directory), fp32 on both sides. One push = every HF
tensor once (the tied embedding once): the GB figure is their fp32 bytes. SmolLM2-135M has 9 attention heads (3 KV
heads), so its tensor-parallel sizes are 1 and 3 (TP=2 is refused). Each trainer layout is a torchrun launch
of this script (`--worker`, gloo), which builds the model at that layout, joins the server's weight-sync group and
pushes --pushes times (buckets of the server's --weight_sync_bucket_mb); the first push is reported apart (it
includes the group's first use). /infer: --requests prompts (the math5 questions with the chat template, repeated),
n=1, --max_tokens new tokens, temperature 0.7, a seed per request, as one /infer batch through RolloutClient and as
one `engine.infer` call in this process; generated tokens / s.

    python benchmarks/weight_sync.py
    python benchmarks/weight_sync.py --pushes 5 --requests 16 --max_tokens 64
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import RESULTS_CSV, append_csv  # noqa: E402
from sample_vs_swift import MAIN_PY, ROOT, resolve_model  # noqa: E402

MATH5 = ROOT / 'benchmarks' / 'data' / 'math5.jsonl'


def checkpoint_fp32_bytes(model_dir: str) -> int:
    """fp32 bytes of every tensor of the HF checkpoint (what one push sends)."""
    from safetensors import safe_open
    total = 0
    for f in sorted(Path(model_dir).glob('*.safetensors')):
        with safe_open(str(f), framework='pt') as st:
            for name in st.keys():
                n = 1
                for s in st.get_slice(name).get_shape():
                    n *= int(s)
                total += 4 * n
    return total


def start_server(model_dir: str, log: Path):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    err = open(log, 'w')
    proc = subprocess.Popen([str(MAIN_PY), '-m', 'megaswift.cli.main', 'rollout', '--model', model_dir, '--port', '0',
                             '--torch_dtype', 'float32'], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                            cwd=ROOT)
    line = proc.stdout.readline()
    if ' at http://' not in line:
        proc.kill()
        sys.exit(f'megaswift rollout did not start: {line!r}\n{log.read_text()[-3000:]}')
    return proc, line.split(' at ')[1].strip()


# ------------------------------------------------------------------------------------------ trainer side
def worker(args) -> None:
    """One rank of a trainer at TP=args.tp x PP=args.pp: build + load, then push args.pushes times; rank 0 writes
    the timings."""
    import torch
    from transformers import AutoConfig

    from megaswift.megatron import ParallelConfig, build_model, initialize_parallel, load_hf_weights
    from megaswift.megatron.parallel import _init_process_group
    from megaswift.rollout import RolloutClient, push_weights
    _init_process_group()
    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    models = build_model(AutoConfig.from_pretrained(args.model), parallel=ctx)
    load_hf_weights(models, args.model, parallel=ctx)
    rank = torch.distributed.get_rank()
    client = RolloutClient(args.url, read_timeout=600) if rank == 0 else None
    if client is not None:
        client.init_communicator()
    times = []
    for _ in range(args.pushes):
        torch.distributed.barrier()
        start = time.perf_counter()
        push_weights(models, client, parallel=ctx, bucket_mb=args.bucket_mb)
        torch.distributed.barrier()
        times.append(time.perf_counter() - start)
    if client is not None:
        client.close_communicator()
        Path(args.out).write_text(json.dumps({'push_s': times}))
    torch.distributed.destroy_process_group()


LAYOUTS = {'tp1': (1, 1), 'tp3': (3, 1), 'pp2': (1, 2)}


def run_trainer(layout: str, model_dir: str, url: str, pushes: int, bucket_mb: float, tmp: Path) -> list[float]:
    tp, pp = LAYOUTS[layout]
    out = tmp / f'{layout}.json'
    cmd = [str(MAIN_PY), '-m', 'torch.distributed.run', '--nproc_per_node', str(tp * pp), '--standalone', __file__,
           '--worker', '--tp', str(tp), '--pp', str(pp), '--model', model_dir, '--url', url, '--pushes', str(pushes),
           '--bucket_mb', str(bucket_mb), '--out', str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // (tp * pp))))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f'trainer {layout} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}')
    return json.loads(out.read_text())['push_s']


# ------------------------------------------------------------------------------------------ /infer
def infer_requests(model_dir: str, n_requests: int, max_tokens: int) -> list[dict]:
    from megaswift.model import load_tokenizer
    tok = load_tokenizer(model_dir)
    questions = [json.loads(line)['messages'][0]['content'] for line in MATH5.read_text().splitlines()]
    prompts = [tok.apply_chat_template([{'role': 'user', 'content': q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    ids = [tok(p, add_special_tokens=False)['input_ids'] for p in prompts]
    return [{'prompt_token_ids': ids[i % len(ids)], 'temperature': 0.7, 'max_tokens': max_tokens, 'seed': i}
            for i in range(n_requests)]


def tokens_of(results) -> int:
    return sum(len(c['token_ids']) for r in results for c in r['completions'])


def infer_server(url: str, requests_: list[dict]) -> tuple[float, int]:
    from megaswift.rollout import RolloutClient
    client = RolloutClient(url, read_timeout=600)
    client.infer(requests_[:1])  # warm-up
    start = time.perf_counter()
    reply = client.infer(requests_)
    return time.perf_counter() - start, tokens_of(reply['results'])


def infer_in_process(model_dir: str, requests_: list[dict]) -> tuple[float, int]:
    from megaswift.rollout.engine import SamplingRequest, get_rollout_engine
    engine = get_rollout_engine('transformers', model_dir, torch_dtype='float32')
    reqs = [SamplingRequest(**r) for r in requests_]
    engine.infer(reqs[:1])
    start = time.perf_counter()
    results, _ = engine.infer(reqs)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c['token_ids']) for r in results for c in r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--pushes', type=int, default=3)
    ap.add_argument('--bucket_mb', type=float, default=512)
    ap.add_argument('--requests', type=int, default=8)
    ap.add_argument('--max_tokens', type=int, default=32)
    ap.add_argument('--csv', default=str(RESULTS_CSV))
    ap.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--layouts', default='tp1,tp3,pp2', help=f'trainer layouts to push from ({", ".join(LAYOUTS)})')
    ap.add_argument('--tp', type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument('--pp', type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument('--model', help=argparse.SUPPRESS)
    ap.add_argument('--url', help=argparse.SUPPRESS)
    ap.add_argument('--out', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    sys.stdout.reconfigure(line_buffering=True)
    model_dir = resolve_model()
    gb = checkpoint_fp32_bytes(model_dir) / 1e9
    tmp = Path(tempfile.mkdtemp(prefix='bench_wsync_'))
    print(f'model dir: {model_dir}\none push: {gb:.3f} GB (fp32), buckets of {args.bucket_mb:g} MB')
    server, url = start_server(model_dir, tmp / 'server.log')
    rows, date = [], datetime.datetime.now().isoformat(timespec='seconds')
    try:
        for layout in args.layouts.split(','):
            times = run_trainer(layout, model_dir, url, args.pushes, args.bucket_mb, tmp)
            steady = times[1:] or times
            best = min(steady)
            print(f'{layout}: pushes {", ".join(f"{t:.2f}" for t in times)} s -> {best / gb:.2f} s/GB '
                  f'(best after the first), first {times[0] / gb:.2f} s/GB')
            rows.append({'date': date, 'benchmark': 'weight_sync_smollm2_fp32', 'tool': 'megaswift',
                         'variant': f'push-{layout}', 'wall_s': f'{best:.3f}', 'samples': f'{gb:.3f}',
                         'samples_per_s': f'{gb / best:.3f}',
                         'notes': f'samples = GB per push (fp32), samples_per_s = GB/s; s/GB {best / gb:.2f}; pushes '
                                  f'{[round(t, 3) for t in times]}; buckets {args.bucket_mb:g} MB; gloo; '
                                  f'{os.cpu_count()} cores'})
        requests_ = infer_requests(model_dir, args.requests, args.max_tokens)
        s_server, tok_server = infer_server(url, requests_)
    finally:
        server.kill()
        server.wait(timeout=30)
    s_local, tok_local = infer_in_process(model_dir, requests_)
    print(f'\n{"/infer":<22} {"s":>7} {"tokens":>7} {"tokens/s":>9}')
    for name, s, n in (('server (HTTP)', s_server, tok_server), ('in-process engine', s_local, tok_local)):
        print(f'{name:<22} {s:>7.2f} {n:>7} {n / s:>9.1f}')
        rows.append({'date': date, 'benchmark': f'rollout_infer_smollm2_fp32_{args.requests}x{args.max_tokens}',
                     'tool': 'megaswift', 'variant': 'server' if name.startswith('server') else 'in-process',
                     'wall_s': f'{s:.3f}', 'samples': n, 'samples_per_s': f'{n / s:.1f}',
                     'notes': f'samples = generated tokens; one batch of {args.requests} requests, n=1, temperature '
                              f'0.7, seeds 0..{args.requests - 1}; {os.cpu_count()} cores'})
    append_csv(args.csv, rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
