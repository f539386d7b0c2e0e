"""``megaswift rollout`` as a real server process on 127.0.0.1, with trainers of real megatron-core models.

- the server's per-token log-probs equal megatron-core's on the same weights and are not shifted by one token
  (ms-swift PR #8196);
- a trainer's push (TP=1, TP=2, PP=2 over torchrun gloo) replaces the served weights: the version advances and the
  log-probs equal the trainer's; without the push they differ;
- kill -9 of the server during /infer or /update_weights: the client raises a clear error within its timeout, and
  a restarted server accepts a new /init_communicator.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip('fastapi')
pytest.importorskip('uvicorn')

from testing_utils import build_tiny_model, start_rollout_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# longer than a KV block (vLLM's 128 on CPU): a stale cached prefix would show in the log-probs of later tokens
PROMPT = [1, 504, 3458, 282, 4195, 314, 260, 2397, 28, 30] + [100 + (i * 7919) % 40000 for i in range(140)]
KEY = 'sk-rollout-test'


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
                PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


@pytest.fixture(scope='module')
def models(tmp_path_factory, smollm2_dir):
    """Two tiny Llamas with different weights (2 KV heads: TP=2 can split them; sharper logits than the default
    init so that samples and log-probs differ clearly between them)."""
    root = tmp_path_factory.mktemp('rollout_models')
    kw = dict(num_key_value_heads=2, initializer_range=0.2)
    return {'a': build_tiny_model(root / 'a', 'llama', smollm2_dir, seed=0, **kw),
            'b': build_tiny_model(root / 'b', 'llama', smollm2_dir, seed=1, **kw)}


@pytest.fixture(scope='module')
def servers(tmp_path_factory):
    """``start(model_dir, *flags) -> (process, url)``; every server still running is killed with the module."""
    procs = []

    def start(model_dir, *flags):
        proc, url = start_rollout_server(model_dir, tmp_path_factory.mktemp('rollout_server') / 'stderr.log', *flags,
                                         env=_env())
        procs.append(proc)
        return proc, url

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _run_trainer(tmp: Path, setup: dict, world: int) -> dict:
    setup_path = tmp / f'setup{world}.json'
    setup_path.write_text(json.dumps(setup))
    out = tmp / f'world{world}.json'
    script = str(HERE / 'trainer_case.py')
    cmd = ([sys.executable, script] if world == 1 else
           [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', script])
    env = {k: v for k, v in _env().items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                           'MASTER_PORT')}
    proc = subprocess.run([*cmd, str(out), str(setup_path)], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f'trainer at world size {world} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n'
                    f'{proc.stderr[-6000:]}')
    return json.loads(out.read_text())[f'world{world}']


def _max_diff(a, b) -> float:
    assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope='module')
def synced(models, servers, tmp_path_factory):
    """One server on model A; a TP=1 trainer checks it, then pushes B; then TP=2 pushes A and PP=2 pushes B."""
    _, url = servers(models['a'], '--weight_sync_bucket_mb', '4')
    tmp = tmp_path_factory.mktemp('rollout_trainer')
    setup = {'url': url, 'model_a': models['a'], 'model_b': models['b'], 'prompt': PROMPT, 'max_tokens': 16,
             'bucket_mb': 4}
    return {'url': url, 'tp1': _run_trainer(tmp, setup, 1), 'layouts': _run_trainer(tmp, setup, 2)}


def test_logprobs_match_megatron_and_are_not_shifted(synced):
    r = synced['tp1']
    server = r['before']['logprobs']
    assert len(r['before']['token_ids']) == 16 and r['before']['finish_reason'] == 'length'
    assert _max_diff(server, r['mcore_a']) <= 1e-4
    # the anchor bug: reading each token's log-prob from the logits at its own position
    assert _max_diff(server, r['mcore_a_shifted']) > 1e-2


def test_push_advances_version_and_matches_trainer(synced):
    r = synced['tp1']
    assert r['info_before']['weight_sync_bucket_mb'] == 4  # what the TP=1 push used (the embedding alone is 24 MiB)
    v0 = r['info_before']['weights_version']
    assert r['before']['weights_version'] == v0
    assert r['pushed_version'] == v0 + 1 == r['after']['weights_version'] == r['info_after']['weights_version']
    assert r['info_after']['prefix_cache_resets'] == r['info_before']['prefix_cache_resets'] + 1
    assert _max_diff(r['after']['logprobs'], r['mcore_b']) <= 1e-4
    # negative control: the server before the push (weights A) against the trainer's B on the same tokens
    assert _max_diff(r['before']['logprobs'], r['mcore_b_on_a_completion']) > 1e-2
    assert r['after']['token_ids'] != r['before']['token_ids']
    assert r['push_s'] < 30


def test_lora_push_sends_the_adapted_weights_merged(synced):
    r = synced['tp1']['lora']
    assert r['version'] == r['base_version'] + 1 == r['sample']['weights_version']
    # linear_qkv -> q/k/v_proj, linear_fc2 -> down_proj of every layer; nothing else (embedding, norms, o/gate/up)
    assert r['sent'] and all(n.endswith(('q_proj.weight', 'k_proj.weight', 'v_proj.weight', 'down_proj.weight'))
                             for n in r['sent']), r['sent']
    assert set(r['sent']) < set(r['all']) and not any('lora' in n for n in r['all'])
    assert _max_diff(r['sample']['logprobs'], r['mcore']) <= 1e-4  # the adapted model, served
    assert _max_diff(r['sample']['logprobs'], r['mcore_base']) > 1e-2  # not the base


def test_push_from_tp2_and_pp2_equals_tp1(synced):
    tp1, lay = synced['tp1'], synced['layouts']
    # first a push the server refused: both ranks raised (none left in a gather), nothing changed on the server
    assert 'no communicator' in lay['refused_rank0'] and synced['url'] in lay['refused_rank0']
    assert lay['refused_rank1'].startswith('WeightSyncError: weight sync failed on rank 0') and \
        'no communicator' in lay['refused_rank1']
    last = tp1['lora']['version']  # the TP=1 trainer's last push (A + LoRA)
    assert lay['info_after_refused']['weights_version'] == last
    # TP=2 pushed A back: the server serves what it loaded from A's HF checkpoint
    assert lay['tp2']['pushed_version'] == last + 1 == lay['tp2']['weights_version']
    assert lay['tp2']['token_ids'] == tp1['before']['token_ids']
    assert _max_diff(lay['tp2']['logprobs'], tp1['before']['logprobs']) <= 1e-6
    # PP=2 pushed B: the server serves what the TP=1 push of B gave
    assert lay['pp2']['pushed_version'] == lay['tp2']['pushed_version'] + 1 == lay['pp2']['weights_version']
    assert lay['pp2']['token_ids'] == tp1['after']['token_ids']
    assert _max_diff(lay['pp2']['logprobs'], tp1['after']['logprobs']) <= 1e-6


def test_infer_batch_n_seed_and_errors(synced):
    from megaswift.rollout import RolloutClient, RolloutError
    client = RolloutClient(synced['url'], read_timeout=60)
    reqs = [{'prompt_token_ids': PROMPT, 'n': 3, 'seed': 5}, {'prompt_token_ids': PROMPT[:4], 'n': 1, 'seed': 5},
            {'messages': [{'role': 'user', 'content': 'hi'}], 'n': 2, 'seed': 1}]
    a = client.infer(reqs, temperature=1.0, max_tokens=6)
    b = client.infer(reqs, temperature=1.0, max_tokens=6)
    assert a['results'] == b['results']  # seeded: the same completions
    assert [len(r['completions']) for r in a['results']] == [3, 1, 2]
    # the first two share a batch (left-padded): each equals its request served alone
    for req, batched in zip(reqs, a['results']):
        alone = client.infer([req], temperature=1.0, max_tokens=6)['results'][0]
        for c, d in zip(batched['completions'], alone['completions']):
            assert c['token_ids'] == d['token_ids'] and _max_diff(c['logprobs'], d['logprobs']) <= 1e-4
    assert len({tuple(c['token_ids']) for c in a['results'][0]['completions']}) > 1
    for r in a['results']:
        for c in r['completions']:
            assert len(c['token_ids']) == len(c['logprobs']) and all(lp <= 0 for lp in c['logprobs'])
            assert c['finish_reason'] in ('stop', 'length')
    assert a['results'][2]['prompt_token_ids'][-1] != PROMPT[-1]  # templated from messages
    with pytest.raises(RolloutError, match=r'400.*exactly one of'):
        client.infer([{'prompt_token_ids': PROMPT, 'messages': [{'role': 'user', 'content': 'x'}]}])
    # client errors are 400s (before: 500 IndexError / UndefinedError / TypeError), and text parts are joined
    for bad, match in (({'prompt_token_ids': [10 ** 9]}, "out of the model's vocabulary"),
                       ({'prompt_token_ids': [-1]}, 'greater than or equal to 0'),
                       ({'messages': [{'content': 'hi'}]}, r"'requests.0.messages.0.role' is required")):
        with pytest.raises(RolloutError, match=rf'400.*{match}'):
            client.infer([bad], max_tokens=2)
    parts = [{'role': 'user', 'content': [{'type': 'text', 'text': 'h'}, {'type': 'text', 'text': 'i'}]}]
    assert client.infer([{'messages': parts, 'n': 2, 'seed': 1}], temperature=1.0, max_tokens=6)['results'] == \
        a['results'][2:]
    with pytest.raises(RolloutError, match=r'400.*no communicator'):
        client.update_weights({'names': [], 'shapes': [], 'dtypes': []}, last=True, nbytes=0)


def test_openai_routes_serve_the_synced_weights(synced):
    """The rollout server also answers OpenAI chat requests (the official client), on the weights the trainers
    pushed and generating under the lock the pushes take: a greedy chat answer and its log-probs equal /infer's
    greedy completion of the same conversation."""
    openai = pytest.importorskip('openai')
    from megaswift.rollout import RolloutClient
    client = openai.OpenAI(base_url=synced['url'] + '/v1', api_key='unused', max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    messages = [{'role': 'user', 'content': 'hi'}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True)
    chat = [t.logprob for t in reply.choices[0].logprobs.content]
    infer = RolloutClient(synced['url'], read_timeout=60).infer([{'messages': messages}], temperature=0.0,
                                                                 max_tokens=6)['results'][0]['completions'][0]
    assert len(chat) == len(infer['logprobs']) > 0, (reply, infer)
    assert _max_diff(chat, infer['logprobs']) <= 1e-4, (chat, infer)


def _raises_within(fn, timeout: float):
    from megaswift.rollout import RolloutError
    t0 = time.monotonic()
    with pytest.raises(RolloutError) as info:
        fn()
    elapsed = time.monotonic() - t0
    assert elapsed < timeout, elapsed
    return str(info.value), elapsed


def test_kill_during_infer_gives_a_clear_error(models, servers):
    from megaswift.rollout import RolloutClient, RolloutError
    proc, url = servers(models['a'], '--api_key', KEY)
    client = RolloutClient(url, api_key=KEY, connect_timeout=2, read_timeout=30, retries=2, backoff=0.2)
    assert client.info()['weights_version'] == 0
    with pytest.raises(RolloutError, match='401'):  # the key is required
        RolloutClient(url).info()
    threading.Timer(0.5, lambda: os.kill(proc.pid, signal.SIGKILL)).start()
    message, _ = _raises_within(lambda: client.infer([{'prompt_token_ids': PROMPT, 'n': 8, 'max_tokens': 2000}]),
                                timeout=30)
    assert url in message and '/infer' in message and '3 attempts' in message
    proc.wait(timeout=10)


def test_kill_during_update_weights_then_restart(models, servers):
    import torch
    from safetensors.torch import load_file

    from megaswift.rollout import RolloutClient, push_named_tensors
    weights = load_file(str(Path(models['b']) / 'model.safetensors'))
    # 1. killed while its /update_weights handler waits for the bucket's broadcast
    proc, url = servers(models['a'])
    client = RolloutClient(url, connect_timeout=2, read_timeout=20)
    client.init_communicator(timeout_s=20)
    name = 'model.norm.weight'
    layout = {'names': [name], 'shapes': [list(weights[name].shape)], 'dtypes': ['float32']}
    threading.Timer(1.0, lambda: os.kill(proc.pid, signal.SIGKILL)).start()
    message, _ = _raises_within(lambda: client.update_weights(layout, last=True, nbytes=weights[name].numel() * 4),
                                timeout=20)
    assert url in message and '/update_weights' in message
    proc.wait(timeout=10)
    client.close_communicator()

    # 2. a restarted server accepts a new communicator; killed mid-sync (after two buckets), the push fails fast
    proc, url = servers(models['a'])
    client = RolloutClient(url, connect_timeout=2, read_timeout=20)
    client.init_communicator(timeout_s=20)
    ordered = sorted(weights.items())

    def pairs():
        for i, (n, t) in enumerate(ordered):
            if i == 4:  # buckets 1 and 2 are applied by now; bucket 3 is about to go
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            yield n, t
    message, _ = _raises_within(lambda: push_named_tensors(client, pairs(), bucket_mb=0.001), timeout=20)
    assert url in message
    client.close_communicator()

    # 3. a third server: the full push works and the served weights are B's
    proc, url = servers(models['a'])
    client = RolloutClient(url, read_timeout=60)
    client.init_communicator(timeout_s=20)
    assert push_named_tensors(client, ordered, bucket_mb=1) == 1
    client.close_communicator()
    assert client.info()['communicator'] is False
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(models['b'], dtype=torch.float32).eval()
    out = client.infer([{'prompt_token_ids': PROMPT, 'temperature': 0, 'max_tokens': 4}])['results'][0]
    ids = torch.tensor([PROMPT + out['completions'][0]['token_ids']])
    with torch.no_grad():
        logp = ref(ids).logits.float().log_softmax(-1)[0]
    expect = [float(logp[len(PROMPT) - 1 + i, t]) for i, t in enumerate(out['completions'][0]['token_ids'])]
    assert _max_diff(out['completions'][0]['logprobs'], expect) <= 1e-4


def test_refused_bucket_fails_fast_instead_of_waiting_for_the_broadcast(models, servers):
    """A bucket the server refuses before joining its broadcast (here 413: its layout is over --max_request_bytes)
    fails the push at once; the trainer does not sit in the broadcast until the group's timeout."""
    from safetensors.torch import load_file

    from megaswift.rollout import RolloutClient, RolloutError, push_named_tensors
    proc, url = servers(models['a'], '--max_request_bytes', '400')
    client = RolloutClient(url, connect_timeout=2, read_timeout=120)
    client.init_communicator(timeout_s=120)
    weights = sorted(load_file(str(Path(models['b']) / 'model.safetensors')).items())
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match='413') as info:
        push_named_tensors(client, weights, bucket_mb=1)  # bucket 1: the embedding alone (a short layout)
    assert time.monotonic() - t0 < 20
    assert url in str(info.value) and client.group is None
    assert client.info()['weights_version'] == 0 and client.info()['communicator'] is False
    client.init_communicator(timeout_s=30)  # the server takes a new group afterwards
    assert client.info()['communicator'] is True
    client.close_communicator()


def test_cli_refuses_bad_flags(run_main):
    for flags, message in ((['--data_parallel_size', '0'], 'must be >= 1'),
                           (['--infer_backend', 'tgi'], "unknown 'tgi'"),
                           (['--weight_sync_bucket_mb', '0'], 'must be > 0')):
        proc = run_main(['rollout', '--model', 'x', *flags])
        assert proc.returncode != 0 and message in proc.stderr, (flags, proc.stderr[-2000:])
