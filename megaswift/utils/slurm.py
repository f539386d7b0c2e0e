"""Ranks under SLURM: the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) from an ``srun`` step's variables, so that ``srun megaswift sft ...`` with one
task per rank needs no wrapper. Called explicitly (the CLI before it dispatches, ``initialize_parallel`` before
it creates the process group), never at import time.

Only an ``srun`` step counts (``SLURM_STEP_NUM_TASKS`` is set there, not in the batch script itself, where
``SLURM_NTASKS`` describes the allocation, not this process's world). A torchrun worker (``RANK`` or
``LOCAL_RANK`` set) keeps torchrun's values. The master is ``MASTER_ADDR`` when set, else the first host of
``SLURM_JOB_NODELIST`` (``scontrol show hostnames``); with no ``scontrol`` there is no guess: a
``localhost`` fallback would make every node form its own world and hang.
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping, MutableMapping

from .errors import UserError

TORCH_KEYS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


class SlurmError(UserError):
    pass


def in_srun_step(env: Mapping[str, str] = os.environ) -> bool:
    """True in a task that ``srun`` started (not in the batch script, not in a torchrun worker)."""
    return bool(env.get('SLURM_STEP_NUM_TASKS')) and 'RANK' not in env and 'LOCAL_RANK' not in env


def expand_tasks_per_node(value: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1``) -> ``[2, 2, 2, 1]``."""
    out = []
    for part in value.split(','):
        m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
        if not m:
            raise SlurmError(f'cannot read SLURM tasks per node {value!r}')
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def first_host(env: Mapping[str, str] = os.environ) -> str:
    """The first host of the job's node list, as ``scontrol show hostnames`` expands it."""
    nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get('SLURM_NODELIST')
    if not nodelist:
        raise SlurmError('SLURM_JOB_NODELIST is not set: set MASTER_ADDR to the first node of the job')
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise SlurmError(f'cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol ({e}); set MASTER_ADDR to '
                         f'the first node of the job') from None
    if not out:
        raise SlurmError(f'scontrol show hostnames {nodelist} printed nothing; set MASTER_ADDR')
    return out[0]


def default_port(env: Mapping[str, str] = os.environ) -> str:
    """A port that differs between jobs that may share a node: 20000 + job id mod 10000."""
    return str(20000 + int(env.get('SLURM_JOB_ID', '0')) % 10000)


def srun_torch_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The torchrun variables of this ``srun`` task ({} outside a step); values already in ``env`` win."""
    if not in_srun_step(env) or int(env['SLURM_STEP_NUM_TASKS']) < 2:
        return {}  # (a step of one task is a plain launch: a world of one)
    per_node = expand_tasks_per_node(env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE', '1'))
    node = int(env.get('SLURM_NODEID', '0'))
    out = {'RANK': env['SLURM_PROCID'], 'WORLD_SIZE': env['SLURM_STEP_NUM_TASKS'],
           'LOCAL_RANK': env.get('SLURM_LOCALID', '0'),
           'LOCAL_WORLD_SIZE': str(per_node[node] if node < len(per_node) else 1),
           'MASTER_ADDR': env.get('MASTER_ADDR') or first_host(env),
           'MASTER_PORT': env.get('MASTER_PORT') or default_port(env)}
    return {k: env.get(k) or v for k, v in out.items()}


def apply_srun_env(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Write ``srun_torch_env`` into ``environ``; True when this is an ``srun`` task (and it was written)."""
    values = srun_torch_env(environ)
    environ.update(values)
    return bool(values)
