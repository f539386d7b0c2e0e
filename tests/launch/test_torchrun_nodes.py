"""``launch/torchrun/sft.sh``, the plain multi-node recipe without Slurm: two "nodes" on localhost (``NNODES=2``,
``NODE_RANK`` 0 and 1, one process each) follow the single-process trajectory, through a stop: SIGTERM to each
node's ``megaswift`` (passed on to torchrun's agent, then to the workers) while step 3 runs stops both after step 3
with a checkpoint of step 3 (a step no --save_steps writes), and the same command continues it."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch_utils import assert_follows, base_env, free_port

pytestmark = pytest.mark.slow
SFT_SH = Path(__file__).resolve().parents[2] / 'launch' / 'torchrun' / 'sft.sh'
PLUGINS = Path(__file__).resolve().parent / 'launch_plugins.py'


def start_nodes(setup, out, log_dir, *flags, **extra):
    port = free_port()
    procs = []
    for node in (0, 1):
        env = base_env(NNODES=2, NODE_RANK=node, MASTER_ADDR='127.0.0.1', MASTER_PORT=port, NPROC_PER_NODE=1,
                       MODEL=setup['model'], DATASET=setup['dataset'], OUTPUT_DIR=out, CONFIG=setup['config'],
                       MEGASWIFT_CACHE=setup['cache'], **extra)
        with open(log_dir / f'node{node}.log', 'a') as log:  # (the script execs megaswift: this pid is its)
            procs.append(subprocess.Popen(['bash', str(SFT_SH), *flags], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    return procs


def logs(log_dir, tail: int | None = 3000) -> str:
    """Both nodes' logs: their last ``tail`` characters each for a failure message, all of them (``tail=None``) to
    look for a line (torchrun's agent prints a traceback of its own when SIGTERM reaches it, which can push the
    start-up lines out of any tail)."""
    return '\n'.join((log_dir / f'node{n}.log').read_text()[-tail if tail else 0:] for n in (0, 1))


def wait_all(procs, log_dir, timeout=300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(logs(log_dir))


def test_two_nodes_on_localhost_follow_single_process_through_sigterm(train_setup, tmp_path):
    out, flags = tmp_path / 'out', ['--save_steps', '2']
    procs = start_nodes(train_setup, out, tmp_path, *flags, '--external_plugins', str(PLUGINS), '--callbacks',
                        'pause_after_log', MEGASWIFT_TEST_PAUSE_STEP=3, MEGASWIFT_TEST_PAUSE_S=5)
    deadline = time.time() + 240
    while not (out / 'logging.jsonl').exists() or '"step": 3' not in (out / 'logging.jsonl').read_text():
        assert time.time() < deadline and all(p.poll() is None for p in procs), logs(tmp_path)
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    wait_all(procs, tmp_path)
    full = logs(tmp_path, tail=None)
    assert 'DP=2' in full and 'stopped at step 3 with a checkpoint' in full, logs(tmp_path)
    assert (out / 'latest_checkpointed_iteration.txt').read_text().strip() == '3'
    assert wait_all(start_nodes(train_setup, out, tmp_path, *flags), tmp_path) == [0, 0], logs(tmp_path)
    assert 'resumed from' in logs(tmp_path, tail=None)
    assert_follows(out, train_setup['reference'])
