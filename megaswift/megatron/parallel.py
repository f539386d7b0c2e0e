"""Process-group setup: the one place megaswift creates megatron-core's parallel state.

``initialize_parallel`` brings up ``torch.distributed`` (from the torchrun environment, or a
single-process group when launched without torchrun), applies the CPU compatibility layer when no
CUDA device exists, creates the TP/PP/DP groups through ``parallel_state`` and returns the
``ParallelContext``: the sizes, ranks and groups, passed explicitly to what needs them.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megaswift.megatron.layout import ParallelConfig, validate_layout
from megaswift.utils.dist import local_rank


@dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the TP / PP / DP layout and its process groups (megatron-core's)."""
    config: ParallelConfig
    tp_group: Any
    pp_group: Any
    dp_group: Any
    dp_cp_group: Any  # data parallel with context parallel (megatron-core's with_context_parallel=True)
    tp_size: int
    pp_size: int
    dp_size: int
    vpp_size: Optional[int]
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    sequence_parallel: bool
    is_first_stage: bool  # pipeline stage, ignoring virtual stages
    is_last_stage: bool
    pp_last_rank: int  # global rank of the last stage of this rank's pipeline group

    @classmethod
    def from_megatron(cls, sequence_parallel: bool = False) -> 'ParallelContext':
        """The context of megatron-core's current parallel state. megatron-core does not record sequence
        parallelism (a model setting), so it is given here; ``initialize_parallel`` passes its config's."""
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            raise RuntimeError('megatron-core parallel state is not initialised; call '
                               'megaswift.megatron.initialize_parallel(ParallelConfig(...)) first')
        dist = torch.distributed
        tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
        dp_group = ps.get_data_parallel_group()
        config = ParallelConfig(dist.get_world_size(tp_group), dist.get_world_size(pp_group),
                                ps.get_virtual_pipeline_model_parallel_world_size(), sequence_parallel)
        pp_rank, pp_ranks = dist.get_rank(pp_group), dist.get_process_group_ranks(pp_group)
        return cls(config=config, tp_group=tp_group, pp_group=pp_group, dp_group=dp_group,
                   dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
                   tp_size=config.tensor_model_parallel_size, pp_size=config.pipeline_model_parallel_size,
                   dp_size=dist.get_world_size(dp_group), vpp_size=config.virtual_pipeline_model_parallel_size,
                   tp_rank=dist.get_rank(tp_group), pp_rank=pp_rank, dp_rank=dist.get_rank(dp_group),
                   rank=dist.get_rank(), world_size=dist.get_world_size(),
                   sequence_parallel=config.sequence_parallel, is_first_stage=pp_rank == 0,
                   is_last_stage=pp_rank == len(pp_ranks) - 1, pp_last_rank=pp_ranks[-1])

    def layout(self) -> dict:
        """The layout recorded in checkpoints (``megaswift_meta.json``, ``trainer_state.json``)."""
        return {'tensor_model_parallel_size': self.tp_size, 'pipeline_model_parallel_size': self.pp_size,
                'virtual_pipeline_model_parallel_size': self.vpp_size, 'data_parallel_size': self.dp_size,
                'world_size': self.world_size}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _init_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    from ..utils.slurm import apply_srun_env
    apply_srun_env()  # `srun` with one task per rank: the torchrun variables from SLURM_*
    if 'RANK' not in os.environ:  # a plain `python` launch: write the torchrun environment of a world of one
        os.environ.setdefault('RANK', '0')
        os.environ.setdefault('WORLD_SIZE', '1')
        os.environ.setdefault('LOCAL_RANK', '0')
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(_free_port()))
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def initialize_parallel(cfg: Optional[ParallelConfig] = None, seed: int = 42) -> ParallelContext:
    """Create megatron-core's process groups for ``cfg`` (re-creating them if already initialised) and
    return their ``ParallelContext``; ``ParallelLayoutError`` if the launch's processes cannot hold ``cfg``."""
    cfg = cfg if cfg is not None else ParallelConfig()
    _init_process_group()
    if not torch.cuda.is_available():
        from megaswift.megatron import cpu_compat
        cpu_compat.apply()
    cfg = validate_layout(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                          cfg.virtual_pipeline_model_parallel_size, cfg.sequence_parallel,
                          world_size=torch.distributed.get_world_size())
    from megatron.core import parallel_state, tensor_parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelContext.from_megatron(sequence_parallel=cfg.sequence_parallel)


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Drop megatron-core's groups (and, when asked, the torch.distributed world)."""
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
