"""This process's place in the launch: from ``torch.distributed`` once a process group exists, before that
from the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); a plain
``python`` launch is rank 0 of a world of one. The one place megaswift reads these.

Cheap to call at argument-parsing time: torch is not imported here (no process group can exist before
``torch.distributed`` is).
"""
from __future__ import annotations

import os
import sys


def initialized_dist():
    """``torch.distributed`` when a default process group exists, else None."""
    dist = sys.modules.get('torch.distributed')
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, '') else default


def rank() -> int:
    """The global rank."""
    dist = initialized_dist()
    return dist.get_rank() if dist else _env_int('RANK', 0)


def world_size() -> int:
    """The number of processes in the launch."""
    dist = initialized_dist()
    return dist.get_world_size() if dist else _env_int('WORLD_SIZE', 1)


def local_rank() -> int:
    """The rank on this node (torch.distributed does not know it: always from the environment)."""
    return _env_int('LOCAL_RANK', 0)


def local_world_size() -> int:
    """The number of processes on this node."""
    return _env_int('LOCAL_WORLD_SIZE', 1)


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists; nothing otherwise."""
    dist = initialized_dist()
    if dist:
        dist.barrier()


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag true when it is true on any rank of the world: one all-reduce (MAX) that every rank must call, on
    the device the backend reduces on (CUDA for NCCL); the flags as they are without a process group."""
    dist = initialized_dist()
    if dist is None or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    import torch
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def report_failure(exc: BaseException, prefix: str = 'megaswift') -> None:
    """In a launch of several processes, print ``<prefix>: rank R of W on HOST failed: Type: message`` once per
    exception, so that the first failure of a multi-node job is named in its merged log (the other ranks then fail
    in their collectives, or are killed by the launcher before they could say more)."""
    if getattr(exc, '_megaswift_reported', False) or world_size() == 1:
        return
    import socket
    host = os.environ.get('SLURMD_NODENAME') or socket.gethostname()
    print(f'{prefix}: rank {rank()} of {world_size()} on {host} failed: {type(exc).__name__}: {exc}',
          file=sys.stderr, flush=True)
    try:
        exc._megaswift_reported = True
    except AttributeError:  # pragma: no cover - built-in exceptions without __dict__
        pass
