"""The one validation of a parallel layout (TP / PP / VPP / SP sizes), with ms-swift's flag names.

``validate_layout`` is called at argument-parsing time (the sizes, and for training the launch's world
size), by ``preflight`` and the export with the model's HF config, and by ``initialize_parallel`` with the
real world size. It imports neither torch nor megatron-core, so the arguments can use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..utils.errors import ArgumentError


class ParallelLayoutError(ArgumentError):
    """A layout the flags, the launch or the model cannot hold; the message names the flags."""


def _check_sizes(tp: int, pp: int, vpp: Optional[int]) -> None:
    for flag, value in (('tensor_model_parallel_size', tp), ('pipeline_model_parallel_size', pp)):
        if int(value) < 1:
            raise ParallelLayoutError(f'--{flag}: must be >= 1, got {value}')
    if vpp is not None:
        if vpp < 1:
            raise ParallelLayoutError(f'--virtual_pipeline_model_parallel_size: must be >= 1, got {vpp}')
        if pp < 2:
            raise ParallelLayoutError(f'--virtual_pipeline_model_parallel_size {vpp} needs '
                                      f'--pipeline_model_parallel_size >= 2, got {pp}')


@dataclass(frozen=True)
class ParallelConfig:
    """Validated sizes (``_check_sizes``); VPP 1 is stored as None and SP is off without TP, as Megatron-LM does."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        _check_sizes(self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                     self.virtual_pipeline_model_parallel_size)
        if self.virtual_pipeline_model_parallel_size == 1:
            object.__setattr__(self, 'virtual_pipeline_model_parallel_size', None)
        if self.tensor_model_parallel_size == 1:  # sequence parallelism splits along TP: nothing to split
            object.__setattr__(self, 'sequence_parallel', False)
        object.__setattr__(self, 'sequence_parallel', bool(self.sequence_parallel))

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


def _check_world_size(cfg: ParallelConfig, world_size: int) -> None:
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ParallelLayoutError(f'{world_size} process(es) cannot hold --tensor_model_parallel_size {tp} x '
                                  f'--pipeline_model_parallel_size {pp}; launch a multiple of {tp * pp} processes '
                                  f'(NPROC_PER_NODE={tp * pp} megaswift ...)')


def _check_model(cfg: ParallelConfig, hf_config) -> None:
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size
    model = getattr(hf_config, 'model_type', None) or 'model'
    heads = hf_config.num_attention_heads
    for field, value in (('num_attention_heads', heads),
                         ('num_key_value_heads', getattr(hf_config, 'num_key_value_heads', None) or heads),
                         ('intermediate_size', hf_config.intermediate_size)):
        if value % tp:
            raise ParallelLayoutError(f'{model}: {field} ({value}) is not divisible by '
                                      f'--tensor_model_parallel_size ({tp})')
    stages = pp * (vpp or 1)
    if hf_config.num_hidden_layers % stages:
        what = f'--pipeline_model_parallel_size ({pp})' + (
            f' x --virtual_pipeline_model_parallel_size ({vpp})' if vpp else '')
        raise ParallelLayoutError(f'{model}: num_hidden_layers ({hf_config.num_hidden_layers}) is not divisible by '
                                  f'{what} = {stages}')


def validate_layout(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, sp: bool = False, *,
                    world_size: Optional[int] = None, hf_config=None) -> ParallelConfig:
    """The ``ParallelConfig`` of these sizes, or ``ParallelLayoutError`` naming the flags.

    With ``hf_config``: the model's heads, KV heads and FFN width must split over TP and its layers over
    PP x VPP. With ``world_size``: TP x PP must divide the number of processes. The model is checked
    first, so a layout the model cannot hold says so whatever the launch.
    """
    cfg = ParallelConfig(tp, pp, vpp, sp)
    if hf_config is not None:
        _check_model(cfg, hf_config)
    if world_size is not None:
        _check_world_size(cfg, world_size)
    return cfg


__all__ = ['ParallelConfig', 'ParallelLayoutError', 'validate_layout']
