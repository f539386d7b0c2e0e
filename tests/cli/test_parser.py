"""Flags, YAML configs and their errors, on the real SamplingArguments."""
import pytest

from megaswift.arguments.sampling import SamplingArguments
from megaswift.cli.parser import CLIError, parse_args

BASE = ['--model', 'm', '--dataset', 'd.jsonl']


def test_types_are_converted():
    a = parse_args(SamplingArguments, BASE + ['--num_return_sequences', '4', '--temperature', '0.5', '--top-k', '-1',
                                              '--override_exist_file', 'true', '--data_range', '1', '3',
                                              '--engine_kwargs', '{"max_batch_size": 8}', '--stream'])
    assert (a.num_return_sequences, a.temperature, a.top_k) == (4, 0.5, -1)
    assert a.override_exist_file is True and a.stream is True
    assert a.data_range == [1, 3] and a.dataset == ['d.jsonl']
    assert a.engine_kwargs == {'max_batch_size': 8}


def test_pt_is_an_alias_of_transformers():
    assert parse_args(SamplingArguments, BASE + ['--sampler_engine', 'pt']).sampler_engine == 'transformers'


@pytest.mark.parametrize('argv, match', [
    (['--num_return_sequence', '4'], r"unknown argument '--num_return_sequence'; did you mean 'num_return_sequences'"),
    (['--num_return', '4'], r"unknown argument '--num_return'"),  # no silent prefix abbreviation
    (['--sampler_type', 'distil'], r"invalid choice 'distil'.*did you mean 'distill'"),
    (['--sampler_engine', 'vlm'], r"unknown engine 'vlm'.*did you mean 'vllm'"),
    (['--num_return_sequences', 'four'], r'--num_return_sequences: expected int'),
    (['--override_exist_file', 'maybe'], r'expected true or false'),
    (['--data_range', '3', '3'], r'--data_range'),
    (['--engine_kwargs', '{"torch_dtype": "bf16"}'], r'--torch_dtype'),
    (['--engine_kwargs', '{bad'], r'--engine_kwargs: not valid JSON'),
    (['--output_file', 'a/b.jsonl'], r'--output_file: a file name'),
    (['--num_return_sequences', '0'], r'must be >= 1'),
])
def test_bad_flags_fail_clearly(argv, match):
    with pytest.raises(CLIError, match=match):
        parse_args(SamplingArguments, BASE + argv)


def test_missing_required():
    with pytest.raises(CLIError, match='--dataset is required'):
        parse_args(SamplingArguments, ['--model', 'm'])
    # the two-stage recipe: scoring cached samples needs neither a model nor a dataset
    a = parse_args(SamplingArguments, ['--sampler_engine', 'no', '--cache_files', 'x.jsonl', '--orm_model', 'math'])
    assert a.model is None and a.dataset == []


def test_yaml_config_and_flag_override(tmp_path):
    cfg = tmp_path / 'run.yaml'
    cfg.write_text('model: m\ndataset: [a.jsonl, b.jsonl]\nnum_return_sequences: 8\nENV:\n  MEGASWIFT_TEST_ENV: "1"\n')
    a = parse_args(SamplingArguments, [str(cfg), '--num_return_sequences', '2'])
    assert a.dataset == ['a.jsonl', 'b.jsonl'] and a.num_return_sequences == 2
    import os
    assert os.environ.pop('MEGASWIFT_TEST_ENV') == '1'


def test_yaml_unknown_key_names_file_and_line(tmp_path):
    cfg = tmp_path / 'run.yaml'
    cfg.write_text('model: m\ndataset: [a.jsonl]\n\nn_best_to_kep: 2\n')
    with pytest.raises(CLIError, match=r"run.yaml:4: unknown key 'n_best_to_kep'; did you mean 'n_best_to_keep'"):
        parse_args(SamplingArguments, [str(cfg)])


def test_json_config(tmp_path):
    cfg = tmp_path / 'run.json'
    cfg.write_text('{"model": "m", "dataset": "a.jsonl", "engine_kwargs": {"max_batch_size": 4}}')
    a = parse_args(SamplingArguments, [str(cfg)])
    assert a.dataset == ['a.jsonl'] and a.engine_kwargs == {'max_batch_size': 4}


def test_python_construction_validates_too():
    with pytest.raises(ValueError, match='--n_best_to_keep'):
        SamplingArguments(model='m', dataset=['d'], n_best_to_keep=0)
