"""``megaswift rollout --data_parallel_size 2``: two engine replicas (worker processes) behind one real server
process on 127.0.0.1, with the tiny models and the server launcher of ``test_rollout.py``.

- a seeded batch (``n`` > 1, a ``messages`` prompt) gives the same token ids and log-probs as one in-process
  engine, and both replicas generated part of it;
- a push of model B's weights reaches both replicas: every completion of a batch split across them has B's
  log-probs (teacher-forced) and the version advanced; the completions before the push do not (negative control);
- kill -9 of one replica during /infer: a clear error naming the replica and its exit code within the client's
  timeout, not a hang; the server still answers /info and refuses the next /infer at once.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from test_rollout import PROMPT, _max_diff, _raises_within, models, servers  # noqa: F401 - fixtures and helpers

# n = 3, 1, 2, 2: eight rows, four on each replica
BATCH = [{'prompt_token_ids': PROMPT, 'n': 3, 'seed': 5}, {'prompt_token_ids': PROMPT[:4], 'seed': 5},
         {'prompt_token_ids': PROMPT[:7], 'n': 2, 'seed': 11},
         {'messages': [{'role': 'user', 'content': 'hi'}], 'n': 2, 'seed': 1}]
SAMPLING = {'temperature': 1.0, 'max_tokens': 8}


@pytest.fixture(scope='module')
def dp(models, servers):
    """One server with two replicas of model A; the tests run in order and the last one kills a replica."""
    from megaswift.rollout import RolloutClient
    proc, url = servers(models['a'], '--data_parallel_size', '2')
    return {'proc': proc, 'url': url, 'client': RolloutClient(url, connect_timeout=2, read_timeout=60), 'seen': {}}


@pytest.fixture(scope='module')
def reference(models):
    """Model A and model B in this process: one engine each (data_parallel_size 1)."""
    from megaswift.rollout import TransformersRolloutEngine
    return {k: TransformersRolloutEngine(models[k], 'float32') for k in ('a', 'b')}


def _reference_infer(engine, served: dict) -> list[list[dict]]:
    """``engine``'s completions of BATCH, on the prompt ids the server used (``messages`` templated there)."""
    from megaswift.rollout.engine import SamplingRequest
    reqs = [SamplingRequest(r['prompt_token_ids'], q.get('n', 1), SAMPLING['temperature'],
                            max_tokens=SAMPLING['max_tokens'], seed=q['seed'])
            for q, r in zip(BATCH, served['results'])]
    return engine.infer(reqs)[0]


def _completions(served: dict) -> list[list[dict]]:
    return [r['completions'] for r in served['results']]


def _rows(info: dict) -> list[int]:
    return [r['rows'] for r in info['replicas']]


def _teacher_forced(engine, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt + tokens[:i]) under ``engine``'s model."""
    import torch
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = engine.model(ids).logits.float().log_softmax(-1)[0]
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


@pytest.mark.slow
def test_seeded_batch_equals_one_engine_and_both_replicas_work(dp, reference):
    client = dp['client']
    info = client.info()
    assert info['world_size'] == 2 and info['weights_version'] == 0 and len(info['replicas']) == 2
    pids = [r['pid'] for r in info['replicas']]
    assert len(set(pids)) == 2 and dp['proc'].pid not in pids and all(r['alive'] for r in info['replicas'])
    served = client.infer(BATCH, **SAMPLING)
    rows = _rows(client.info())
    assert [a - b for a, b in zip(rows, _rows(info))] == [4, 4]  # balanced by rows (prompt x n)
    assert served['weights_version'] == 0 and [len(c) for c in _completions(served)] == [3, 1, 2, 2]
    assert served['results'][3]['prompt_token_ids'] == reference['a'].prompt_ids(BATCH[3]['messages'])
    for got, want in zip(_completions(served), _reference_infer(reference['a'], served)):
        for c, d in zip(got, want):
            assert c['token_ids'] == d['token_ids'] and c['finish_reason'] == d['finish_reason']
            assert _max_diff(c['logprobs'], d['logprobs']) <= 1e-5
    assert len({tuple(c['token_ids']) for c in served['results'][0]['completions']}) > 1  # sampled, not greedy
    dp['seen']['before'] = served
    from megaswift.rollout import RolloutError
    with pytest.raises(RolloutError, match='400.*empty prompt'):  # a replica's ValueError is still a bad request
        client.infer([{'prompt_token_ids': PROMPT}, {'prompt_token_ids': []}])
    # no in-process engine behind a data-parallel server: the OpenAI routes are not served, /infer is
    import requests
    assert requests.get(dp['url'] + '/v1/models', timeout=10).status_code == 404


@pytest.mark.slow
def test_push_reaches_both_replicas(dp, reference, models):
    from safetensors.torch import load_file

    from megaswift.rollout import push_named_tensors
    client = dp['client']
    client.init_communicator(timeout_s=60)  # the group: trainer rank 0 + one rank per replica
    info = client.info()
    assert info['communicator'] is True and info['world_size'] == 2
    weights = sorted(load_file(str(Path(models['b']) / 'model.safetensors')).items())
    assert push_named_tensors(client, weights, bucket_mb=4) == 1  # several buckets: the embedding alone is 24 MiB
    client.close_communicator()
    served = client.infer(BATCH, **SAMPLING)
    after = client.info()
    assert served['weights_version'] == 1 == after['weights_version'] and after['prefix_cache_resets'] == 1
    assert [r['weights_version'] for r in after['replicas']] == [1, 1] and after['communicator'] is False
    assert all(a > b for a, b in zip(_rows(after), _rows(info)))  # both replicas served this batch
    # every completion, whichever replica made it, is B's: B's own sample, and B's log-probs teacher-forced
    for result, want in zip(served['results'], _reference_infer(reference['b'], served)):
        for c, d in zip(result['completions'], want):
            assert c['token_ids'] == d['token_ids'] and _max_diff(c['logprobs'], d['logprobs']) <= 1e-4
            assert _max_diff(c['logprobs'], _teacher_forced(reference['b'], result['prompt_token_ids'],
                                                            c['token_ids'])) <= 1e-4
    # negative control: the completions served before the push were not B's
    before = dp['seen'].get('before') or pytest.skip('needs the first test')
    for result in before['results']:
        for c in result['completions']:
            assert _max_diff(c['logprobs'], _teacher_forced(reference['b'], result['prompt_token_ids'],
                                                            c['token_ids'])) > 1e-2
    assert _completions(before) != _completions(served)


@pytest.mark.slow
def test_killed_replica_gives_a_clear_error(dp):
    from megaswift.rollout import RolloutClient
    client = RolloutClient(dp['url'], connect_timeout=2, read_timeout=30, retries=2, backoff=0.2)
    victim = client.info()['replicas'][1]['pid']
    threading.Timer(0.5, lambda: os.kill(victim, signal.SIGKILL)).start()
    long = [{'prompt_token_ids': PROMPT, 'n': 8, 'max_tokens': 2000, 'seed': 0},
            {'prompt_token_ids': PROMPT[:5], 'n': 8, 'max_tokens': 2000, 'seed': 0}]
    message, _ = _raises_within(lambda: client.infer(long), timeout=30)
    assert '/infer answered 500' in message, message
    assert f'replica 1 of 2 (pid {victim}) died: exit code -9 (killed by signal 9)' in message, message
    # the server itself is alive: /info shows the dead replica, and the next /infer fails at once
    info = client.info()
    assert [r['alive'] for r in info['replicas']] == [True, False]
    message, elapsed = _raises_within(lambda: client.infer([{'prompt_token_ids': PROMPT, 'max_tokens': 2}]),
                                      timeout=5)
    assert f'pid {victim}' in message and 'restart the server' in message, message
    assert dp['proc'].poll() is None


def test_split_by_rows_and_device_plan(monkeypatch):
    import torch

    from megaswift.rollout.data_parallel import device_plan, split_by_rows
    assert split_by_rows([3, 1, 2, 2], 2) == [[0, 1], [2, 3]]  # BATCH: 4 rows each, request order kept
    assert split_by_rows([1, 1, 1], 2) == [[0, 2], [1]] and split_by_rows([5], 3) == [[0], [], []]
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,5,6,7')
    assert device_plan(2, None) == ['4,5', '6,7'] and device_plan(3, None) == ['4', '5', '6']
    assert device_plan(2, 'cpu') == [None, None]
    with pytest.raises(ValueError, match='needs at least 8 GPUs, 4 visible'):
        device_plan(8, None)
    with pytest.raises(ValueError, match='needs at least 6 GPUs, 4 visible'):
        device_plan(2, None, per_replica=3)  # tensor parallel replicas
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    assert device_plan(2, None) == [None, None]
