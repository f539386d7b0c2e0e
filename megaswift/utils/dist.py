"""This process's place in torch.distributed, usable whether or not a process group exists."""
from __future__ import annotations


def initialized_dist():
    """``torch.distributed`` when a default process group exists, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """The global rank (0 without a process group)."""
    dist = initialized_dist()
    return dist.get_rank() if dist else 0


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group exists; nothing otherwise."""
    dist = initialized_dist()
    if dist:
        dist.barrier()
