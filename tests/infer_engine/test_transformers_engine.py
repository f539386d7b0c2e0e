"""The transformers engine against HF generate, on tiny random models and the real SmolLM2."""
import pytest
import torch

from megaswift.infer_engine import InferRequest, RequestConfig, TransformersEngine


def chat(q):
    return InferRequest([{'role': 'user', 'content': q}])


@pytest.fixture(scope='module')
def tiny_engine(tiny_llama_dir):
    return TransformersEngine(tiny_llama_dir, torch_dtype='float32', max_batch_size=64)


def hf_greedy(engine, request, max_new_tokens):
    ids = torch.tensor([engine.encode_prompt(request)])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=engine.pad_token_id)
    toks = out[0, ids.shape[1]:].tolist()
    return [t for t in toks[:next((i for i, t in enumerate(toks) if t in engine.stop_token_ids), len(toks))]]


def test_greedy_equals_hf_generate_in_a_padded_batch(tiny_engine):
    # prompts of different lengths share a left-padded batch; each must equal its own unpadded HF run
    reqs = [chat('hi'), chat('a much longer question about several different things'), chat('what is 2+3?')]
    got = tiny_engine.infer(reqs, RequestConfig(max_tokens=12, temperature=0))
    for r, resp in zip(reqs, got):
        assert resp.choices[0].token_ids == hf_greedy(tiny_engine, r, 12)
        assert resp.usage.prompt_tokens == len(tiny_engine.encode_prompt(r))


def test_n_samples_share_one_prefill(tiny_engine):
    seen = []
    hook = tiny_engine.model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw['input_ids'].shape)),
                                                      with_kwargs=True)
    try:
        got = tiny_engine.infer([chat('one'), chat('two two')], RequestConfig(max_tokens=5, n=4, seed=0))
    finally:
        hook.remove()
    assert seen[0][0] == 2, 'the prompt prefill must run once per prompt, not once per sample'
    assert all(s == (8, 1) for s in seen[1:]), 'decode steps run all 2 x 4 samples together'
    assert [len(r.choices) for r in got] == [4, 4]
    assert all(len(c.token_ids) <= 5 for r in got for c in r.choices)
    assert len({tuple(c.token_ids) for c in got[0].choices}) > 1, 'random-init logits are near uniform: samples differ'


def test_seed_makes_sampling_reproducible(tiny_engine):
    cfg = RequestConfig(max_tokens=8, n=3, seed=123, temperature=1.0, top_p=0.9, top_k=50)
    a = tiny_engine.infer([chat('x')], cfg)[0]
    b = tiny_engine.infer([chat('x')], cfg)[0]
    c = tiny_engine.infer([chat('x')], RequestConfig(max_tokens=8, n=3, seed=124))[0]
    assert [x.token_ids for x in a.choices] == [x.token_ids for x in b.choices]
    assert [x.token_ids for x in a.choices] != [x.token_ids for x in c.choices]


def test_seeded_samples_do_not_depend_on_the_batch(tiny_engine):
    """Per-row RNG streams: batching, server grouping or sharding never change a request's samples."""
    cfg = RequestConfig(max_tokens=8, n=3, seed=7, temperature=1.0)
    alone = tiny_engine.infer([chat('target')], cfg)[0]
    crowd = tiny_engine.infer([chat('other'), chat('target'), chat('a third much longer prompt')], cfg)[1]
    assert [c.token_ids for c in alone.choices] == [c.token_ids for c in crowd.choices]
    twins = tiny_engine.infer([chat('target'), chat('target')], cfg)
    assert [c.token_ids for c in twins[0].choices] == [c.token_ids for c in alone.choices]
    assert [c.token_ids for c in twins[1].choices] != [c.token_ids for c in alone.choices], 'duplicates differ'


def test_max_tokens_sets_finish_reason(tiny_engine):
    r = tiny_engine.infer([chat('x')], RequestConfig(max_tokens=3, temperature=0))[0]
    assert len(r.choices[0].token_ids) == 3 and r.choices[0].finish_reason == 'length'


def test_stream_deltas_add_up_to_the_answer(tiny_engine):
    cfg = RequestConfig(max_tokens=10, temperature=0, n=2)
    text = [''] * 2
    finish = None
    for deltas, finish, _ in tiny_engine.infer_stream(chat('stream me'), cfg):
        text = [t + d for t, d in zip(text, deltas)]
    full = tiny_engine.infer([chat('stream me')], cfg)[0]
    assert text == [c.message.content for c in full.choices]
    assert finish == [c.finish_reason for c in full.choices]


@pytest.mark.slow
def test_smollm2_answers_and_stops_at_im_end(smollm2_fp32):
    engine = smollm2_fp32
    r = engine.infer([chat('What is 2+3? Answer with a number.')], RequestConfig(max_tokens=32, temperature=0))[0]
    assert '5' in r.choices[0].message.content
    assert r.choices[0].finish_reason == 'stop'  # <|im_end|> ends the answer; no runaway to max_tokens
    assert '<|im_end|>' not in r.choices[0].message.content


@pytest.fixture(scope='module')
def smollm2_fp32(smollm2_dir):
    return TransformersEngine(smollm2_dir, torch_dtype='float32')


@pytest.mark.slow
def test_rows_finishing_early_leave_the_batch_without_changing_the_others(smollm2_fp32):
    """Make one token a stop token so rows end at different steps and the KV cache gets compacted."""
    tiny_engine = smollm2_fp32
    reqs = [chat('What is 2+3?'), chat('Name a color.'), chat('Tell me a joke about cats.'), chat('Say hi.'),
            chat('What is the capital of France?'), chat('Count to five.'), chat('Who are you?'), chat('Spell dog.')]
    cfg = RequestConfig(max_tokens=10, temperature=0)
    free_choices = [r.choices[0] for r in tiny_engine.infer(reqs, cfg)]
    free = [c.token_ids for c in free_choices]
    stop = free[0][2]  # ends row 0 at step 3; other rows stop wherever this token first appears, if at all
    saved = tiny_engine.stop_token_ids
    tiny_engine.stop_token_ids = saved + [stop]
    try:
        got = [r.choices[0] for r in tiny_engine.infer(reqs, cfg)]
    finally:
        tiny_engine.stop_token_ids = saved
    for ref, ref_choice, choice in zip(free, free_choices, got):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert choice.token_ids == ref[:cut]
        assert choice.finish_reason == ('stop' if stop in ref else ref_choice.finish_reason)
    assert sum(stop in ref for ref in free) < len(free), 'some rows must keep decoding after others stopped'
