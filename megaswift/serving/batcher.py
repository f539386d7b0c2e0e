"""The engine side of a server: one worker thread owns the engine; requests queue up and leave in batches.

Concurrent requests with the same sampling parameters are batched into one ``engine.infer`` call (dynamic
batching), so many clients share decode steps. A stream holds the engine alone while it runs, in a thread
of its own, and hands its steps to the event loop; a client that goes away stops it at the next step.
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict

from ..infer_engine import InferEngine, InferRequest, RequestConfig

_END = object()


class DynamicBatcher:

    def __init__(self, engine: InferEngine, max_batch_size: int = 32, wait_ms: float = 5.0, lock=None):
        self.engine, self.max_batch_size, self.wait = engine, max_batch_size, wait_ms / 1000
        # held while the engine runs (batches and streams); a rollout server passes the lock its weight updates take
        self.lock = lock if lock is not None else threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name='megaswift-batcher').start()

    def submit(self, request: InferRequest, cfg: RequestConfig) -> Future:
        """A future of the response; cancelling it before its batch starts drops the request."""
        fut: Future = Future()
        self.queue.put((request, cfg, fut))
        return fut

    def _work(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(items) < self.max_batch_size:
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[str, list] = {}
            for item in items:
                if item[2].set_running_or_notify_cancel():  # False: cancelled (timed out) while queued
                    groups.setdefault(json.dumps(asdict(item[1]), sort_keys=True), []).append(item)
            for group in groups.values():
                self._infer_group(group)

    def _infer_group(self, group: list) -> None:
        try:
            with self.lock:
                results = self.engine.infer([g[0] for g in group], group[0][1])
            for (_, _, fut), res in zip(group, results):
                fut.set_result(res)
        except Exception as e:
            if len(group) > 1:  # one bad request (e.g. a prompt too long) must not fail the others: one by one
                for item in group:
                    self._infer_group([item])
            else:
                group[0][2].set_exception(e)

    async def infer(self, request: InferRequest, cfg: RequestConfig, timeout: float | None):
        """The response, or TimeoutError after ``timeout`` seconds (a queued request is then dropped)."""
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(request, cfg)), timeout)

    def stream(self, request: InferRequest, cfg: RequestConfig, timeout: float | None) -> 'EngineStream':
        return EngineStream(self, request, cfg, timeout)


class EngineStream:
    """Async iterator over ``(deltas, finish, logprobs)`` steps of one request (see ``infer_stream``).

    Engines without token streaming give the whole answer as one step. An engine error is raised by the
    iterator; so is TimeoutError once ``timeout`` seconds (waiting for the engine included) have passed.
    Call ``close()`` when done: the worker stops at its next step.
    """

    def __init__(self, batcher: DynamicBatcher, request: InferRequest, cfg: RequestConfig, timeout: float | None):
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.deadline = None if timeout is None else time.monotonic() + timeout
        threading.Thread(target=self._run, args=(batcher, request, cfg), daemon=True, name='megaswift-stream').start()

    def _left(self) -> float:
        return -1 if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is listening any more
            self.cancelled.set()

    def _run(self, batcher: DynamicBatcher, request: InferRequest, cfg: RequestConfig) -> None:
        try:
            if not batcher.lock.acquire(timeout=self._left()):
                raise TimeoutError('waited too long for the engine')
            try:
                engine = batcher.engine
                if hasattr(engine, 'infer_stream'):
                    steps = engine.infer_stream(request, cfg)
                else:
                    response = engine.infer([request], cfg)[0]
                    steps = iter([([c.message.content for c in response.choices],
                                   [c.finish_reason for c in response.choices],
                                   [c.logprobs.content if c.logprobs else [] for c in response.choices]
                                   if cfg.logprobs else None)])
                for step in steps:
                    if self.cancelled.is_set():
                        break
                    if self.deadline is not None and time.monotonic() > self.deadline:
                        raise TimeoutError('the stream ran past the request timeout')
                    self._put(step)
                if hasattr(steps, 'close'):
                    steps.close()
            finally:
                batcher.lock.release()
        except BaseException as e:  # handed to the event loop, raised by __anext__
            self._put(e)
        finally:
            self._put(_END)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.items.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.cancelled.set()
