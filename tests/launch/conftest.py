"""Fixtures of the launch tests: a real two-node Slurm on loopback (``cluster.sh``), and one tiny training setup
(model, chat data, a YAML of training flags) with its single-process reference trajectory."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent / 'trainers'))  # train_cases.write_chat_data

from testing_utils import build_tiny_model, read_jsonl  # noqa: E402
from train_cases import write_chat_data  # noqa: E402

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
LOSS_TOL = 1e-5
GRAD_NORM_RTOL = 1e-4
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


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
    """A fresh two-node Slurm (slurmctld + ``slurmd -N n1``, ``-N n2``) on 127.0.0.1; yields the environment
    for sbatch/srun/scancel (``SLURM_CONF``). Skips where Slurm is not installed."""
    path = base_env()['PATH']
    missing = [b for b in ('slurmctld', 'slurmd', 'sbatch', 'srun', 'scontrol') if not shutil.which(b, path=path)]
    if missing:
        pytest.skip(f'Slurm is not installed ({", ".join(missing)} missing): apt-get install slurm-wlm, '
                    f'or run `make test` as root')
    d = tmp_path_factory.mktemp('slurm')
    env = base_env(CTLD_PORT=free_port(), NODE_PORT0=free_port_pair())
    up = subprocess.run([str(HERE / 'cluster.sh'), 'start', str(d), '2'], env=env, capture_output=True, text=True,
                        timeout=60)
    if up.returncode != 0:
        subprocess.run([str(HERE / 'cluster.sh'), 'stop', str(d)], env=env, timeout=60)
        pytest.fail(f'the test Slurm did not start:\n{up.stdout}\n{up.stderr}')
    try:
        # the fake nodes n1, n2 do not resolve: the scripts' MASTER_ADDR (the job's first host) is 127.0.0.1;
        # the #SBATCH lines meant for a GPU cluster are overridden by Slurm's own variables
        yield base_env(SLURM_CONF=d / 'slurm.conf', MASTER_ADDR='127.0.0.1', SBATCH_PARTITION='debug',
                       SBATCH_GPUS_PER_NODE=0)
    finally:
        subprocess.run([str(HERE / 'cluster.sh'), 'stop', str(d)], env=env, timeout=60)


@pytest.fixture(scope='session')
def train_setup(tmp_path_factory, smollm2_dir) -> dict:
    """A tiny llama, 48 chat rows, the YAML of flags, and the single-process run's logging.jsonl."""
    root = tmp_path_factory.mktemp('launch')
    setup = {'root': root, 'model': build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=0,
                                                     num_hidden_layers=4, num_key_value_heads=2),
             'dataset': write_chat_data(root / 'chat.jsonl'), 'config': root / 'train.yaml',
             'cache': root / 'cache'}  # one encode cache shared by every run: rank 0 writes it once
    setup['config'].write_text(TRAIN_YAML)
    ref = subprocess.run(['megaswift', 'sft', str(setup['config']), '--model', setup['model'], '--dataset',
                          setup['dataset'], '--output_dir', str(root / 'ref')],
                         env=base_env(MEGASWIFT_CACHE=setup['cache']), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-5000:]
    setup['reference'] = read_jsonl(root / 'ref' / 'logging.jsonl')
    return setup


def assert_follows(run_dir: Path, reference: list[dict], steps=(1, 2, 3, 4, 5, 6)) -> list[dict]:
    """The run's logging.jsonl has every step and follows the reference: loss <= 1e-5, grad norm rel <= 1e-4."""
    got = [r for r in read_jsonl(Path(run_dir) / 'logging.jsonl') if 'loss' in r]
    assert [r['step'] for r in got] == list(steps), got
    for g, w in zip(got, reference):
        assert abs(g['loss'] - w['loss']) <= LOSS_TOL, (g, w)
        assert abs(g['grad_norm'] - w['grad_norm']) <= GRAD_NORM_RTOL * w['grad_norm'], (g, w)
        assert abs(g['lr'] - w['lr']) <= 1e-12, (g, w)
    return got


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
