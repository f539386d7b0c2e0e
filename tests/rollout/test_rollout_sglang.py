"""``megaswift rollout --infer_backend sglang`` (``rollout/sglang_engine.py``) and the ``named_group`` weight sync.

CPU, always:
- the pure request/result mapping: one SGLang request per completion with its own seed, SGLang's outputs back to
  ``{token_ids, logprobs, finish_reason}``; the checkpoint's names and shapes a push is checked against;
- the ``named_group`` protocol end to end, with the transformers engine as the server: its receiver forms the
  group exactly as SGLang's schedulers do (a ``tcp://`` rendezvous on the trainer's store, then
  ``join_named_group``), the trainer's ``RolloutClient`` forms its end from ``/info``, and the pushed weights are
  the served ones (log-probs equal an HF forward of them, <= 1e-4; before the push they differ).

GPU, skipped without sglang and CUDA (written for one H100; not yet run there): a real SGLang server process on
model A and a megatron-core trainer (``trainer_case.world1``): SGLang's log-probs on a prompt of more than two
16-token KV pages equal megatron-core's (fp32, <= 1e-4) and are not shifted; after the push of model B the version
advanced, the prefix cache was flushed and the log-probs equal B's; before it they differ (negative control).
The trainer shares the GPU with SGLang, so its weight-sync group is gloo (NCCL refuses two ranks on one GPU).

Run as a script this file is those tests' server or trainer:
    python test_rollout_sglang.py serve-named MODEL     # transformers engine with a named_group receiver
    python test_rollout_sglang.py serve-sglang MODEL    # SGLangRolloutEngine(MODEL, 'float32', **GPU_ENGINE_KWARGS)
    python test_rollout_sglang.py train OUT SETUP       # trainer_case.world1 with a gloo weight-sync group
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from megaswift.rollout.client import RolloutClient
from megaswift.rollout.engine import SamplingRequest
from megaswift.rollout.sglang_engine import (SGLangRolloutEngine, check_sglang, completion,
                                             sglang_requests, split_completions)
from megaswift.rollout.weight_sync import (WeightReceiver, WeightSyncError, broadcast, broadcast_device,  # noqa: E402
                                           checkpoint_params, drop_group, join_named_group, named_group_name, nbytes,
                                           unflatten)
from test_rollout import PROMPT, _env, _max_diff, models  # noqa: F401 - the tiny models A and B (a fixture)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# SGLang and the trainer share one GPU: a third of it for SGLang. fp32 (the trainer_case models are fp32; bf16 on
# either side would not meet 1e-4) needs an attention backend that computes in fp32 (torch_native: SDPA); whether
# every other SGLang CUDA kernel (norms, activations) takes fp32 is not verified: a server that does not start says
# so in its log. 16-token KV pages.
GPU_ENGINE_KWARGS = dict(mem_fraction_static=0.3, page_size=16, attention_backend='torch_native',
                         disable_cuda_graph=True)
GPU_PROMPT_TEXT = ('The weight-sync test prompt runs over more than two KV pages of sixteen tokens each, so that the '
                   'log-probs of its completion come from attention across page boundaries in the SGLang server.')


# ---------------------------------------------------------------- CPU: request and result mapping
def test_one_sglang_request_per_completion_with_its_own_seed():
    reqs = [SamplingRequest([1, 2, 3], n=3, temperature=0.7, top_p=0.9, top_k=5, max_tokens=8, seed=11),
            SamplingRequest([4, 5], n=1, temperature=0.0, max_tokens=9, seed=None)]
    ids, params = sglang_requests(reqs, [8, 3])
    assert ids == [[1, 2, 3]] * 3 + [[4, 5]]
    assert all(p['n'] == 1 for p in params) and 'stop' not in params[0]
    assert {k: params[0][k] for k in ('temperature', 'top_p', 'top_k', 'max_new_tokens', 'repetition_penalty')} == \
        {'temperature': 0.7, 'top_p': 0.9, 'top_k': 5, 'max_new_tokens': 8, 'repetition_penalty': 1.0}
    assert (params[3]['temperature'], params[3]['top_k'], params[3]['max_new_tokens']) == (0.0, -1, 3)  # the cut
    seeds = [p['sampling_seed'] for p in params]
    assert len(set(seeds[:3])) == 3 and all(0 <= s < 2 ** 31 for s in seeds)
    again = [p['sampling_seed'] for p in sglang_requests(reqs, [8, 3])[1]]
    assert again[:3] == seeds[:3]  # a seeded request draws the same seeds every time
    assert sglang_requests([SamplingRequest([1], seed=2 ** 70)], [1])[1][0]['sampling_seed'] < 2 ** 31


def _out(ids, lps, reason, output_ids=None):
    meta = {'finish_reason': reason, 'output_token_logprobs': [(lp, t, None) for lp, t in zip(lps, ids)]}
    return {'text': '...', 'output_ids': ids if output_ids is None else output_ids, 'meta_info': meta}


def test_sglang_outputs_map_back_to_completions():
    stop = _out([5, 7, 2], [-0.5, -1.25, -0.1], {'type': 'stop', 'matched': 2})
    assert completion(stop) == {'token_ids': [5, 7, 2], 'logprobs': [-0.5, -1.25, -0.1], 'finish_reason': 'stop'}
    assert completion(_out([9], [-2.0], {'type': 'length', 'length': 1}))['finish_reason'] == 'length'
    assert completion(_out([9], [-2.0], 'length'))['finish_reason'] == 'length'  # a plain string (older sglang)
    with pytest.raises(RuntimeError, match='abort'):
        completion(_out([9], [-2.0], {'type': 'abort', 'message': 'out of memory'}))
    with pytest.raises(RuntimeError, match='differ'):
        completion(_out([5, 7], [-0.5, -1.0], 'stop', output_ids=[5, 8]))
    with pytest.raises(RuntimeError, match='return_logprob'):
        completion({'output_ids': [1], 'meta_info': {'finish_reason': 'length'}})
    outs = [_out([i], [-float(i)], 'length') for i in range(1, 4)]
    grouped = split_completions(outs, [2, 1])
    assert [[c['token_ids'] for c in g] for g in grouped] == [[[1], [2]], [[3]]]
    with pytest.raises(RuntimeError, match='4 outputs for 3'):
        split_completions(outs + outs[:1], [2, 1])


def test_checkpoint_names_and_shapes_bound_a_push(models):
    params = checkpoint_params(models['a'])
    assert params['lm_head.weight'].shape == params['model.embed_tokens.weight'].shape  # tied: not in the file
    engine = SGLangRolloutEngine.__new__(SGLangRolloutEngine)  # its checks only: no SGLang behind it
    engine._params, engine.max_length = params, 100
    name = 'model.norm.weight'
    engine.check_layout({'names': [name], 'shapes': [list(params[name].shape)], 'dtypes': ['float32']})
    with pytest.raises(WeightSyncError, match='has no tensor'):
        engine.check_layout({'names': ['model.nope'], 'shapes': [[1]], 'dtypes': ['float32']})
    with pytest.raises(WeightSyncError, match='shape'):
        engine.check_layout({'names': [name], 'shapes': [[3]], 'dtypes': ['float32']})
    assert engine._max_new(SamplingRequest([1] * 98, max_tokens=10)) == 2
    with pytest.raises(ValueError, match='no room'):
        engine._max_new(SamplingRequest([1] * 100))


def test_refusals_before_sglang_starts():
    with pytest.raises(ValueError, match='dp_size=2'):
        SGLangRolloutEngine('unused', dp_size=2)
    if importlib.util.find_spec('sglang') is None:
        with pytest.raises(ImportError, match='pip install'):
            check_sglang()


# ---------------------------------------------------------------- CPU: the named_group protocol
class NamedGroupReceiver(WeightReceiver):
    """The server's end of a ``named_group`` sync, formed as SGLang's schedulers form theirs (sglang's
    ``init_custom_process_group``): a ``tcp://`` rendezvous (a client of the trainer's store), then the named
    group under ``named_group_name(port)``; buckets arrive on the device the trainer broadcasts from."""

    def join(self, host, port, world_size, rank, backend, timeout_s):
        self.close()
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store, _, _ = next(torch.distributed.rendezvous(f'tcp://{host}:{port}', rank, world_size,
                                                             timeout=timeout))
        self.group = join_named_group(self.store, rank, world_size, backend, timeout_s, named_group_name(port))
        self.backend = backend

    def receive(self, layout, device):
        flat = torch.empty(sum(nbytes(s, d) for s, d in zip(layout['shapes'], layout['dtypes'])), dtype=torch.uint8,
                           device=broadcast_device('named_group', self.backend))
        if flat.numel():
            broadcast(self.group, flat)
        return unflatten(flat, layout)

    def close(self):
        group = self.group
        super().close()
        if group is not None:
            drop_group(group)


def _script_env() -> dict:
    """This file run as a script imports ``test_rollout`` and ``trainer_case`` (tests/rollout) and testing_utils."""
    return dict(_env(), PYTHONPATH=os.pathsep.join([str(REPO), str(HERE.parent), os.environ.get('PYTHONPATH', '')]))


@pytest.fixture(scope='module')
def launch(tmp_path_factory):
    """``launch(args) -> url``: this file as a server process (``args``); every one is killed with the module."""
    started = []

    def start(args: list[str]) -> str:
        log = open(tmp_path_factory.mktemp('server') / 'stderr.log', 'w+')
        proc = subprocess.Popen([sys.executable, str(Path(__file__)), *args], env=_script_env(),
                                stdout=subprocess.PIPE, stderr=log, text=True)
        started.append(proc)
        for line in proc.stdout:  # SGLang may print before the server's own line
            if ' at http://' in line:
                threading.Thread(target=proc.stdout.read, daemon=True).start()  # the pipe never fills up
                return line.split(' at ')[1].strip()
        proc.kill()
        log.seek(0)
        pytest.fail(f'{args[0]} did not start:\n{log.read()[-6000:]}')

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _greedy(client, prompt, max_tokens=6):
    reply = client.infer([{'prompt_token_ids': prompt, 'temperature': 0.0, 'max_tokens': max_tokens}])
    return reply['results'][0]['completions'][0], reply['weights_version']


def _hf_logprobs(model_dir, prompt, token_ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = model(torch.tensor([prompt + token_ids])).logits.float().log_softmax(-1)[0]
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(token_ids)]


def test_named_group_sync_reaches_the_served_weights(models, launch):
    from safetensors.torch import load_file
    from torch.distributed.distributed_c10d import _world

    from megaswift.rollout import push_named_tensors
    client = RolloutClient(launch(['serve-named', models['a']]), read_timeout=120)
    assert client.info()['weight_sync_protocol'] == 'named_group'
    before, v0 = _greedy(client, PROMPT)
    assert v0 == 0
    for version, src in ((1, 'b'), (2, 'a')):  # a second sync on a new group: the first one's name was freed
        client.init_communicator(backend='gloo', timeout_s=60)  # gloo: on a GPU machine both ends share a GPU
        name = named_group_name(client._store.port)
        assert client.protocol == 'named_group' and name in _world.pg_names.values()
        weights = sorted(load_file(str(Path(models[src]) / 'model.safetensors')).items())
        assert push_named_tensors(client, weights, bucket_mb=1) == version  # several buckets
        client.close_communicator()
        assert name not in _world.pg_names.values() and client.info()['communicator'] is False
        after, v = _greedy(client, PROMPT)
        assert v == version
        assert _max_diff(after['logprobs'], _hf_logprobs(models[src], PROMPT, after['token_ids'])) <= 1e-4
        if src == 'b':  # negative control: A's completion scored by B
            assert _max_diff(before['logprobs'], _hf_logprobs(models['b'], PROMPT, before['token_ids'])) > 1e-2
        else:  # A pushed back: A's completion again
            assert after['token_ids'] == before['token_ids']
            assert _max_diff(after['logprobs'], before['logprobs']) <= 1e-6
    assert client.info()['prefix_cache_resets'] == 2


# ---------------------------------------------------------------- GPU: a real SGLang server
class GlooClient(RolloutClient):
    """A client whose weight-sync group is gloo unless told otherwise: the trainer and SGLang share one GPU."""

    def init_communicator(self, host='127.0.0.1', port=0, backend=None, timeout_s=None):
        super().init_communicator(host, port, backend or 'gloo', timeout_s)


@pytest.fixture(scope='module')
def sglang_synced(models, launch, tmp_path_factory, smollm2_dir):
    pytest.importorskip('sglang')
    if not torch.cuda.is_available():
        pytest.skip('SGLang needs a CUDA GPU')
    from transformers import AutoTokenizer
    prompt = AutoTokenizer.from_pretrained(smollm2_dir)(GPU_PROMPT_TEXT)['input_ids']
    assert len(prompt) > 32
    url = launch(['serve-sglang', models['a']])
    tmp = tmp_path_factory.mktemp('sglang_trainer')
    setup = tmp / 'setup.json'
    setup.write_text(json.dumps({'url': url, 'model_a': models['a'], 'model_b': models['b'], 'prompt': prompt,
                                 'max_tokens': 16, 'bucket_mb': 4}))
    out = tmp / 'out.json'
    proc = subprocess.run([sys.executable, str(Path(__file__)), 'train', str(out), str(setup)], env=_script_env(),
                          cwd=tmp, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f'trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return {'url': url, **json.loads(out.read_text())}


def test_sglang_logprobs_match_megatron_and_are_not_shifted(sglang_synced):
    r = sglang_synced
    assert r['info_before']['backend'] == 'sglang' and r['info_before']['weight_sync_protocol'] == 'named_group'
    assert len(r['before']['token_ids']) == len(r['before']['logprobs']) > 0
    assert _max_diff(r['before']['logprobs'], r['mcore_a']) <= 1e-4
    assert _max_diff(r['before']['logprobs'], r['mcore_a_shifted']) > 1e-2


def test_sglang_push_advances_version_flushes_and_matches_trainer(sglang_synced):
    r = sglang_synced
    v0 = r['info_before']['weights_version']
    assert r['pushed_version'] == v0 + 1 == r['after']['weights_version'] == r['info_after']['weights_version']
    assert r['info_after']['prefix_cache_resets'] == r['info_before']['prefix_cache_resets'] + 1
    assert _max_diff(r['after']['logprobs'], r['mcore_b']) <= 1e-4
    assert _max_diff(r['before']['logprobs'], r['mcore_b_on_a_completion']) > 1e-2  # negative control


def test_sglang_infer_batch_shapes(sglang_synced):
    client = RolloutClient(sglang_synced['url'], read_timeout=120)
    reply = client.infer([{'prompt_token_ids': [1, 504, 3458], 'n': 3, 'seed': 5},
                          {'messages': [{'role': 'user', 'content': 'hi'}], 'seed': 1}], temperature=1.0, max_tokens=6)
    assert [len(r['completions']) for r in reply['results']] == [3, 1]
    for c in (c for r in reply['results'] for c in r['completions']):
        assert len(c['token_ids']) == len(c['logprobs']) >= 1 and all(lp <= 0 for lp in c['logprobs'])
        assert c['finish_reason'] in ('stop', 'length')


# ---------------------------------------------------------------- script mode: servers and the trainer
def _serve(engine, model: str) -> None:
    from megaswift.rollout.server import create_rollout_app
    from megaswift.serving.app import bind, serve
    sock = bind('127.0.0.1', 0)
    try:
        serve(create_rollout_app(engine, bucket_mb=4), sock,
              on_listen=lambda url: print(f'megaswift rollout: serving {model} at {url}', flush=True))
    finally:
        engine.close()


def _train(out_path: str, setup_path: str) -> None:
    import faulthandler
    faulthandler.dump_traceback_later(840, exit=True)
    import trainer_case
    from megaswift.megatron.parallel import _init_process_group
    setup = json.loads(Path(setup_path).read_text())
    _init_process_group()
    out = trainer_case.world1(setup, GlooClient(setup['url'], read_timeout=600))
    Path(out_path).write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    command, *rest = sys.argv[1:]
    if command == 'serve-named':
        from megaswift.rollout.engine import TransformersRolloutEngine
        served = TransformersRolloutEngine(rest[0], 'float32')
        served.receiver, served.weight_sync_protocol = NamedGroupReceiver(), 'named_group'
        _serve(served, rest[0])
    elif command == 'serve-sglang':
        _serve(SGLangRolloutEngine(rest[0], 'float32', **GPU_ENGINE_KWARGS), rest[0])
    elif command == 'train':
        _train(*rest)
    else:
        raise SystemExit(f'unknown command {command!r}')
