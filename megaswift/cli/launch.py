"""Relaunch a command under torchrun when NPROC_PER_NODE / NNODES are set (ms-swift's convention)."""
from __future__ import annotations

import os
import sys


def torchrun_argv(command: str, argv: list[str]) -> list[str] | None:
    """The torchrun command line for this invocation, or None when it should run in-process."""
    if 'LOCAL_RANK' in os.environ or 'TORCHELASTIC_RUN_ID' in os.environ:
        return None  # already a torchrun worker
    nproc = os.environ.get('NPROC_PER_NODE')
    nnodes = os.environ.get('NNODES')
    if not nproc and not nnodes:
        return None
    if not nproc:
        import torch
        nproc = str(torch.cuda.device_count() or 1)
    out = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--nnodes={nnodes or 1}']
    if int(nnodes or 1) > 1:
        out += [f"--node_rank={os.environ.get('NODE_RANK', 0)}",
                f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={os.environ.get('MASTER_PORT', 29500)}"]
    else:
        out += ['--standalone'] if 'MASTER_PORT' not in os.environ else [
            f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}", f"--master_port={os.environ['MASTER_PORT']}"]
    return out + ['-m', 'megaswift.cli.main', command, *argv]
