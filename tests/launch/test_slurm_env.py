"""The torchrun environment megaswift derives under Slurm (``megaswift/utils/slurm.py``) and the torchrun command
line it relaunches with (``megaswift/cli/launch.py``), from the variables Slurm 22.05 sets (as printed by a real
``srun`` in the batch script and in a step; see the slow tests for the real thing)."""
from __future__ import annotations

import pytest

from megaswift.cli.launch import torchrun_argv
from megaswift.utils.slurm import SlurmError, expand_tasks_per_node, first_host, srun_torch_env

# `srun -N2 --ntasks-per-node=2`, task 3 (second task on the second node)
STEP = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'n[1-2]', 'SLURM_STEP_NODELIST': 'n[1-2]',
        'SLURM_STEP_NUM_TASKS': '4', 'SLURM_NTASKS': '4', 'SLURM_PROCID': '3', 'SLURM_LOCALID': '1',
        'SLURM_NODEID': '1', 'SLURM_STEP_TASKS_PER_NODE': '2(x2)', 'SLURM_STEP_ID': '0'}
# the batch script itself: the allocation's variables, no step
BATCH = {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '4', 'SLURM_PROCID': '0',
         'SLURM_LOCALID': '0', 'SLURM_NODEID': '0', 'SLURM_TASKS_PER_NODE': '2(x2)', 'SLURM_NNODES': '2'}


def test_tasks_per_node_expands():
    assert expand_tasks_per_node('2(x3),1') == [2, 2, 2, 1]
    assert expand_tasks_per_node('8') == [8]
    with pytest.raises(SlurmError):
        expand_tasks_per_node('two')


def test_srun_task_gets_its_rank_world_and_local_rank():
    env = srun_torch_env({**STEP, 'MASTER_ADDR': '10.1.2.3'})
    assert env == {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2',
                   'MASTER_ADDR': '10.1.2.3', 'MASTER_PORT': str(20000 + 4242)}
    # uneven steps: node 1 of `3,1` holds one task
    env = srun_torch_env({**STEP, 'MASTER_ADDR': 'h', 'SLURM_STEP_TASKS_PER_NODE': '3,1', 'SLURM_PROCID': '3',
                          'SLURM_LOCALID': '0', 'MASTER_PORT': '29511'})
    assert (env['LOCAL_WORLD_SIZE'], env['MASTER_PORT']) == ('1', '29511')


def test_no_mapping_outside_a_multi_task_step():
    assert srun_torch_env(BATCH) == {}                                   # the batch script: SLURM_NTASKS is the job's
    assert srun_torch_env({**STEP, 'LOCAL_RANK': '0', 'RANK': '5'}) == {}  # a torchrun worker keeps torchrun's
    assert srun_torch_env({**STEP, 'SLURM_STEP_NUM_TASKS': '1'}) == {}   # one task: a plain world of one
    assert srun_torch_env({}) == {}


def test_no_localhost_guess_without_scontrol(monkeypatch, tmp_path):
    """Without scontrol and MASTER_ADDR every node would pick itself as master and hang alone: an error instead."""
    monkeypatch.setenv('PATH', str(tmp_path))
    with pytest.raises(SlurmError, match='MASTER_ADDR'):
        first_host(STEP)


def test_relaunch_under_srun_uses_c10d_on_the_master(monkeypatch):
    for k in ('LOCAL_RANK', 'TORCHELASTIC_RUN_ID', 'MASTER_PORT', 'NODE_RANK'):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**STEP, 'SLURM_STEP_NUM_TASKS': '2', 'NNODES': '2', 'NPROC_PER_NODE': '4',
                 'MASTER_ADDR': '10.1.2.3'}.items():
        monkeypatch.setenv(k, v)
    argv = torchrun_argv('sft', ['--lr', '1e-4'])
    assert '--rdzv_backend=c10d' in argv and '--rdzv_endpoint=10.1.2.3:24242' in argv and '--rdzv_id=4242' in argv
    assert not any(a.startswith('--node_rank') for a in argv)  # c10d ignores it; ranks follow the rendezvous
    monkeypatch.delenv('SLURM_STEP_NUM_TASKS')                    # plain multi-node torchrun: static rendezvous
    monkeypatch.setenv('NODE_RANK', '1')
    argv = torchrun_argv('sft', [])
    assert '--node_rank=1' in argv and '--master_addr=10.1.2.3' in argv and '--master_port=29500' in argv
