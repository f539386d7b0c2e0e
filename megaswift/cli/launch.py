"""Relaunch a command under torchrun when NPROC_PER_NODE / NNODES are set (ms-swift's convention).

Several nodes: every node runs the same command with ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (a static rendezvous). Inside an ``srun`` step (one task per node) the rendezvous is c10d on
the master (``MASTER_ADDR``, else the job's first host) with the job id as its id, so no ``NODE_RANK`` is needed.
"""
from __future__ import annotations

import os
import sys

from ..utils import slurm


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
    if int(nnodes or 1) > 1 and os.environ.get('SLURM_STEP_NUM_TASKS'):
        master = os.environ.get('MASTER_ADDR') or slurm.first_host()
        port = os.environ.get('MASTER_PORT') or slurm.default_port()
        out += ['--rdzv_backend=c10d', f'--rdzv_endpoint={master}:{port}',
                f"--rdzv_id={os.environ.get('SLURM_JOB_ID', 'megaswift')}"]
    elif int(nnodes or 1) > 1:
        out += [f"--node_rank={os.environ.get('NODE_RANK', 0)}",
                f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={os.environ.get('MASTER_PORT', 29500)}"]
    else:
        out += ['--standalone'] if 'MASTER_PORT' not in os.environ else [
            f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}", f"--master_port={os.environ['MASTER_PORT']}"]
    return out + ['-m', 'megaswift.cli.main', command, *argv]


def run_torchrun(argv: list[str]) -> int:
    """Run the torchrun command line and return its exit code. SIGUSR1 (sbatch ``--signal``) is ignored here and
    in the torchrun agent (whose default action would be to die and take the workers along); the training
    workers install their own handler (``trainers/preemption.py``). SIGTERM is passed on to the agent, which
    stops its workers, except inside an ``srun`` step, where Slurm signals every process itself; Ctrl-C reaches
    every process of the terminal's group, so here it only keeps this process waiting for the agent."""
    import signal
    import subprocess
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    child = subprocess.Popen(argv, env=os.environ.copy())
    in_step = bool(os.environ.get('SLURM_STEP_ID'))

    def forward(signum, _frame):
        if signum == signal.SIGTERM and not in_step:
            child.send_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()
