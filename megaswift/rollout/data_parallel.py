"""``megaswift rollout --data_parallel_size N``: N replicas of one backend's engine behind one engine object.

``DataParallelEngine`` has the rollout engine interface the server calls (``engine.py``), so the server does not
know it is there. Each replica is ``get_rollout_engine(backend, ..., data_parallel_size=1)`` built inside its own
worker process (multiprocessing, spawn context), which serves a request loop over a pipe to this process:

- ``infer`` splits a batch's requests across the replicas, balanced by rows (prompt x ``n``; a request's ``n`` rows
  stay together), runs the shares concurrently and puts the results back in request order. Each completion draws
  from an RNG seeded by its own request's seed and prompt (``row_generators``), so a seeded batch gives the same
  completions at any ``N``;
- weight sync: replica ``i`` joins the group at ranks ``rank + i * w`` (``w``: one replica's ranks), so the group
  has ``1 + N * w`` ranks; every replica receives the same broadcast concurrently and must report the same weights
  version afterwards, else ``WeightSyncError``;
- devices: on CPU each worker gets ``torch.set_num_threads(max(1, cpus // N))``; on GPUs the visible devices
  (``CUDA_VISIBLE_DEVICES``, else all) are cut into N equal consecutive slices and each worker sets its slice as
  its own ``CUDA_VISIBLE_DEVICES`` before torch initialises CUDA (so every replica sees its devices as ``cuda:0..``);
- a replica that dies (crash, ``kill -9``) is noticed at once (its pipe and its process sentinel are watched
  together, never a blocking read) and every call then raises ``RolloutError`` naming the replica, its pid and
  exit code; the server must be restarted;
- a server killed with -9 takes its replicas with it (each waits on its parent in a watchdog thread);
- prompts given as ``messages`` are templated by a replica on a second pipe served by its own thread, so a
  long ``infer`` on that replica does not hold it up.

There is no in-process ``infer_engine``, so the server does not add the OpenAI routes for a data-parallel engine.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait

from ..utils.errors import ArgumentError, UserError
from .weight_sync import RolloutError, WeightSyncError

logger = logging.getLogger(__name__)

OPS = ('infer', 'prompt_ids', 'join_communicator', 'update_weights', 'close_communicator', 'reset_prefix_cache')
CONTROL_TIMEOUT_S = 120.0  # a replica that does not answer a short call (templating, cache reset) in this time is stuck
USER_ERRORS = (UserError, ImportError, FileNotFoundError, ConnectionError)  # what the CLI prints as one line


class ReplicaUserError(RolloutError, UserError):
    """A replica failed on the user's input (a missing model or backend): its message says what to fix."""


# ---------------------------------------------------------------- worker process
def _state(engine) -> dict:
    return {'weights_version': engine.weights_version, 'prefix_cache_resets': engine.prefix_cache_resets,
            'communicator': bool(engine.has_communicator)}


def _describe(e: BaseException, starting: bool = False) -> tuple[str, str]:
    """An exception as (kind, message): the parent raises ValueError / WeightSyncError / RolloutError from it
    (exceptions are not pickled: a backend's own exception types need not survive the trip)."""
    if starting and isinstance(e, USER_ERRORS):
        return 'user', f'{type(e).__name__}: {e}'
    if isinstance(e, WeightSyncError):
        return 'weight_sync', str(e)
    if isinstance(e, ValueError):
        return 'value', str(e)
    return 'other', f'{type(e).__name__}: {e}'


def _serve(conn, engine, ops: tuple[str, ...]) -> None:
    """Answer ``(op, args)`` messages with ``('ok', result, state)`` or ``('error', kind, message, traceback,
    state)`` until ``None`` or the server's end of the pipe closes."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if msg is None:
            return
        op, args = msg
        try:
            if op not in ops:
                raise RolloutError(f'unknown operation {op!r}')
            reply = ('ok', getattr(engine, op)(*args), _state(engine))
        except Exception as e:  # noqa: BLE001 - reported to the server; the replica keeps serving
            reply = ('error', *_describe(e), traceback.format_exc(), _state(engine))
        try:
            conn.send(reply)
        except OSError:
            return


def _exit_with_parent() -> None:
    """A server killed with -9 closes no pipe politely: the replica goes too, even in the middle of a batch."""
    multiprocessing.parent_process().join()
    os._exit(1)


def _worker(index: int, conn, side, backend: str, model: str, torch_dtype, kwargs: dict,
            visible_devices: str | None, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which closes the workers
    threading.Thread(target=_exit_with_parent, daemon=True, name=f'rollout-dp{index}-watchdog').start()
    if visible_devices is not None:
        os.environ['CUDA_VISIBLE_DEVICES'] = visible_devices  # before anything initialises CUDA
    import torch
    if visible_devices is None:
        torch.set_num_threads(threads)
    try:
        if visible_devices is not None and torch.cuda.is_initialized():
            raise RuntimeError(f'CUDA was initialised (by a module imported at spawn) before replica {index} could set '
                               f'CUDA_VISIBLE_DEVICES={visible_devices}')
        from .engine import get_rollout_engine
        engine = get_rollout_engine(backend, model, torch_dtype, 1, **kwargs)
        info = {'backend': engine.backend, 'world_size': int(engine.world_size), 'model_name': engine.model_name,
                'device': str(engine.device), 'pid': os.getpid(), 'visible_devices': visible_devices,
                'weight_sync_protocol': getattr(engine, 'weight_sync_protocol', 'megaswift')}
    except Exception as e:  # noqa: BLE001 - reported to the server
        conn.send(('error', *_describe(e, starting=True), traceback.format_exc(), None))
        raise SystemExit(1) from None
    conn.send(('ok', info, _state(engine)))
    threading.Thread(target=_serve, args=(side, engine, ('prompt_ids',)), daemon=True,
                     name=f'rollout-dp{index}-prompts').start()
    try:
        _serve(conn, engine, OPS)
    finally:
        engine.close()


# ---------------------------------------------------------------- plan
def split_by_rows(rows: list[int], parts: int) -> list[list[int]]:
    """Request indices per replica: the largest requests first, each to the replica with the fewest rows so far
    (ties: the lower replica); each share in request order."""
    shares, load = [[] for _ in range(parts)], [0] * parts
    for k in sorted(range(len(rows)), key=lambda k: -rows[k]):
        i = min(range(parts), key=lambda i: (load[i], i))
        shares[i].append(k)
        load[i] += rows[k]
    return [sorted(s) for s in shares]


def device_plan(size: int, device: str | None, per_replica: int = 1) -> list[str | None]:
    """Each replica's ``CUDA_VISIBLE_DEVICES`` (None: a CPU replica); a replica needs ``per_replica`` GPUs (its
    tensor parallel size)."""
    if device is not None and str(device).startswith('cpu'):
        return [None] * size
    import torch
    count = torch.cuda.device_count()
    if count == 0:
        return [None] * size
    env = os.environ.get('CUDA_VISIBLE_DEVICES')
    ids = [d.strip() for d in env.split(',') if d.strip()] if env else [str(i) for i in range(count)]
    ids = ids[:count]
    per = len(ids) // size
    if per < per_replica:
        raise ArgumentError(f'--data_parallel_size {size} needs at least {size * per_replica} GPUs, {len(ids)} '
                            f'visible ({ids}); or run the replicas on CPU (device cpu)')
    return [','.join(ids[i * per:(i + 1) * per]) for i in range(size)]


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def _shutdown(procs: list, conns: list, sides: list, grace_s: float = 10.0) -> None:
    """Ask every worker to stop, then terminate / kill those still running. Not a method: also the finalizer."""
    for conn in conns:
        try:
            conn.send(None)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    for conn in conns + sides:
        conn.close()


# ---------------------------------------------------------------- the engine
class DataParallelEngine:
    """``size`` replicas of ``backend`` in worker processes (see the module docstring). ``lock`` serialises
    batches and weight updates across all replicas (a replica runs one call at a time)."""

    def __init__(self, backend: str, model: str, torch_dtype: str | None = 'auto', data_parallel_size: int = 2,
                 start_timeout_s: float = 3600.0, **kwargs):
        if data_parallel_size < 1:
            raise ValueError(f'data_parallel_size must be >= 1, got {data_parallel_size}')
        self.size, self.model_name = data_parallel_size, model
        self.lock = threading.Lock()
        self._side_lock = threading.Lock()
        self._broken: str | None = None
        self._sync_timeout_s: float | None = None
        self.rows = [0] * self.size
        ctx = multiprocessing.get_context('spawn')
        plan = device_plan(self.size, kwargs.get('device'), int(kwargs.get('tensor_parallel_size') or 1))
        threads = max(1, cpu_count() // self.size)
        self._procs, self._conns, self._sides = [], [], []
        self._states: dict[int, dict] = {}
        # stops the workers when this engine is collected or at exit, before multiprocessing joins its children
        self._finalizer = multiprocessing.util.Finalize(self, _shutdown, (self._procs, self._conns, self._sides),
                                                        exitpriority=10)
        try:
            for i in range(self.size):
                conn, child = ctx.Pipe()
                side, side_child = ctx.Pipe()
                # not daemonic: a replica may start processes of its own (e.g. a backend's workers)
                proc = ctx.Process(target=_worker, name=f'megaswift-rollout-dp{i}',
                                   args=(i, child, side_child, backend, model, torch_dtype, kwargs, plan[i], threads))
                proc.start()
                child.close()
                side_child.close()
                self._procs.append(proc)
                self._conns.append(conn)
                self._sides.append(side)
            started = self._collect(range(self.size), 'start', start_timeout_s)
            self.replicas = [started[i] for i in range(self.size)]
        except BaseException:
            self.close()
            raise
        first = self.replicas[0]
        self.backend, self.device = first['backend'], first['device']
        self.weight_sync_protocol = first['weight_sync_protocol']  # how the replicas join the group (``/info``)
        self.world_size = self.size * first['world_size']  # its ranks in the weight-sync group
        logger.info('rollout: %d %s replicas of %s, pids %s', self.size, self.backend, model,
                    [r['pid'] for r in self.replicas])

    # ---------------------------------------------------------------- plumbing
    def _replica_died(self, i: int) -> str:
        proc = self._procs[i]
        proc.join(5)
        code = proc.exitcode
        how = f'exit code {code}' + (f' (killed by signal {-code})' if code is not None and code < 0 else '')
        if code is None:
            how = 'its pipe closed (the process is still running)'
        return f'data-parallel replica {i} of {self.size} (pid {proc.pid}) died: {how}'

    def _fail(self, message: str, what: str):
        self._broken = message
        raise RolloutError(f'rollout engine: {message}, during {what}; restart the server')

    def _check(self) -> None:
        if self._broken is not None:
            raise RolloutError(f'rollout engine: {self._broken}; restart the server')
        for i, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(self._replica_died(i), 'an earlier call')

    def _collect(self, indices, what: str, timeout_s: float | None = None, conns: list | None = None) -> dict:
        """The result of each replica in ``indices`` (sent ``what`` before). A replica that dies or does not answer
        in ``timeout_s`` breaks the engine: RolloutError at once, naming it. A replica's own error is raised after
        every replica answered (ValueError and WeightSyncError keep their type)."""
        conns = conns or self._conns
        pending = {conns[i]: i for i in indices}
        sentinels = {self._procs[i].sentinel: i for i in indices}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results, errors = {}, []
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                late = sorted(pending.values())
                self._fail(f'data-parallel replica(s) {late} did not answer within {timeout_s:.0f} s', what)
            ready = wait(list(pending) + [s for s, i in sentinels.items() if i in pending.values()], left)
            for obj in ready:
                i = sentinels.get(obj, pending.get(obj))
                conn = conns[i]
                if conn not in pending:
                    continue
                try:
                    # the process exited: read what it sent before (the pipe may outlive it in its own children)
                    reply = conn.recv() if obj is conn or conn.poll(0) else None
                except (EOFError, OSError):
                    reply = None
                if reply is None:
                    self._fail(self._replica_died(i), what)
                del pending[conn]
                if reply[-1] is not None:
                    self._states[i] = reply[-1]
                if reply[0] == 'ok':
                    results[i] = reply[1]
                else:
                    errors.append((i, *reply[1:4]))
        if errors:
            i, kind, message, tb = min(errors)
            if kind == 'other':  # a bad request (ValueError) or a refused bucket is the caller's, not a failure
                logger.error('data-parallel replica %d failed during %s:\n%s', i, what, tb)
            if kind == 'value':
                raise ValueError(message)
            if kind == 'weight_sync':
                raise WeightSyncError(message)
            if kind == 'user':
                raise ReplicaUserError(f'data-parallel replica {i} failed during {what}: {message}')
            raise RolloutError(f'rollout engine: data-parallel replica {i} failed during {what}: {message}')
        return results

    def _call(self, op: str, args: dict[int, tuple], timeout_s: float | None = None, conns: list | None = None):
        """Send ``op(*args[i])`` to each replica ``i`` in ``args`` (they run concurrently), then collect."""
        self._check()
        conns = conns or self._conns
        for i, a in args.items():
            try:
                conns[i].send((op, a))
            except OSError:
                self._fail(self._replica_died(i), op)
        return self._collect(list(args), op, timeout_s, conns)

    def _everyone(self, args: tuple) -> dict[int, tuple]:
        return dict.fromkeys(range(self.size), args)

    def _state_of(self, key: str):
        return [self._states[i][key] for i in range(self.size)]

    # ---------------------------------------------------------------- the engine interface
    @property
    def weights_version(self) -> int:
        return min(self._state_of('weights_version'))

    @property
    def prefix_cache_resets(self) -> int:
        return min(self._state_of('prefix_cache_resets'))

    @property
    def has_communicator(self) -> bool:
        return all(self._state_of('communicator'))

    def replicas_info(self) -> list[dict]:
        """Per replica: pid, device(s), rows generated so far, weights version, alive (for ``/info``)."""
        return [{'replica': i, 'pid': r['pid'], 'device': r['device'], 'visible_devices': r['visible_devices'],
                 'rows': self.rows[i], 'weights_version': self._states[i]['weights_version'],
                 'alive': self._procs[i].is_alive()} for i, r in enumerate(self.replicas)]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Templated by replica 0, on its second pipe (answered while it generates)."""
        with self._side_lock:
            return self._call('prompt_ids', {0: (messages,)}, CONTROL_TIMEOUT_S, self._sides)[0]

    def infer(self, requests: list) -> tuple[list[list[dict]], int]:
        """Completions of every request (in order) and the weights version they were all generated with."""
        if not requests:
            return [], self.weights_version
        with self.lock:
            shares = split_by_rows([r.n for r in requests], self.size)
            busy = [i for i, share in enumerate(shares) if share]
            replies = self._call('infer', {i: ([requests[k] for k in shares[i]],) for i in busy})
            results: list = [None] * len(requests)
            versions = {}
            for i in busy:
                completions, versions[i] = replies[i]
                for k, c in zip(shares[i], completions):
                    results[k] = c
                self.rows[i] += sum(requests[k].n for k in shares[i])
            if len(set(versions.values())) > 1:
                raise WeightSyncError(f'the data-parallel replicas generated with different weights versions '
                                      f'{versions}: a weight update reached only some of them')
            return results, versions[busy[0]]

    def join_communicator(self, host: str, port: int, world_size: int, rank: int, backend: str,
                          timeout_s: float) -> None:
        w = self.world_size // self.size
        with self.lock:
            self._call('join_communicator', {i: (host, port, world_size, rank + i * w, backend, timeout_s)
                                             for i in range(self.size)}, timeout_s + CONTROL_TIMEOUT_S)
            self._sync_timeout_s = timeout_s

    def update_weights(self, layout: dict, last: bool) -> int:
        """Every replica receives the same broadcast and copies it; all must report the same version."""
        timeout = None if self._sync_timeout_s is None else self._sync_timeout_s + CONTROL_TIMEOUT_S
        with self.lock:
            versions = self._call('update_weights', self._everyone((layout, last)), timeout)
        if len(set(versions.values())) > 1:
            raise WeightSyncError(f'the data-parallel replicas disagree on the weights version after the update: '
                                  f'{versions}')
        return versions[0]

    def close_communicator(self) -> None:
        with self.lock:
            self._call('close_communicator', self._everyone(()), CONTROL_TIMEOUT_S)
            self._sync_timeout_s = None

    def reset_prefix_cache(self) -> None:
        with self.lock:
            self._call('reset_prefix_cache', self._everyone(()), CONTROL_TIMEOUT_S)

    def close(self) -> None:
        """Stop the workers (also at interpreter exit if never called)."""
        self._finalizer()
