"""Fixtures of the launch tests: a real two-node Slurm on loopback (``cluster.sh``), and one tiny training setup
(model, chat data, a YAML of training flags) with its single-process reference trajectory."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'trainers'))  # train_cases.write_chat_data

from launch_utils import TRAIN_YAML, base_env, free_port, free_port_pair  # noqa: E402
from testing_utils import build_tiny_model, read_jsonl  # noqa: E402
from train_cases import write_chat_data  # noqa: E402


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
