"""megaswift.trainers.generate in-process: prompts and references from encoded samples, stop tokens, the greedy
loop's stopping and batching, the eval/no-grad switch, the untouched random generators, and the checks that
accept ``--eval_metric nlg`` but reject it with pipeline parallelism before any model is built. (Generation on
megatron-core against HF ``generate``, TP=2 / DP=2 and unchanged training: test_train_nlg.py.)"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megaswift.trainers import generate as gen

I = -100


class _Encoded:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def arrays(self, i):
        ids, labels = self.samples[i]
        return {'input_ids': np.asarray(ids), 'labels': np.asarray(labels)}


def test_eval_prompts_split_at_the_first_trained_label():
    encoded = _Encoded([
        ([1, 2, 3, 4, 5, 6], [I, I, I, 4, 5, 6]),      # prompt 1 2 3, reference 4 5 6
        ([1, 2, 3, 4, 5, 6], [I, I, 3, I, 5, I]),      # two trained spans: the reference is every trained token
        ([7, 8, 9], [I, I, I]),                        # nothing trained: left out
        ([7, 8, 9], [7, 8, 9]),                        # pt: trained from the first token, which stays the prompt
    ])
    got = [(p.index, p.prompt, p.reference) for p in gen.eval_prompts(encoded)]
    assert got == [(0, [1, 2, 3], [4, 5, 6]), (1, [1, 2], [3, 5]), (3, [7], [8, 9])]
    shares = [[p.index for p in gen.eval_prompts(encoded, r, 2)] for r in range(2)]
    assert shares == [[0], [1, 3]]  # rank r takes samples r, r + dp, ...


def test_stop_tokens_of_the_tokenizer_and_template(smollm2_dir):
    from megaswift.model import load_tokenizer
    from megaswift.template import get_template
    tok = load_tokenizer(smollm2_dir)
    template = get_template(tok, 'chatml')
    im_end = tok.convert_tokens_to_ids('<|im_end|>')
    stops = gen.stop_token_ids(tok, template, None, smollm2_dir)
    assert tok.eos_token_id in stops and im_end in stops
    assert gen.stop_token_ids(tok) == [tok.eos_token_id]


def test_greedy_loop_stops_and_batches(monkeypatch):
    """Next token = last + 1; 9 is a stop token. Batching (tokens_per_forward) never changes the answers."""
    calls = []

    def next_tokens(forward, sequences, spec, generators=None):
        calls.append(len(sequences))
        return [s[-1] + 1 for s in sequences]
    monkeypatch.setattr(gen, '_next_tokens', next_tokens)
    prompts = [[1], [5, 6], [0, 0, 0, 0, 2], [8]]
    want = [[2, 3, 4, 5], [7, 8], [3, 4, 5, 6], []]  # max_new_tokens 4; 9 stops; the answer starts right at 9
    for budget, most in ((1, 1), (11, 2), (10_000, 4)):  # prompt + max_new_tokens of each must fit the budget
        spec = gen.GenerationSpec(max_new_tokens=4, stop_ids=[9], tokens_per_forward=budget)
        calls.clear()
        assert gen.generate(None, prompts, spec)[0] == want
        assert max(calls) == most  # prompts per forward (one when nothing else fits)
    spec = gen.GenerationSpec(max_new_tokens=4, stop_ids=[9], max_total_length=6)
    assert gen.generate(None, prompts, spec)[0] == [[2, 3, 4, 5], [7, 8], [3], []]  # prompt + answer <= 6


def test_generation_mode_and_random_generators():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    frozen = torch.nn.Linear(2, 2).eval()
    seeds = lambda: (torch.manual_seed(3), random.seed(3), np.random.seed(3))  # noqa: E731
    seeds()
    want = (torch.rand(3), random.random(), np.random.rand())
    seeds()
    with gen.generation_mode([model, frozen]):
        assert not model.training and not frozen.training and not torch.is_grad_enabled()
        torch.rand(5), random.random(), np.random.rand(2)  # draws that must not shift training's numbers
        model(torch.ones(1, 4))
    assert model.training and not frozen.training and torch.is_grad_enabled()
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_megatron_rng_tracker_is_restored():
    """megatron-core's tracker (dropout inside tensor-parallel regions) gets its states back, whether a fork
    replaced a state or changed it in place. (Without the CPU layer here, so the states are set by hand.)"""
    from megatron.core import tensor_parallel
    tracker = tensor_parallel.get_cuda_rng_tracker()
    original = tracker.get_states()
    try:
        tracker.set_states({'a': torch.get_rng_state(), 'b': torch.get_rng_state()})
        want = {k: v.clone() for k, v in tracker.get_states().items()}
        with gen.preserved_rng_state():
            states = tracker.get_states()
            states['a'] = torch.zeros_like(states['a'])  # a fork stores a new tensor
            states['b'].zero_()                          # or writes into the old one
            tracker.set_states(states)
        got = tracker.get_states()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    finally:
        tracker.set_states(original)


class _NeedsBoth:
    inputs = ('predictions', 'preds')


def test_eval_metric_nlg_is_accepted_and_checked(monkeypatch, tmp_path, tiny_llama_dir):
    from megaswift.arguments.base import ArgumentError
    from megaswift.arguments.train import SftArguments
    from megaswift.metrics import NlgMetric, metrics
    from megaswift.pipelines.train import preflight
    from megaswift.trainers.eval_metrics import build_eval_metrics
    built = build_eval_metrics(['acc', 'nlg'])
    assert len(built) == 1 and isinstance(built[0], NlgMetric) and gen.needs_generation(built[0])
    monkeypatch.setitem(metrics, 'needs_both', _NeedsBoth)
    with pytest.raises(ArgumentError, match=r"--eval_metric needs_both: needs \['preds'\].*not both"):
        build_eval_metrics(['needs_both'])

    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    args = SftArguments(model=tiny_llama_dir, dataset=['d.jsonl'], pipeline_model_parallel_size=2,
                        global_batch_size=2, eval_metric=['nlg'], output_dir=str(tmp_path / 'o'))
    with pytest.raises(ArgumentError, match=r'--eval_metric nlg generates text .*--pipeline_model_parallel_size 2 '
                                            r'is not supported'):
        preflight(args)
    args.eval_metric = ['acc']
    assert preflight(args).model_dir == tiny_llama_dir  # pipeline parallelism alone is fine
    monkeypatch.setenv('WORLD_SIZE', '1')
    with pytest.raises(ValueError, match='--max_new_tokens: must be >= 1'):
        SftArguments(model=tiny_llama_dir, dataset=['d.jsonl'], max_new_tokens=0)


def test_sampling_follows_the_softmax_and_its_seed():
    """temperature > 0: a draw per row from softmax(logits / T) (Gumbel-max); the same seed gives the same draw, a
    padded vocabulary entry is never drawn, and T -> 0 approaches the greedy choice."""
    from megaswift.trainers.objectives.base import ModelOutput
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, 9.0]])  # entry 5 is vocabulary padding (vocab_size 5)
    n, temperature = 20000, 0.7
    out = ModelOutput(logits.expand(n, -1).contiguous(), None, 5, None, 'torch')
    seeds = list(range(n))
    draws = gen._sample(out, temperature, gen.sequence_generators(seeds))
    freq = torch.bincount(draws, minlength=6).double() / n
    want = torch.softmax(logits[0, :5].double() / temperature, -1)
    assert freq[5] == 0
    assert (freq[:5] - want).abs().max() < 0.012, (freq, want)  # ~4 standard errors at n = 20000
    again = gen._sample(out, temperature, gen.sequence_generators(seeds))
    assert torch.equal(draws, again)
    cold = gen._sample(ModelOutput(logits.expand(100, -1).contiguous(), None, 5, None, 'torch'), 1e-3,
                       gen.sequence_generators(range(100)))
    assert cold.tolist() == [0] * 100
    with pytest.raises(ValueError, match='one seed per prompt'):
        gen.generate(None, [[1]], gen.GenerationSpec(max_new_tokens=2, stop_ids=[], temperature=1.0))
