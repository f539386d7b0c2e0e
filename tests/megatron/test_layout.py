"""The one validation of the parallel sizes (``megatron/layout.py``): bad sizes, launches and models fail
with one ``ParallelLayoutError`` naming ms-swift's flags, at parse time and at every later check."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from megaswift.megatron.layout import ParallelConfig, ParallelLayoutError, validate_layout
from megaswift.utils.errors import ArgumentError

MODEL = SimpleNamespace(model_type='llama', num_attention_heads=8, num_key_value_heads=2, intermediate_size=512,
                        num_hidden_layers=6)


@pytest.mark.parametrize('sizes, kwargs, match', [
    ((0, 1), {}, r'--tensor_model_parallel_size: must be >= 1, got 0'),
    ((1, -1), {}, r'--pipeline_model_parallel_size: must be >= 1, got -1'),
    ((1, 2, 0), {}, r'--virtual_pipeline_model_parallel_size: must be >= 1, got 0'),
    ((1, 1, 2), {}, r'--virtual_pipeline_model_parallel_size 2 needs --pipeline_model_parallel_size >= 2, got 1'),
    ((2, 2), {'world_size': 6}, r'6 process\(es\) cannot hold --tensor_model_parallel_size 2 x '
                                r'--pipeline_model_parallel_size 2; launch a multiple of 4'),
    ((4, 1), {'hf_config': MODEL}, r'llama: num_key_value_heads \(2\) is not divisible by '
                                   r'--tensor_model_parallel_size \(4\)'),
    ((3, 1), {'hf_config': MODEL}, r'num_attention_heads \(8\) is not divisible by --tensor_model_parallel_size \(3\)'),
    ((1, 2, 2), {'hf_config': MODEL}, r'num_hidden_layers \(6\) is not divisible by --pipeline_model_parallel_size '
                                      r'\(2\) x --virtual_pipeline_model_parallel_size \(2\) = 4'),
    ((1, 4), {'hf_config': MODEL}, r'num_hidden_layers \(6\) is not divisible by --pipeline_model_parallel_size '
                                   r'\(4\) = 4$'),
    ((4, 1), {'hf_config': MODEL, 'world_size': 3}, r'num_key_value_heads'),  # the model is named first
])
def test_bad_layouts_raise_one_error_naming_the_flags(sizes, kwargs, match):
    with pytest.raises(ParallelLayoutError, match=match) as e:
        validate_layout(*sizes, **kwargs)
    assert isinstance(e.value, ArgumentError) and isinstance(e.value, ValueError)


def test_good_layouts_and_their_normal_form():
    assert validate_layout(2, 3, None, True, world_size=12, hf_config=MODEL) == ParallelConfig(2, 3, None, True)
    assert validate_layout(1, 2, 3, hf_config=MODEL).virtual_pipeline_model_parallel_size == 3
    assert validate_layout(1, 2, 1).virtual_pipeline_model_parallel_size is None  # VPP 1 = no interleaving
    assert validate_layout(1, 1, None, True).sequence_parallel is False  # SP needs TP > 1, as Megatron-LM
    assert ParallelConfig(2, 2).model_parallel_size == 4
    with pytest.raises(ParallelLayoutError, match='--tensor_model_parallel_size'):
        ParallelConfig(tensor_model_parallel_size=0)  # the same check when a config is built directly


def test_arguments_use_the_same_check(monkeypatch):
    from megaswift.arguments.export import ExportArguments
    from megaswift.arguments.train import SftArguments
    from megaswift.cli.parser import CLIError, parse_args
    with pytest.raises(ParallelLayoutError, match='--pipeline_model_parallel_size: must be >= 1'):
        ExportArguments(model='m', to_mcore=True, pipeline_model_parallel_size=0)
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(CLIError, match=r'--tensor_model_parallel_size: must be >= 1, got 0'):
        parse_args(SftArguments, ['--model', 'm', '--dataset', 'd.jsonl', '--tensor_model_parallel_size', '0'])
    with pytest.raises(CLIError, match=r'2 process\(es\) cannot hold --tensor_model_parallel_size 1 x '
                                       r'--pipeline_model_parallel_size 4'):
        parse_args(SftArguments, ['--model', 'm', '--dataset', 'd.jsonl', '--pipeline_model_parallel_size', '4'])


def test_layout_and_dist_import_neither_torch_nor_megatron():
    code = ('import sys, megaswift.megatron.layout, megaswift.utils.dist; '
            'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "megatron")))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]', out


def test_dist_reads_the_torchrun_environment_before_a_group_exists(monkeypatch):
    from megaswift.utils import dist
    if dist.initialized_dist() is not None:
        pytest.skip('a process group exists in this process')
    for name, value in (('RANK', '3'), ('WORLD_SIZE', '4'), ('LOCAL_RANK', '1'), ('LOCAL_WORLD_SIZE', '2')):
        monkeypatch.setenv(name, value)
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.local_world_size()) == (3, 4, 1, 2)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE'):
        monkeypatch.delenv(name)
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.local_world_size()) == (0, 1, 0, 1)
