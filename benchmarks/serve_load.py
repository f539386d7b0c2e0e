#!/usr/bin/env python3
"""Latency and throughput of `megaswift deploy` under load, before and after issue 17's fair scheduling.

Two servers run side by side on the same CPU and model: "before", the deploy server of commit b3a542b (the last
one before deploy moved onto FastAPI: a stdlib http.server, each request's n decoded in one batch) from a git
worktree, and "after", the current tree. Both: transformers engine, SmolLM2-135M-Instruct (the embedded model as an
HF directory), fp32, default batch sizes (--max_batch_size 32). Both are up at once and take turns phase by phase:

- c1, c8, c32: 1, 8 and 32 clients, each sending --requests_per_client requests one after another (c1: at least
  4), a distinct one-line question each, greedy, --max_tokens new tokens;
- n64: one client keeps sending n=64 requests (temperature 0.7, --max_tokens) while 4 normal clients send theirs
  (at least 2 each) as above, starting once the first n=64 request is in the server. Reported: the normal clients'
  latency.

Once both servers are up (each answered one warm-up request) it waits (--max_wait) for a quiet machine, as
sample_vs_swift.py does; each phase's load and the CPU-seconds other processes used during it (the machine's busy
time less the server's and this script's) are in the notes, with CONTENDED when those reach 10 % of one core.

Per phase: p50 / p99 latency of the (normal) requests, requests/s and completion tokens/s over the phase's wall time
(n64: the normal requests only; the n=64 requests done are counted in the notes). Percentiles are nearest-rank.

    python benchmarks/serve_load.py                  # both servers, a few minutes on 2 cores
    python benchmarks/serve_load.py --only after --max_tokens 8

Rows are appended to benchmarks/results.csv (one per server and phase; samples = requests, samples_per_s =
requests/s; latency, tokens/s, machine load in the notes).
"""
import argparse
import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import RESULTS_CSV, append_csv  # noqa: E402
from sample_vs_swift import MAIN_PY, ROOT, cpu_busy_s, resolve_model, wait_quiet  # noqa: E402

BEFORE_REV = 'b3a542b'  # the parent of 1a8ba92 "megaswift deploy on FastAPI + uvicorn"
BEFORE_TREE = Path(tempfile.gettempdir()) / 'serve_before'
NORMAL_CLIENTS_BESIDE_N64 = 4


def before_tree() -> Path:
    """A worktree of BEFORE_REV (added once, then reused)."""
    if not (BEFORE_TREE / 'megaswift').is_dir():
        subprocess.run(['git', '-C', str(ROOT), 'worktree', 'add', '--detach', '-f', str(BEFORE_TREE), BEFORE_REV],
                       check=True)
    return BEFORE_TREE


def start_server(tree: Path, model_dir: str, log: Path) -> tuple[subprocess.Popen, str, int]:
    """`megaswift deploy` of ``tree`` on a free port; (process, host, port) once it listens."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED='1')
    env.pop('MEGASWIFT_API_KEY', None)
    with open(log, 'w') as err:
        proc = subprocess.Popen([str(MAIN_PY), '-m', 'megaswift.cli.main', 'deploy', '--model', model_dir, '--port',
                                 '0', '--torch_dtype', 'float32', '--served_model_name', 'smollm2'],
                                cwd=tree, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    if ' at http://' not in line:
        proc.kill()
        sys.exit(f'the server of {tree} did not start: {line!r}\n{log.read_text()[-3000:]}')
    address = line.split(' at http://')[1].split('/')[0]
    host, port = address.rsplit(':', 1)
    return proc, host, int(port)


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[float, int]:
    """(seconds, completion tokens) of one chat completion on a kept-alive connection."""
    start = time.perf_counter()
    conn.request('POST', '/v1/chat/completions', json.dumps(body), {'Content-Type': 'application/json'})
    reply = conn.getresponse()
    data = json.loads(reply.read())
    if reply.status != 200:
        raise RuntimeError(f'{reply.status}: {data}')
    return time.perf_counter() - start, data['usage']['completion_tokens']


def question(client: int, i: int, max_tokens: int) -> dict:
    return {'messages': [{'role': 'user', 'content': f'Question {client}.{i}: name a colour and say why.'}],
            'max_tokens': max_tokens, 'temperature': 0}


def run_clients(host: str, port: int, clients: int, per_client: int, max_tokens: int,
                first: int = 0) -> tuple[list[tuple[float, int]], list[str]]:
    """``clients`` threads, each sending ``per_client`` requests in turn: every answered request's (latency,
    tokens), and what went wrong with the others (a failed request is not retried; the client reconnects)."""
    results: list[tuple[float, int]] = []
    errors: list[str] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        for i in range(per_client):
            try:
                results.append(post(conn, question(first + c, i, max_tokens)))
            except (OSError, http.client.HTTPException, RuntimeError) as e:
                errors.append(type(e).__name__)
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=600)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def beside_n64(host: str, port: int, per_client: int, max_tokens: int) -> tuple[list, list[str], int]:
    """The normal clients' results and errors while one client keeps sending n=64 requests; and how many of those
    finished."""
    stop, hog_done, started = threading.Event(), [], threading.Event()

    def hog() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        body = {'messages': [{'role': 'user', 'content': 'Write a short poem about the sea.'}], 'n': 64,
                'max_tokens': max_tokens, 'temperature': 0.7}
        while not stop.is_set():
            started.set()
            try:
                hog_done.append(post(conn, body))
            except (OSError, http.client.HTTPException, RuntimeError):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=600)
        conn.close()

    thread = threading.Thread(target=hog)
    thread.start()
    started.wait()
    time.sleep(0.5)  # the first n=64 request is in the server
    try:
        return (*run_clients(host, port, NORMAL_CLIENTS_BESIDE_N64, per_client, max_tokens, first=1000),
                len(hog_done))
    finally:
        stop.set()
        thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used."""
    with open(f'/proc/{pid}/stat') as fh:
        fields = fh.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


PHASES = (('c1', 1), ('c8', 8), ('c32', 32), ('n64', None))


def measure(name: str, server: tuple, phase: str, clients: int | None, args) -> dict:
    """One phase on one server (``(process, host, port)``)."""
    proc, host, port = server
    load, busy0, start = os.getloadavg()[0], cpu_busy_s(), time.perf_counter()
    own0 = process_cpu_s(proc.pid) + process_cpu_s(os.getpid())
    n64_done = None
    if clients is None:
        clients, per_client = NORMAL_CLIENTS_BESIDE_N64, max(args.requests_per_client, 2)
        results, errors, n64_done = beside_n64(host, port, per_client, args.max_tokens)
    else:
        per_client = max(args.requests_per_client, 4 // clients)
        results, errors = run_clients(host, port, clients, per_client, args.max_tokens)
    wall = time.perf_counter() - start
    own = process_cpu_s(proc.pid) + process_cpu_s(os.getpid()) - own0
    latencies, tokens = [r[0] for r in results] or [float('nan')], sum(r[1] for r in results)
    r = {'server': name, 'phase': phase, 'clients': clients, 'per_client': per_client, 'requests': len(results),
         'wall': wall, 'p50': percentile(latencies, 50), 'p99': percentile(latencies, 99),
         'rps': len(results) / wall, 'tps': tokens / wall, 'load': load, 'own_cpu_s': own,
         'other_cpu_s': max(0.0, cpu_busy_s() - busy0 - own), 'n64_done': n64_done, 'failed': len(errors),
         'errors': {e: errors.count(e) for e in sorted(set(errors))}}
    print(f'{name:6s} {phase:4s} {len(results):4d} requests in {wall:6.1f}s  p50 {r["p50"]:6.2f}s  '
          f'p99 {r["p99"]:6.2f}s  {r["rps"]:5.2f} req/s  {r["tps"]:6.1f} tok/s  other processes '
          f'{r["other_cpu_s"]:.0f} CPU-s' + (f'  (n=64 requests done: {n64_done})' if n64_done is not None else '')
          + (f'  FAILED: {r["errors"]}' if errors else ''), flush=True)
    return r


def contended(r: dict) -> bool:
    """Other processes took >= 10 % of one core during the phase."""
    return r['other_cpu_s'] >= 0.1 * r['wall']


def table(rows: list[dict]) -> str:
    by = {(r['server'], r['phase']): r for r in rows}
    columns = (('p50 (s)', 'p50', '{:.2f}'), ('p99 (s)', 'p99', '{:.2f}'), ('req/s', 'rps', '{:.2f}'),
               ('tok/s', 'tps', '{:.1f}'), ('failed', 'failed', '{}'))
    lines = ['| phase | ' + ' | '.join(f'{title} before / after' for title, _, _ in columns) + ' |',
             '|---' * (1 + len(columns)) + '|']
    for phase in ('c1', 'c8', 'c32', 'n64'):
        pair = by.get(('before', phase)), by.get(('after', phase))
        cells = [' / '.join(fmt.format(r[key]) if r else '-' for r in pair) for _, key, fmt in columns]
        lines.append(f'| {phase} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def csv_rows(rows: list[dict], args) -> list[dict]:
    date = datetime.datetime.now().isoformat(timespec='seconds')
    out = []
    for r in rows:
        variant = f'{r["server"]}{"-" + BEFORE_REV if r["server"] == "before" else ""}/{r["phase"]}'
        notes = [f'{r["clients"]} clients x {r["per_client"]} requests, {args.max_tokens} new tokens, greedy',
                 f'p50 {r["p50"]:.2f} s', f'p99 {r["p99"]:.2f} s', f'{r["tps"]:.1f} completion tok/s',
                 f'load1 {r["load"]:.2f}', f'CPU-s used by other processes {r["other_cpu_s"]:.0f}',
                 'CONTENDED' if contended(r) else 'quiet machine', f'{os.cpu_count()} cores']
        if r['errors']:
            notes.insert(1, 'failed requests ' + ', '.join(f'{n} {e}' for e, n in r['errors'].items()))
        if r['n64_done'] is not None:
            notes.insert(1, f'beside one client sending n=64 requests ({r["n64_done"]} done)')
        out.append({'date': date, 'benchmark': f'serve_load_smollm2_{args.max_tokens}tok', 'tool': 'megaswift',
                    'variant': variant, 'wall_s': f'{r["wall"]:.2f}', 'samples': r['requests'],
                    'samples_per_s': f'{r["rps"]:.3f}', 'notes': '; '.join(notes)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--only', choices=('before', 'after', 'both'), default='both')
    parser.add_argument('--max_tokens', type=int, default=16)
    parser.add_argument('--requests_per_client', type=int, default=1)
    parser.add_argument('--max_wait', type=float, default=120, help='seconds to wait for a quiet machine')
    parser.add_argument('--csv', default=str(RESULTS_CSV))
    args = parser.parse_args()
    model_dir = resolve_model()
    trees = {'before': before_tree, 'after': lambda: ROOT}
    names = list(trees) if args.only == 'both' else [args.only]
    rows, servers = [], {}
    with tempfile.TemporaryDirectory() as logs:
        try:
            for name in names:
                servers[name] = start_server(trees[name](), model_dir, Path(logs) / f'{name}.log')
                post(http.client.HTTPConnection(*servers[name][1:], timeout=600), question(0, 0, args.max_tokens))
            load, waited = wait_quiet(args.max_wait)
            print(f'load {load:.2f} after waiting {waited:.0f}s for a quiet machine', flush=True)
            for phase, clients in PHASES:  # the servers take turns, so a busy spell of the machine hits both
                rows += [measure(name, servers[name], phase, clients, args) for name in names]
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    print()
    print(table(rows))
    append_csv(args.csv, csv_rows(rows, args))
    return 0


if __name__ == '__main__':
    sys.exit(main())
