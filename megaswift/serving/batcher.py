"""The engine side of a server: one worker thread owns the engine; requests queue up and leave in batches.

Fair scheduling. A request's ``n`` choices are cut into pieces of at most ``max_batch_size`` sequences
(``split_choices``). Each cycle the worker takes the next piece of every waiting request in turn, round robin,
until the cycle holds ``max_batch_size`` sequences (its first piece always goes in), and runs them; the requests
that got a piece then go to the back of the line, behind those that arrived meanwhile. So a request of large
``n`` is interleaved with the others: one sent behind it is answered after about one cycle, not after all of
its ``n``. A request that timed out (or whose stream's client left) loses its remaining pieces.

Batching. Pieces of one cycle with the same sampling parameters share one ``engine.infer`` call (dynamic
batching), except where sharing would change an answer: a seeded engine draws a repeated prompt's samples by its
rank among the equal prompts of the call, so equal seeded requests never share one. (The engine itself decodes
together only prompts it leaves the same room, so a long prompt never shortens the answers batched with it.) A
call that fails is retried request by request, so a bad request (e.g. a prompt that leaves no room) fails alone.
A stream runs alone, piece by piece, its steps handed to the event loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import asdict, dataclass, field, replace

from ..infer_engine import ChatCompletionResponse, InferEngine, InferRequest, RequestConfig
from ..infer_engine.protocol import UsageInfo

_END = object()


def piece_seed(seed: int, piece: int) -> int:
    """The seed of piece ``piece`` (> 0) of a seeded request: a function of the request's seed alone."""
    digest = hashlib.blake2b(f'{seed}/{piece}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'big') >> 1


def split_choices(cfg: RequestConfig, size: int) -> list[tuple[int, RequestConfig]]:
    """``cfg``'s ``n`` choices as pieces of at most ``size``: (index of the piece's first choice, its config).
    A request of at most ``size`` choices is one piece with ``cfg`` itself; in a longer seeded one, piece j > 0
    is seeded with ``piece_seed(seed, j)``, so its samples depend on the request and ``size`` only."""
    if cfg.n <= size:
        return [(0, cfg)]
    return [(first, replace(cfg, n=min(size, cfg.n - first),
                            seed=cfg.seed if cfg.seed is None or j == 0 else piece_seed(cfg.seed, j)))
            for j, first in enumerate(range(0, cfg.n, size))]


def merge_pieces(parts: list[tuple[int, ChatCompletionResponse]]) -> ChatCompletionResponse:
    """One response from its pieces' responses (each with the index of its first choice)."""
    if len(parts) == 1:
        return parts[0][1]
    parts = sorted(parts, key=lambda part: part[0])
    head = parts[0][1]
    choices = [replace(c, index=first + c.index) for first, response in parts for c in response.choices]
    completion = sum(response.usage.completion_tokens for _, response in parts)
    usage = UsageInfo(head.usage.prompt_tokens, completion, head.usage.prompt_tokens + completion)
    return replace(head, choices=choices, usage=usage)


@dataclass(eq=False)
class _Job:
    """A request in the worker's line: its pieces still to run and where its answer goes (``future`` for a whole
    answer, ``stream`` for a stream's steps)."""
    request: InferRequest
    pieces: deque
    future: Future | None = None
    stream: 'EngineStream | None' = None
    done: list = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return self.future.cancelled() if self.stream is None else self.stream.cancelled.is_set()

    def fail(self, error: BaseException) -> None:
        self.pieces.clear()
        if self.stream is not None:
            self.stream.finish(error)
        elif not self.future.cancelled():
            _settle(self.future.set_exception, error)

    def piece_done(self, first: int, response: ChatCompletionResponse) -> None:
        self.done.append((first, response))
        if not self.pieces and not self.future.cancelled():
            _settle(self.future.set_result, merge_pieces(self.done))


def _settle(setter, value) -> None:
    try:
        setter(value)
    except InvalidStateError:  # cancelled (timed out) a moment ago: nobody waits for it
        pass


class DynamicBatcher:

    def __init__(self, engine: InferEngine, max_batch_size: int = 32, wait_ms: float = 5.0, lock=None):
        self.engine, self.max_batch_size, self.wait = engine, max_batch_size, wait_ms / 1000
        # held while the engine runs (batches and streams); a rollout server passes the lock its weight updates take
        self.lock = lock if lock is not None else threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name='megaswift-batcher').start()

    def submit(self, request: InferRequest, cfg: RequestConfig) -> Future:
        """A future of the response; cancelling it drops the pieces of the request not yet run."""
        fut: Future = Future()
        self.queue.put(_Job(request, deque(split_choices(cfg, self.max_batch_size)), future=fut))
        return fut

    async def infer(self, request: InferRequest, cfg: RequestConfig, timeout: float | None):
        """The response, or TimeoutError after ``timeout`` seconds (its pieces not yet run are then dropped)."""
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(request, cfg)), timeout)

    def stream(self, request: InferRequest, cfg: RequestConfig, timeout: float | None) -> 'EngineStream':
        stream = EngineStream(timeout)
        self.queue.put(_Job(request, deque(split_choices(cfg, self.max_batch_size)), stream=stream))
        return stream

    # ---------------------------------------------------------------- the worker
    def _work(self) -> None:
        waiting: list[_Job] = []  # in line order: not served last cycle
        served: list[_Job] = []   # served last cycle: they go behind the requests that arrived meanwhile
        while True:
            if not waiting and not served:
                self._admit(self.queue.get(), waiting)
                self._gather(waiting)
            arrived: list[_Job] = []
            while not self.queue.empty():
                self._admit(self.queue.get_nowait(), arrived)
            line = [job for job in (*waiting, *arrived, *served) if job.pieces and not job.dropped]
            served, waiting = self._cycle(line)
            self._run(served)

    def _admit(self, job: _Job, line: list) -> None:
        """``job`` joins ``line``, unless it was dropped already."""
        if not job.dropped:
            line.append(job)

    def _gather(self, line: list) -> None:
        """Wait up to ``wait_ms`` for more requests to share the first cycle, while it has room."""
        deadline = time.monotonic() + self.wait
        while sum(job.pieces[0][1].n for job in line) < self.max_batch_size:
            try:
                self._admit(self.queue.get(timeout=max(0.0, deadline - time.monotonic())), line)
            except queue.Empty:
                return

    def _cycle(self, line: list) -> tuple[list[_Job], list[_Job]]:
        """(the jobs whose next piece runs this cycle, the ones that wait), in line order."""
        taken, waiting, sequences = [], [], 0
        for job in line:
            n = job.pieces[0][1].n
            if taken and sequences + n > self.max_batch_size:
                waiting.append(job)
            else:
                taken.append(job)
                sequences += n
        return taken, waiting

    def _run(self, taken: list[_Job]) -> None:
        """Run the next piece of every job in ``taken``: the batchable ones grouped, each stream alone."""
        groups: dict[tuple, list] = {}
        equal_seeded: Counter = Counter()
        for job in taken:
            first, cfg = job.pieces.popleft()
            if job.stream is not None:
                self._run_stream_piece(job, first, cfg)
                continue
            same = json.dumps(asdict(cfg), sort_keys=True)
            rank = 0
            if cfg.seed is not None:  # the k-th equal seeded prompt of the cycle goes to the k-th call
                prompt = json.dumps([job.request.messages, job.request.tools], sort_keys=True, default=str)
                rank = equal_seeded[same, prompt]
                equal_seeded[same, prompt] += 1
            groups.setdefault((same, rank), []).append((job, first, cfg))
        for group in groups.values():
            self._infer_group(group)

    def _infer_group(self, group: list) -> None:
        try:
            with self.lock:
                results = self.engine.infer([job.request for job, _, _ in group], group[0][2])
            for (job, first, _), response in zip(group, results):
                job.piece_done(first, response)
        except Exception as e:
            if len(group) > 1:  # one bad request must not fail the others: one by one
                for item in group:
                    self._infer_group([item])
            else:
                group[0][0].fail(e)

    def _run_stream_piece(self, job: _Job, first: int, cfg: RequestConfig) -> None:
        stream = job.stream
        try:
            with self.lock:
                steps = self._steps(job.request, cfg)
                for deltas, finish, logprobs in steps:
                    if stream.cancelled.is_set():
                        break
                    if stream.past_deadline():
                        raise TimeoutError('the stream ran past the request timeout')
                    stream.put((first, deltas, finish, logprobs))
                if hasattr(steps, 'close'):
                    steps.close()
        except BaseException as e:  # handed to the event loop, raised by __anext__
            job.fail(e)
            return
        if not job.pieces:
            stream.finish()

    def _steps(self, request: InferRequest, cfg: RequestConfig):
        """The engine's ``infer_stream`` steps; an engine without token streaming gives the answer as one step."""
        if hasattr(self.engine, 'infer_stream'):
            return self.engine.infer_stream(request, cfg)
        response = self.engine.infer([request], cfg)[0]
        return iter([([c.message.content for c in response.choices], [c.finish_reason for c in response.choices],
                      [c.logprobs.content if c.logprobs else [] for c in response.choices]
                      if cfg.logprobs else None)])


class EngineStream:
    """Async iterator over ``(first, deltas, finish, logprobs)`` steps of one request: the text deltas of the
    choices ``first, first + 1, ...`` of a piece, their finish reasons on the piece's last step (else None) and,
    with ``logprobs``, their new tokens' entries (see ``infer_stream``).

    An engine error is raised by the iterator; so is TimeoutError once ``timeout`` seconds (waiting for the
    engine included) have passed. Call ``close()`` when done: the worker stops at its next step.
    """

    def __init__(self, timeout: float | None):
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is listening any more
            self.cancelled.set()

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.put(error)
        self.put(_END)

    def __aiter__(self):
        return self

    async def __anext__(self):
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            item = await asyncio.wait_for(self.items.get(), left)
        except TimeoutError:
            self.close()
            raise TimeoutError('waited too long for the engine') from None
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.cancelled.set()
