"""The server's engine side in-process, on the real transformers engine: timeouts free the client, a request that
timed out while queued never runs, and a stream stops when its time is up or its client leaves."""
import asyncio
import time

import pytest

from megaswift.infer_engine import InferRequest, RequestConfig, TransformersEngine
from megaswift.serving.batcher import DynamicBatcher

LONG = RequestConfig(max_tokens=400, temperature=0)


@pytest.fixture(scope='module')
def batcher(tiny_llama_dir):
    engine = TransformersEngine(tiny_llama_dir, torch_dtype='float32')
    engine.calls = []
    infer = engine.infer

    def recorded_infer(requests, cfg):  # the real engine; only the prompts it was asked for are noted
        engine.calls.append([r.messages[0]['content'] for r in requests])
        return infer(requests, cfg)
    engine.infer = recorded_infer
    return DynamicBatcher(engine, max_batch_size=1, wait_ms=0)


def ask(q):
    return InferRequest([{'role': 'user', 'content': q}])


def test_timeouts_free_the_client_and_drop_queued_requests(batcher):
    async def run():
        running = asyncio.ensure_future(batcher.infer(ask('running'), RequestConfig(max_tokens=150, temperature=0),
                                                      None))
        await asyncio.sleep(0.05)  # 'running' holds the engine (150 steps: ~0.5 s here)
        with pytest.raises(TimeoutError):
            await batcher.infer(ask('queued'), LONG, 0.05)
        await running
        return await batcher.infer(ask('after'), RequestConfig(max_tokens=2, temperature=0), None)
    response = asyncio.run(run())
    assert len(response.choices) == 1
    assert ['queued'] not in batcher.engine.calls and batcher.engine.calls[-1] == ['after']


def test_a_request_arriving_while_large_n_runs_goes_before_its_next_piece(batcher):
    """max_batch_size 1: n=3 is three pieces; a request that arrives during the first runs before the second."""
    async def run():
        large = asyncio.ensure_future(batcher.infer(ask('large'), RequestConfig(max_tokens=60, temperature=1, n=3),
                                                    None))
        await asyncio.sleep(0.05)  # the first piece of 'large' holds the engine
        normal = await batcher.infer(ask('normal'), RequestConfig(max_tokens=2, temperature=0), None)
        return await large, normal
    batcher.engine.calls.clear()
    large, normal = asyncio.run(run())
    assert batcher.engine.calls == [['large'], ['normal'], ['large'], ['large']]
    assert [c.index for c in large.choices] == [0, 1, 2] and len(normal.choices) == 1


def test_stream_times_out_and_stops(batcher):
    async def run(timeout):
        steps, start = 0, time.monotonic()
        stream = batcher.stream(ask('stream'), LONG, timeout)
        try:
            async for _ in stream:
                steps += 1
        except TimeoutError:
            return steps, time.monotonic() - start, True
        return steps, time.monotonic() - start, False
    steps, seconds, timed_out = asyncio.run(run(0.2))
    assert timed_out and 0 < steps < 400 and seconds < 5


def test_closed_stream_releases_the_engine(batcher):
    async def run():
        stream = batcher.stream(ask('stream'), LONG, None)
        await stream.__anext__()
        stream.close()  # the client went away
        start = time.monotonic()
        await batcher.infer(ask('next'), RequestConfig(max_tokens=2, temperature=0), 30)
        return time.monotonic() - start
    assert asyncio.run(run()) < 5  # not the rest of a 400-token stream
