"""``launch/slurm/sft.sbatch`` as shipped, on a real two-node Slurm (``conftest.slurm``): 2 nodes x 2 processes
(torchrun per node, c10d rendezvous) follow the single-process trajectory; so does one ``srun`` task per rank
(megaswift maps SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID itself); ``scancel`` after a checkpoint
stops the job with a checkpoint of the step it was on, and resubmitting continues the same trajectory; a rank
that raises ends the job within seconds, its rank, host and error in the log; ``sample.sbatch`` shards a dataset
over the nodes and merges the shards."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from launch_utils import assert_follows, log_tail, wait_job
from testing_utils import read_jsonl

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SFT_SBATCH = REPO / 'launch' / 'slurm' / 'sft.sbatch'
PLUGINS = Path(__file__).resolve().parent / 'launch_plugins.py'


def script_env(slurm, setup, output_dir, gpus_per_node, **extra) -> dict:
    """Only paths and sizes: what a user sets before ``sbatch sft.sbatch``."""
    return {**slurm, 'MODEL': setup['model'], 'DATASET': setup['dataset'], 'OUTPUT_DIR': str(output_dir),
            'CONFIG': str(setup['config']), 'GPUS_PER_NODE': str(gpus_per_node), 'MEGASWIFT_CACHE': str(setup['cache']),
            **{k: str(v) for k, v in extra.items()}}


def submit(env, cwd, *flags) -> str:
    out = subprocess.run(['sbatch', '--parsable', str(SFT_SBATCH), *flags], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(';')[0]


def test_sbatch_torchrun_per_node_follows_single_process(slurm, train_setup, tmp_path):
    env = script_env(slurm, train_setup, tmp_path / 'out', gpus_per_node=2)
    t = time.time()
    proc = subprocess.run(['sbatch', '--wait', str(SFT_SBATCH)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    logs = list(tmp_path.glob('megaswift-sft-*.out'))
    assert proc.returncode == 0, proc.stderr + ''.join(log_tail(p) for p in logs)
    text = logs[0].read_text()
    assert '2 node(s) x 2' in text and 'DP=4' in text, text[-3000:]
    assert_follows(tmp_path / 'out', train_setup['reference'])
    print(f'sbatch --wait, 2 nodes x 2: {time.time() - t:.1f} s')


def test_srun_one_task_per_rank_follows_single_process(slurm, train_setup, tmp_path):
    setup = train_setup
    # --immediate: fail at once (not wait) when the cluster cannot hold 2 tasks per node
    proc = subprocess.run(['srun', '--nodes=2', '--ntasks-per-node=2', '--kill-on-bad-exit=1', '--immediate=60',
                           'megaswift', 'sft', str(setup['config']), '--model', setup['model'], '--dataset',
                           setup['dataset'], '--output_dir', str(tmp_path / 'out')],
                          env={**slurm, 'MEGASWIFT_CACHE': str(setup['cache'])}, cwd=tmp_path, capture_output=True,
                          stdin=subprocess.DEVNULL, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert 'DP=4' in proc.stdout + proc.stderr
    # every task knows its rank (the log prefix) and its node-local rank (two per node)
    assert all(f'[megaswift rank{r}]' in proc.stderr + proc.stdout for r in range(4))
    assert_follows(tmp_path / 'out', setup['reference'])


def test_scancel_checkpoints_and_resubmission_continues(slurm, train_setup, tmp_path):
    """2 nodes x 1, a checkpoint every 2 steps. The job is cancelled while it pauses after logging step 3: it must
    stop after step 3 with a checkpoint of step 3, which only the signal writes."""
    out = tmp_path / 'out'
    env = script_env(slurm, train_setup, out, gpus_per_node=1, MEGASWIFT_TEST_PAUSE_STEP=3, MEGASWIFT_TEST_PAUSE_S=5)
    flags = ['--save_steps', '2', '--save_last', 'true', '--external_plugins', str(PLUGINS)]
    job = submit(env, tmp_path, *flags, '--callbacks', 'pause_after_log')
    log = tmp_path / f'megaswift-sft-{job}.out'
    deadline = time.time() + 240
    while not (out / 'logging.jsonl').exists() or '"step": 3' not in (out / 'logging.jsonl').read_text():
        assert time.time() < deadline, log_tail(log)
        assert subprocess.run(['squeue', '-h', '-j', job], env=env, capture_output=True, text=True).stdout, \
            log_tail(log)  # still queued or running
        time.sleep(0.2)
    subprocess.run(['scancel', job], env=env, check=True)
    assert wait_job(job, env) == 'CANCELLED'
    text = log.read_text()
    assert 'received SIGTERM' in text and 'stopped at step 3 with a checkpoint' in text, text[-4000:]
    assert (out / 'latest_checkpointed_iteration.txt').read_text().strip() == '3'
    assert not list(out.glob('.iter_*.partial')), 'an unfinished save was left behind'
    # the same command again: the script sees the checkpoint and resumes
    job2 = submit(env, tmp_path, *flags)
    assert wait_job(job2, env) == 'COMPLETED', log_tail(tmp_path / f'megaswift-sft-{job2}.out')
    assert 'resumed from' in (tmp_path / f'megaswift-sft-{job2}.out').read_text()
    assert_follows(out, train_setup['reference'])


def test_failing_rank_fails_the_job_fast(slurm, train_setup, tmp_path):
    stamp = tmp_path / 'raised_at'
    env = script_env(slurm, train_setup, tmp_path / 'out', gpus_per_node=1, MEGASWIFT_TEST_FAIL_RANK=1,
                     MEGASWIFT_TEST_FAIL_STAMP=stamp)
    job = submit(env, tmp_path, '--external_plugins', str(PLUGINS), '--callbacks', 'fail_on_rank')
    state = wait_job(job, env)
    ended = time.time()
    text = (tmp_path / f'megaswift-sft-{job}.out').read_text()
    assert state == 'FAILED', text[-4000:]
    assert stamp.exists(), text[-4000:]
    raised_at, node = stamp.read_text().split()
    assert ended - float(raised_at) < 60, text[-4000:]
    # (c10d hands out ranks in the order the nodes join: rank 1 is on either node)
    assert f'rank 1 of 2 on {node} failed: RuntimeError: injected failure' in text, text[-4000:]


def test_sample_sbatch_shards_over_nodes_and_merges(slurm, train_setup, tmp_path):
    """``sample.sbatch`` as shipped, 2 nodes x 1 shard: shards 0of2 and 1of2, merged in dataset order, every prompt
    with its --num_return_sequences samples."""
    rows = read_jsonl(train_setup['dataset'])[:7]
    data = tmp_path / 'seven.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    env = {**slurm, 'GPUS_PER_NODE': '1', 'OUTPUT_DIR': str(tmp_path / 'out'), 'MEGASWIFT_HOME': str(REPO)}
    proc = subprocess.run(['sbatch', '--parsable', str(REPO / 'launch' / 'slurm' / 'sample.sbatch'), '--model',
                           train_setup['model'], '--dataset', str(data), '--num_return_sequences', '2',
                           '--max_new_tokens', '4', '--torch_dtype', 'float32'], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(';')[0]
    log = tmp_path / f'megaswift-sample-{job}.out'
    assert wait_job(job, env) == 'COMPLETED', log_tail(log)
    assert sorted(p.name for p in (tmp_path / 'out').glob('shards.shard*.jsonl')) == \
        ['shards.shard0of2.jsonl', 'shards.shard1of2.jsonl']
    merged = read_jsonl(tmp_path / 'out' / 'shards.jsonl')
    assert [m['messages'][0]['content'] for m in merged] == \
        [r['messages'][0]['content'] for r in rows for _ in range(2)]
