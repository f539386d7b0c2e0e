"""Optional engines (vLLM, SGLang, LMDeploy): runs everywhere, whether or not the backends are installed.

* Without its package, each engine fails at construction with an ImportError naming
  ``pip install 'megaswift[<extra>]'``. The package is hidden with ``sys.modules[name] = None``,
  which makes ``import name`` raise even when the package is installed, so the check is real.
* With a fake backend module in ``sys.modules``, each engine's ``infer`` is checked for what it
  sends (one batched call, ``n`` passed through) and how it maps the backend's output.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest

from megaswift.infer_engine.protocol import InferRequest, RequestConfig

ENGINES = [
    ('megaswift.infer_engine.vllm_engine', 'VllmEngine', 'vllm', 'vllm'),
    ('megaswift.infer_engine.sglang_engine', 'SglangEngine', 'sglang', 'sglang'),
    ('megaswift.infer_engine.lmdeploy_engine', 'LmdeployEngine', 'lmdeploy', 'lmdeploy'),
]


def _engine_cls(module: str, cls: str):
    import importlib
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize('module,cls,package,extra', ENGINES, ids=[e[2] for e in ENGINES])
def test_missing_package_raises_install_hint(monkeypatch, module, cls, package, extra):
    engine_cls = _engine_cls(module, cls)  # the engine module itself imports without the backend
    for name in list(sys.modules):
        if name == package or name.startswith(package + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    # A model path that does not exist: the package check must come first.
    with pytest.raises(ImportError) as exc:
        engine_cls('/nonexistent/model-dir')
    msg = str(exc.value)
    assert f"pip install 'megaswift[{extra}]'" in msg, msg
    assert package in msg


# ---------------------------------------------------------------- fake backends
MESSAGES = [[{'role': 'user', 'content': f'question {i}'}] for i in range(3)]


def _requests(tools=None):
    return [InferRequest(messages=m, tools=tools) for m in MESSAGES]


@dataclass
class _FakeCompletion:
    index: int
    text: str
    token_ids: list
    finish_reason: str = 'length'


@dataclass
class _FakeRequestOutput:
    prompt_token_ids: list
    outputs: list = field(default_factory=list)


def _fake_vllm(calls):
    mod = types.ModuleType('vllm')

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            calls.append(('init', kw))

        def chat(self, conversations, sampling_params=None, use_tqdm=True, tools=None, **kw):
            calls.append(('chat', conversations, sampling_params.kw, tools))
            n = sampling_params.kw['n']
            return [_FakeRequestOutput(prompt_token_ids=[1] * (5 + c),
                                       outputs=[_FakeCompletion(j, f'c{c}s{j}', [10 + j, 11]) for j in range(n)])
                    for c, _ in enumerate(conversations)]

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


def test_vllm_engine_with_fake_backend(monkeypatch, tmp_path):
    (tmp_path / 'config.json').write_text('{}')
    calls = []
    monkeypatch.setitem(sys.modules, 'vllm', _fake_vllm(calls))
    monkeypatch.setenv('VLLM_CPU_KVCACHE_SPACE', '')  # so that teardown restores the variable's absence
    monkeypatch.delenv('VLLM_CPU_KVCACHE_SPACE')
    from megaswift.infer_engine.vllm_engine import VllmEngine, _cuda_available
    engine = VllmEngine(str(tmp_path), seed=3)
    init = calls[0][1]
    assert init['model'] == str(tmp_path) and init['seed'] == 3
    if not _cuda_available():
        assert init['enforce_eager'] is True and init['dtype'] == 'bfloat16'
        import os
        assert os.environ['VLLM_CPU_KVCACHE_SPACE'] == '2'

    rc = RequestConfig(n=4, max_tokens=7, temperature=0.5, top_k=-1, seed=11, stop=['x'])
    responses = engine.infer(_requests(), rc)
    chats = [c for c in calls if c[0] == 'chat']
    assert len(chats) == 1, 'all conversations must go to one LLM.chat call'
    _, conversations, params, tools = chats[0]
    assert conversations == MESSAGES and tools is None
    assert params['n'] == 4 and params['max_tokens'] == 7 and params['top_k'] == 0 and params['seed'] == 11
    assert params['stop'] == ['x'] and params['temperature'] == 0.5
    assert len(responses) == 3
    for c, resp in enumerate(responses):
        assert [ch.message.content for ch in resp.choices] == [f'c{c}s{j}' for j in range(4)]
        assert all(ch.token_ids == [10 + ch.index, 11] and ch.finish_reason == 'length' for ch in resp.choices)
        assert resp.usage.prompt_tokens == 5 + c and resp.usage.completion_tokens == 8
        assert resp.usage.total_tokens == 13 + c

    # requests with different tools go to separate chat calls; order of responses is kept
    calls.clear()
    tool = {'type': 'function', 'function': {'name': 'f', 'parameters': {'type': 'object', 'properties': {}}}}
    mixed = [InferRequest(MESSAGES[0], tools=[tool]), InferRequest(MESSAGES[1]), InferRequest(MESSAGES[2], [tool])]
    responses = engine.infer(mixed, RequestConfig(n=1))
    chats = [c for c in calls if c[0] == 'chat']
    assert len(chats) == 2
    assert chats[0][1] == [MESSAGES[0], MESSAGES[2]] and chats[0][3] == [tool]
    assert chats[1][1] == [MESSAGES[1]] and chats[1][3] is None
    assert [r.choices[0].message.content for r in responses] == ['c0s0', 'c0s0', 'c1s0']
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(RuntimeError):
        engine.infer(_requests(), rc)


def test_sglang_engine_with_fake_backend(monkeypatch, tiny_llama_dir):
    calls = []
    mod = types.ModuleType('sglang')

    class Engine:
        def __init__(self, **kw):
            calls.append(('init', kw))

        def generate(self, prompt=None, sampling_params=None, **kw):
            calls.append(('generate', prompt, sampling_params))
            n = sampling_params.get('n', 1)
            return [{'text': f'p{i}s{j}', 'output_ids': [i, j],
                     'meta_info': {'prompt_tokens': 9, 'completion_tokens': 2,
                                   'finish_reason': {'type': 'stop', 'matched': 2}}}
                    for i in range(len(prompt)) for j in range(n)]

        def shutdown(self):
            calls.append(('shutdown',))

    mod.Engine = Engine
    monkeypatch.setitem(sys.modules, 'sglang', mod)
    from megaswift.infer_engine.sglang_engine import SglangEngine
    engine = SglangEngine(tiny_llama_dir, max_model_len=512)
    assert calls[0][1]['model_path'] == tiny_llama_dir and calls[0][1]['context_length'] == 512
    responses = engine.infer(_requests(), RequestConfig(n=3, max_tokens=5, top_k=-1))
    (_, prompts, params), = [c for c in calls if c[0] == 'generate']
    assert len(prompts) == 3 and all(p.rstrip().endswith('assistant') for p in prompts)
    assert 'question 1' in prompts[1]
    assert params['n'] == 3 and params['max_new_tokens'] == 5 and params['top_k'] == -1
    assert [[c.message.content for c in r.choices] for r in responses] == \
        [[f'p{i}s{j}' for j in range(3)] for i in range(3)]
    assert responses[1].choices[2].token_ids == [1, 2] and responses[0].choices[0].finish_reason == 'stop'
    assert responses[0].usage.completion_tokens == 6 and responses[0].usage.prompt_tokens == 9
    engine.close()
    assert calls[-1] == ('shutdown',)


def test_lmdeploy_engine_with_fake_backend(monkeypatch, tiny_llama_dir):
    calls = []
    mod = types.ModuleType('lmdeploy')

    @dataclass
    class GenerationConfig:
        n: int = 1
        max_new_tokens: int = 512
        do_sample: bool = False
        top_p: float = 1.0
        top_k: int = 50
        temperature: float = 0.8
        repetition_penalty: float = 1.0
        random_seed: int | None = None
        stop_words: list | None = None

    @dataclass
    class Response:
        text: str
        generate_token_len: int
        input_token_len: int
        finish_reason: str | None = None
        token_ids: list = field(default_factory=list)

    class PytorchEngineConfig:
        def __init__(self, **kw):
            self.kw = kw

    class Pipe:
        def __call__(self, prompts, gen_config=None, do_preprocess=True):
            calls.append(('call', prompts, gen_config, do_preprocess))
            return [Response(f'r{k}', 2, 7, 'length', [k, k]) for k in range(len(prompts))]

        def close(self):
            calls.append(('close',))

    def pipeline(model_path, backend_config=None, **kw):
        calls.append(('pipeline', model_path, backend_config.kw))
        return Pipe()

    mod.GenerationConfig, mod.PytorchEngineConfig, mod.TurbomindEngineConfig = \
        GenerationConfig, PytorchEngineConfig, PytorchEngineConfig
    mod.pipeline = pipeline
    monkeypatch.setitem(sys.modules, 'lmdeploy', mod)
    from megaswift.infer_engine.lmdeploy_engine import LmdeployEngine
    engine = LmdeployEngine(tiny_llama_dir)
    responses = engine.infer(_requests(), RequestConfig(n=2, max_tokens=4, seed=5, temperature=0.7))
    (_, prompts, gen_config, do_preprocess), = [c for c in calls if c[0] == 'call']
    assert do_preprocess is False
    assert len(prompts) == 6 and prompts[0] == prompts[1] and prompts[1] != prompts[2]  # n copies, prompt-major
    assert [g.random_seed for g in gen_config] == [5, 6] * 3  # distinct seeds per copy
    assert all(g.n == 1 and g.max_new_tokens == 4 and g.do_sample for g in gen_config)
    assert [[c.message.content for c in r.choices] for r in responses] == [['r0', 'r1'], ['r2', 'r3'], ['r4', 'r5']]
    assert responses[2].usage.completion_tokens == 4 and responses[2].usage.prompt_tokens == 7
    engine.close()
    assert calls[-1] == ('close',)
