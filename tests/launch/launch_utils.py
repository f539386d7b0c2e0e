"""Helpers of the launch tests (a module of its own: several conftest.py files exist, none importable by name)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing_utils import read_jsonl

REPO = Path(__file__).resolve().parents[2]

# the flags of tests/trainers/train_cases.py's base case: packed rows of <= 64 tokens, global batch 4, 6 steps
TRAIN_YAML = """max_length: 64
packing: true
global_batch_size: 4
micro_batch_size: 1
max_steps: 6
logging_steps: 1
lr: 1.0e-3
min_lr: 1.0e-4
warmup_steps: 1
lr_decay_style: cosine
weight_decay: 0.1
clip_grad: 1.0
save_steps: 1000
save_last: false
save_safetensors: false
seed: 42
"""
# what the shipped scripts read from the environment; the tests set their own
LAUNCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'NNODES',
               'NODE_RANK', 'NPROC_PER_NODE', 'TORCHELASTIC_RUN_ID')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p + 1 free (the two slurmd)."""
    for _ in range(50):
        p = free_port()
        if p < 65535:
            with socket.socket() as s:
                try:
                    s.bind(('127.0.0.1', p + 1))
                    return p
                except OSError:
                    continue
    raise RuntimeError('no two consecutive free ports')


def base_env(**extra) -> dict:
    """This environment without any launcher variables, with the venv's megaswift first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(('SLURM_', 'SBATCH_'))}
    # the venv's megaswift first; the Slurm daemons live in sbin, which a non-root PATH may lack
    env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), env.get('PATH', ''), '/usr/sbin', '/sbin'])
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_follows(run_dir: Path, reference: list[dict], steps=(1, 2, 3, 4, 5, 6)) -> None:
    """The run's logging.jsonl has every step and follows the reference as the layout tests require (loss within
    1e-5, grad norm within 1e-4 relative: ``test_train_layouts.assert_same_trajectory``), with the same lr."""
    from test_train_layouts import assert_same_trajectory  # tests/trainers (conftest.py puts it on sys.path)

    def columns(rows):
        return {k: [r[k] for r in rows] for k in ('loss', 'grad_norm', 'lr')}
    got = [r for r in read_jsonl(Path(run_dir) / 'logging.jsonl') if 'loss' in r]
    assert [r['step'] for r in got] == list(steps), got
    assert_same_trajectory(str(run_dir), columns(got), columns(reference))
    assert max(abs(g - w) for g, w in zip(columns(got)['lr'], columns(reference)['lr'])) <= 1e-12


def wait_job(job_id: str, env: dict, timeout: float = 240) -> str:
    """Poll until the job has left the queue (faster than ``sbatch --wait``); its final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], env=env, capture_output=True, text=True)
        if not out.stdout.strip():
            break
        time.sleep(0.2)
    else:
        subprocess.run(['scancel', job_id], env=env)
        pytest.fail(f'job {job_id} still running after {timeout} s')
    show = subprocess.run(['scontrol', 'show', 'job', job_id], env=env, capture_output=True, text=True).stdout
    return next((w.split('=', 1)[1] for w in show.split() if w.startswith('JobState=')), 'UNKNOWN')


def log_tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors='replace')[-n:] if path.exists() else f'({path} missing)'
