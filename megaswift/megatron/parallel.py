"""Process-group setup: the one place megaswift creates megatron-core's parallel state.

``initialize_parallel`` brings up ``torch.distributed`` (from the torchrun environment, or a
single-process group when launched without torchrun), applies the CPU compatibility layer when no
CUDA device exists, and creates the TP/PP/DP groups through ``parallel_state``. Code that needs a
group takes it as an argument (``tp_group=parallel_state.get_tensor_model_parallel_group()``);
helpers never re-derive groups themselves.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, replace
from typing import Optional

import torch

_current: Optional['ParallelConfig'] = None


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ('tensor_model_parallel_size', 'pipeline_model_parallel_size'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'--{name} must be >= 1, got {getattr(self, name)}')
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1:
                raise ValueError(f'--virtual_pipeline_model_parallel_size must be >= 1, got {vpp}')
            if vpp > 1 and self.pipeline_model_parallel_size < 2:
                raise ValueError('--virtual_pipeline_model_parallel_size > 1 needs '
                                 '--pipeline_model_parallel_size >= 2')
            if vpp == 1:
                self.virtual_pipeline_model_parallel_size = None
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # as Megatron-LM: sequence parallelism needs TP > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _init_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    if 'RANK' not in os.environ:  # a plain `python` launch: a world of one
        os.environ.setdefault('RANK', '0')
        os.environ.setdefault('WORLD_SIZE', '1')
        os.environ.setdefault('LOCAL_RANK', '0')
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(_free_port()))
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def initialize_parallel(cfg: Optional[ParallelConfig] = None, seed: int = 42) -> ParallelConfig:
    """Create megatron-core's process groups for ``cfg`` (re-creates them if already initialised)."""
    global _current
    cfg = replace(cfg) if cfg is not None else ParallelConfig()
    _init_process_group()
    if not torch.cuda.is_available():
        from megaswift.megatron import cpu_compat
        cpu_compat.apply()
    world = torch.distributed.get_world_size()
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if world % (tp * pp) != 0:
        raise ValueError(f'world size {world} is not divisible by --tensor_model_parallel_size ({tp}) x '
                         f'--pipeline_model_parallel_size ({pp}) = {tp * pp}; launch a multiple of '
                         f'{tp * pp} processes or change the parallel sizes')
    from megatron.core import parallel_state, tensor_parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _current = cfg
    return cfg


def current_parallel_config() -> ParallelConfig:
    """The config given to ``initialize_parallel`` (or one read from ``parallel_state``)."""
    if _current is not None:
        return _current
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError('megatron-core parallel state is not initialised; call '
                           'megaswift.megatron.initialize_parallel(ParallelConfig(...)) first')
    return ParallelConfig(parallel_state.get_tensor_model_parallel_world_size(),
                          parallel_state.get_pipeline_model_parallel_world_size(),
                          parallel_state.get_virtual_pipeline_model_parallel_world_size())


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Drop megatron-core's groups (and, when asked, the torch.distributed world)."""
    global _current
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _current = None
    if destroy_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
