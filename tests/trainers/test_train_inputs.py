"""sft/pt arguments, pre-flight and data checks (bad input fails before any model is built), the data
pipeline's pieces (sampler, micro-batch split, collation alignment, plain-text encoding) and the loss at TP=1.

Everything here runs in the pytest process without megatron-core's CPU layer (no process groups).
"""
from __future__ import annotations

from types import SimpleNamespace

import json

import pytest
import torch

from megaswift.arguments.train import PtArguments, SftArguments
from megaswift.cli.parser import CLIError, parse_args

BASE = ['--model', 'm', '--dataset', 'd.jsonl']


@pytest.fixture
def world(monkeypatch):
    def set_world(n: int):
        monkeypatch.setenv('WORLD_SIZE', str(n))
        monkeypatch.setenv('RANK', '0')
    return set_world


@pytest.mark.parametrize('world_size, argv, match', [
    (1, ['--global_batch_size', '3', '--micro_batch_size', '2'],
     r'--global_batch_size 3 is not divisible by --micro_batch_size 2 x data-parallel size 1'),
    (2, ['--global_batch_size', '6', '--micro_batch_size', '2'],
     r'--global_batch_size 6 is not divisible by --micro_batch_size 2 x data-parallel size 2 .*use a multiple of 4'),
    (2, ['--tensor_model_parallel_size', '4'], r'2 process\(es\) cannot hold --tensor_model_parallel_size 4'),
    (4, ['--pipeline_model_parallel_size', '4', '--virtual_pipeline_model_parallel_size', '2',
         '--global_batch_size', '2'], r'needs at least --pipeline_model_parallel_size \(4\) micro-batches'),
    (1, ['--bf16', 'true', '--fp16', 'true'], r'--bf16 and --fp16 exclude each other'),
    (1, ['--optimizer', 'lion'], r"--optimizer: unknown optimizer 'lion' \(available: adam, adamw, sgd\)"),
    (1, ['--lr_decay_style', 'cosin'], r"--lr_decay_style: unknown style 'cosin'"),
    (1, ['--loss_scale', 'nope'], r'--loss_scale:'),
    (1, ['--template', 'qwen9'], r"--template: unknown template 'qwen9'"),
    (1, ['--tuner_type', 'freeze'], r'--tuner_type freeze needs --freeze_parameters'),
    (1, ['--label_smoothing', '1.0'], r'--label_smoothing: must be in \[0, 1\)'),
    (1, ['--cross_entropy_impl', 'fused'], r"--cross_entropy_impl: unknown value 'fused' \(auto, torch, chunked, cuda\)"),
    pytest.param(1, ['--cross_entropy_impl', 'cuda'], r'--cross_entropy_impl cuda needs a CUDA GPU',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')),
    (1, ['--warmup_ratio', '1.5'], r'--warmup_ratio: must be in \[0, 1\)'),
    (1, ['--max_steps', '0'], r'--max_steps: must be >= 1'),
    (1, ['--micro_batch_size', '0'], r'--micro_batch_size: must be >= 1'),
    (1, ['--optimizer', 'sgd', '--use_distributed_optimizer', 'true'], r'--use_distributed_optimizer true supports'),
])
def test_bad_flags_fail_at_parse_time(world, world_size, argv, match):
    world(world_size)
    with pytest.raises(CLIError, match=match):
        parse_args(SftArguments, BASE + argv)


def test_required_and_defaults(world):
    world(1)
    with pytest.raises(CLIError, match='--model is required'):
        parse_args(SftArguments, ['--dataset', 'd.jsonl'])
    with pytest.raises(CLIError, match='--dataset is required'):
        parse_args(SftArguments, ['--model', 'm'])
    a = parse_args(SftArguments, BASE + ['--packing', 'true', '--padding_free', 'false', '--sequence_parallel', 'true'])
    assert a.padding_free is True and a.sequence_parallel is False  # packing implies padding-free; SP needs TP > 1
    assert a.num_train_epochs == 1.0 and a.eval_steps == a.save_steps == 500 and a.lr == 1e-5
    assert a.output_dir.endswith('output/m') and a.command == 'sft'
    assert parse_args(SftArguments, BASE + ['--tuner_type', 'lora']).lr == 1e-4
    assert a.use_distributed_optimizer is True  # ZeRO-1 by default, as Megatron-SWIFT
    assert parse_args(SftArguments, BASE + ['--optimizer', 'sgd']).use_distributed_optimizer is False
    p = parse_args(PtArguments, BASE)
    assert (p.use_chat_template, p.loss_scale, p.command) == (False, 'all', 'pt')


def test_global_batch_counts_all_dp_ranks(world):
    world(4)
    a = parse_args(SftArguments, BASE + ['--tensor_model_parallel_size', '2', '--global_batch_size', '8',
                                         '--micro_batch_size', '2'])
    assert a.data_parallel_size == 2 and a.num_microbatches == 2


# ------------------------------------------------------------------------------------ pre-flight and data
def chat_file(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def chat(q, a):
    return {'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}


def test_layout_that_does_not_divide_the_model(world, tiny_llama_dir, tmp_path):
    from megaswift.arguments.base import ArgumentError
    from megaswift.pipelines.train import preflight
    world(3)
    args = SftArguments(model=tiny_llama_dir, dataset=['d.jsonl'], tensor_model_parallel_size=3, global_batch_size=1,
                        output_dir=str(tmp_path / 'o'))
    with pytest.raises(ArgumentError, match=r'num_attention_heads \(2\) is not divisible by '
                                            r'--tensor_model_parallel_size \(3\)'):
        preflight(args)
    world(1)
    args = SftArguments(model=tiny_llama_dir, dataset=['d.jsonl'], pipeline_model_parallel_size=1,
                        output_dir=str(tmp_path / 'o'))
    assert preflight(args).max_length == 2048  # the model's max_position_embeddings


def test_output_dir_and_resume_checks(world, tiny_llama_dir, tmp_path):
    from megaswift.arguments.base import ArgumentError
    from megaswift.megatron.checkpoint import CheckpointError
    from megaswift.pipelines.train import preflight
    world(1)
    out = tmp_path / 'run'
    with pytest.raises(CheckpointError, match='no checkpoint in --output_dir'):
        preflight(SftArguments(model=tiny_llama_dir, dataset=['d'], output_dir=str(out),
                               resume_from_checkpoint='true'))
    (out / 'iter_0000003').mkdir(parents=True)
    (out / 'latest_checkpointed_iteration.txt').write_text('3')
    with pytest.raises(ArgumentError, match='already holds checkpoints; pass --resume_from_checkpoint true'):
        preflight(SftArguments(model=tiny_llama_dir, dataset=['d'], output_dir=str(out)))
    with pytest.raises(CheckpointError, match='is not a training checkpoint'):  # iter dir without trainer state
        preflight(SftArguments(model=tiny_llama_dir, dataset=['d'], output_dir=str(out),
                               resume_from_checkpoint='true'))
    layout = {'tensor_model_parallel_size': 2, 'pipeline_model_parallel_size': 1,
              'virtual_pipeline_model_parallel_size': None}
    (out / 'iter_0000003' / 'trainer_state.json').write_text(json.dumps({'use_distributed_optimizer': True,
                                                                         'layout': layout}))
    (out / 'iter_0000003' / 'optim').mkdir()
    (out / 'iter_0000003' / 'optim' / 'metadata.json').write_text('{}')
    with pytest.raises(CheckpointError, match=r'saved at tensor_model_parallel_size=2.*reshards across data '
                                              r'parallelism only.*--no_load_optim true'):
        preflight(SftArguments(model=tiny_llama_dir, dataset=['d'], output_dir=str(out),
                               resume_from_checkpoint='true'))
    assert preflight(SftArguments(model=tiny_llama_dir, dataset=['d'], output_dir=str(out), no_load_optim=True,
                                  resume_from_checkpoint='true')).resume_dir.name == 'iter_0000003'


def test_all_samples_longer_than_max_length(world, tiny_llama_dir, tmp_path, monkeypatch):
    from megaswift.dataset.encode import AllRowsSkipped
    from megaswift.pipelines.train import prepare_data, preflight
    world(1)
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    data = chat_file(tmp_path / 'd.jsonl', [chat('a b c d e', 'f g h i j')] * 3)
    args = SftArguments(model=tiny_llama_dir, dataset=[data], max_length=8, output_dir=str(tmp_path / 'o'))
    with pytest.raises(AllRowsSkipped, match=r'all 3 rows are longer than max_length 8'):
        prepare_data(args, preflight(args))


def test_pt_needs_a_text_column_and_warmup_below_steps(world, tiny_llama_dir, tmp_path, monkeypatch):
    from megaswift.dataset import DatasetError
    from megaswift.pipelines.train import prepare_data, preflight
    from megaswift.utils.errors import TrainDataError
    world(1)
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    args = PtArguments(model=tiny_llama_dir, dataset=[str(bad)], output_dir=str(tmp_path / 'o'))
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: field 'text': pt needs a 'text' column"):
        prepare_data(args, preflight(args))
    good = tmp_path / 'good.jsonl'
    good.write_text('{"text": "one two three"}\n{"text": "four five"}\n')
    args = PtArguments(model=tiny_llama_dir, dataset=[str(good)], output_dir=str(tmp_path / 'o2'), max_steps=2,
                       warmup_steps=2, global_batch_size=2)
    with pytest.raises(TrainDataError, match=r'--warmup_steps 2 must be smaller than the number of training steps'):
        prepare_data(args, preflight(args))
    args = PtArguments(model=tiny_llama_dir, dataset=[str(good)], output_dir=str(tmp_path / 'o3'), packing=True,
                       max_length=16, global_batch_size=1, num_train_epochs=2)
    data, steps = prepare_data(args, preflight(args))
    assert data.num_items == 1 and steps == 2  # both texts fit one packed row of 16


# ------------------------------------------------------------------------------------ data pieces
def test_sampler_is_deterministic_endless_and_resumable():
    from megaswift.trainers.data import StepSampler
    a = StepSampler(10, 4, seed=7)
    steps = [a.next_step() for _ in range(5)]  # 20 items: two whole epochs
    assert sorted(steps[0] + steps[1] + steps[2][:2]) == list(range(10))  # epoch 0 = a permutation
    assert steps[0] + steps[1] + steps[2][:2] != list(range(10))          # shuffled
    assert a.epoch == 2.0
    b = StepSampler(10, 4, seed=7)
    b.load_state_dict(StepSampler(10, 4, seed=7).state_dict() | {'consumed': 8})
    assert [b.next_step() for _ in range(3)] == steps[2:]
    assert StepSampler(10, 4, seed=8).next_step() != steps[0]
    assert StepSampler(10, 4, seed=7, shuffle=False).next_step() == [0, 1, 2, 3]
    assert a.steps_for_epochs(1.0) == 3


def test_micro_batches_split_the_step_exactly_once():
    from megaswift.trainers.data import eval_micro_batches, rank_micro_batches
    items = list(range(100, 112))
    parts = [rank_micro_batches(items, r, 3, 2) for r in range(3)]
    assert all(len(p) == 2 for p in parts)
    assert sorted(i for p in parts for mb in p for i in mb) == items
    ev = [eval_micro_batches(7, r, 2, 3) for r in range(2)]
    assert sorted(i for p in ev for mb in p for i in mb) == list(range(7)) and ev[0] == [[0, 2, 4], [6]]


def test_collated_targets_align_with_logits(tiny_llama_dir):
    """Position t of a collated batch holds the id the logit at t must predict (the input at t + 1), never
    across a sample boundary; padding-free and padded batches agree."""
    from megaswift.dataset.encode import EncodedDataset
    from megaswift.template.collator import Collator
    samples = [{'input_ids': [5, 6, 7, 8], 'labels': [-100, -100, 7, 8]},
               {'input_ids': [9, 10, 11], 'labels': [-100, 10, 11], 'loss_scale': [0.0, 2.0, 1.0]}]
    enc = EncodedDataset.from_samples(samples)
    pf = Collator(enc, [[0, 1]], padding_free=True, pad_to_multiple_of=4)([0])
    assert pf['input_ids'].tolist() == [[5, 6, 7, 8, 9, 10, 11, 0]]
    assert pf['labels'].tolist() == [[-100, 7, 8, -100, 10, 11, -100, -100]]
    assert pf['loss_scale'].tolist() == [[0.0, 1.0, 1.0, 0.0, 2.0, 1.0, 0.0, 0.0]]
    assert pf['packed_seq_params'].cu_seqlens_q.tolist() == [0, 4, 7, 8]
    padded = Collator(enc, [[0], [1]], padding_free=False)([0, 1])
    assert padded['labels'].tolist() == [[-100, 7, 8, -100], [10, 11, -100, -100]]
    fixed = Collator(enc, [[0], [1]], padding_free=True, pad_to_multiple_of=2)([1], pad_to=6)
    assert fixed['input_ids'].shape == (1, 6)


def test_plain_text_encoder(tiny_llama_dir):
    from megaswift.model import load_tokenizer
    from megaswift.template import MaxLengthExceeded
    from megaswift.template.plain_text import PlainTextEncoder
    tok = load_tokenizer(tiny_llama_dir)
    enc = PlainTextEncoder(tok, max_length=None).encode({'text': 'hello world'})
    assert enc['labels'] == enc['input_ids'] and enc['input_ids'][-1] == tok.eos_token_id
    joined = PlainTextEncoder(tok).encode({'messages': [{'role': 'user', 'content': 'hello'},
                                                        {'role': 'assistant', 'content': 'world'}]})
    assert tok.decode(joined['input_ids']).startswith('hello\nworld')
    with pytest.raises(MaxLengthExceeded):
        PlainTextEncoder(tok, max_length=2).encode({'text': 'hello world again'})
    assert len(PlainTextEncoder(tok, 2, 'right').encode({'text': 'hello world again'})['input_ids']) == 2


# ------------------------------------------------------------------------------------ loss (TP = 1)
def test_loss_matches_torch_with_label_smoothing_and_padded_vocab():
    from megaswift.trainers.loss import vocab_parallel_argmax, vocab_parallel_token_loss
    from megaswift.trainers.objectives import ModelOutput, build_objective
    g = torch.Generator().manual_seed(0)
    vocab, padded = 90, 128
    logits = torch.randn(2, 5, padded, generator=g) * 2
    logits[..., vocab:] = 9.0  # padded entries must not count
    target = torch.randint(0, vocab, (2, 5), generator=g)
    target[1, :2] = -100
    ref_logits = logits[..., :vocab].reshape(-1, vocab)
    for eps in (0.0, 0.1):
        got = vocab_parallel_token_loss(logits, target, vocab_size=vocab, label_smoothing=eps)
        ref = torch.nn.functional.cross_entropy(ref_logits, target.clamp(min=0).reshape(-1), label_smoothing=eps,
                                                reduction='none').view(2, 5)
        mask = target != -100
        assert ((got - ref) * mask).abs().max() < 1e-5
    assert torch.equal(vocab_parallel_argmax(logits, vocab), logits[..., :vocab].argmax(-1))
    scale = torch.full((2, 5), 2.0)
    sft = build_objective('sft', SimpleNamespace(label_smoothing=0.0))
    batch = {'labels': target, 'loss_scale': scale, 'loss_denominator': torch.tensor([16.0])}
    loss, count, reduced = sft.loss(ModelOutput(logits, None, vocab, impl='torch'), batch)
    ce = torch.nn.functional.cross_entropy(ref_logits, target.reshape(-1), reduction='sum')
    assert int(count) == 8 and abs(loss.item() - 2 * ce.item() / 16) < 1e-5
    assert torch.allclose(reduced['loss'], torch.tensor([2 * ce.item(), 8.0], dtype=torch.float64))


def test_eval_metrics_are_checked_against_what_evaluation_produces():
    from megaswift.arguments.base import ArgumentError
    from megaswift.trainers.eval_metrics import build_eval_metrics
    assert build_eval_metrics(['loss', 'acc']) == []  # built in
    assert len(build_eval_metrics(['nlg'])) == 1  # generated text (trainers/generate.py; checks in test_generate.py)
    with pytest.raises(ArgumentError, match="--eval_metric: .*unknown metric 'bleu9'"):
        build_eval_metrics(['bleu9'])
