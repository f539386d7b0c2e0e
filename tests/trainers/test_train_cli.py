"""``megaswift sft`` / ``megaswift pt`` through the CLI, in subprocesses: an uninterrupted run, the same run
killed with SIGKILL mid-training and resumed with ``--resume_from_checkpoint true`` (identical logs; also one
rank of a DP=2 torchrun job), the
checkpoint exported with ``megaswift export --to_hf``, and a one-line input error. (``pt_main`` runs in
``train_cases.py``.)
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from testing_utils import build_tiny_model
from train_cases import write_chat_data

pytestmark = pytest.mark.slow

KILL_PLUGIN = '''
import os, signal
from megaswift.trainers import loop

_train_step = loop.Trainer.train_step


def train_step(self):
    # after the step-3 checkpoint and the step-4 log, before step 5; under torchrun only rank KILL_RANK dies
    if self.state.global_step == 4 and os.environ.get('RANK', '0') == os.environ.get('KILL_RANK', '0'):
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self)


loop.Trainer.train_step = train_step
'''


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp('train_cli')
    return {'root': root, 'model': build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=4),
            'data': write_chat_data(root / 'chat.jsonl', n=40, seed=1)}


def read_logs(out: Path) -> dict[int, dict]:
    logs = [json.loads(line) for line in (out / 'logging.jsonl').read_text().splitlines() if line.strip()]
    return {(r['step'], 'eval_loss' in r): r for r in logs}


def error_lines(proc, command='sft') -> list[str]:
    return [line for line in proc.stderr.splitlines() if f'megaswift {command}: error:' in line]


def test_sft_kill9_resume_and_export(tiny, run_cli, tmp_path):
    env = {'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    common = ['--model', tiny['model'], '--dataset', tiny['data'], '--max_length', '64', '--packing', 'true',
              '--global_batch_size', '4', '--max_steps', '6', '--save_steps', '3', '--logging_steps', '1',
              '--lr', '1e-3', '--warmup_steps', '1', '--split_dataset_ratio', '0.1', '--eval_steps', '3',
              '--save_total_limit', '1']
    a, b = tmp_path / 'a', tmp_path / 'b'
    run_cli(['sft', *common, '--output_dir', a], env=env)
    assert sorted(p.name for p in a.iterdir() if p.name.startswith(('iter_', 'checkpoint-'))) == \
        ['checkpoint-6', 'iter_0000006']  # --save_total_limit 1
    assert (a / 'latest_checkpointed_iteration.txt').read_text() == '6'

    plugin = tmp_path / 'kill_at_step5.py'
    plugin.write_text(KILL_PLUGIN)
    killed = run_cli(['sft', *common, '--output_dir', b, '--external_plugins', plugin], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (b / 'latest_checkpointed_iteration.txt').read_text() == '3'
    assert max(step for step, _ in read_logs(b)) == 4  # it got past the checkpoint before dying

    run_cli(['sft', *common, '--output_dir', b, '--resume_from_checkpoint', 'true'], env=env)
    want, got = read_logs(a), read_logs(b)
    assert sorted(got) == sorted(want) and len(want) == 8  # 6 train logs + 2 evaluations, no duplicates
    for key, rec in want.items():
        for field in ('loss', 'grad_norm', 'lr', 'eval_loss', 'eval_acc'):
            assert got[key].get(field) == rec.get(field), (key, field, got[key], rec)

    hf = tmp_path / 'a-hf'
    run_cli(['export', '--to_hf', 'true', '--mcore_model', a, '--output_dir', hf], env=env)
    from safetensors.torch import load_file
    exported, saved = load_file(hf / 'model.safetensors'), load_file(a / 'checkpoint-6' / 'model.safetensors')
    assert exported.keys() == saved.keys()
    assert all((exported[k] == saved[k]).all() for k in saved)
    original = load_file(Path(tiny['model']) / 'model.safetensors')
    assert not (original['model.layers.0.mlp.up_proj.weight'] == saved['model.layers.0.mlp.up_proj.weight']).all()


def test_kill9_of_one_rank_of_two_resumes_bit_exactly(tiny, run_cli, tmp_path):
    """DP=2 with the distributed optimizer under torchrun: rank 1 is killed with SIGKILL after the step-3
    checkpoint, torchrun takes the job down, and ``--resume_from_checkpoint true`` (sharded optimizer state,
    both ranks' RNG) continues with the logs of an uninterrupted DP=2 run."""
    env = {'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1', 'NPROC_PER_NODE': '2'}
    common = ['--model', tiny['model'], '--dataset', tiny['data'], '--max_length', '64', '--packing', 'true',
              '--global_batch_size', '4', '--max_steps', '6', '--save_steps', '3', '--logging_steps', '1',
              '--lr', '1e-3', '--warmup_steps', '1', '--use_distributed_optimizer', 'true',
              '--save_safetensors', 'false']
    a, b = tmp_path / 'a', tmp_path / 'b'
    run_cli(['sft', *common, '--output_dir', a], env=env)
    plugin = tmp_path / 'kill_rank1.py'
    plugin.write_text(KILL_PLUGIN)
    killed = run_cli(['sft', *common, '--output_dir', b, '--external_plugins', plugin],
                     env={**env, 'KILL_RANK': '1'}, check=False)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert (b / 'latest_checkpointed_iteration.txt').read_text() == '3'
    run_cli(['sft', *common, '--output_dir', b, '--resume_from_checkpoint', 'true'], env=env)
    want, got = read_logs(a), read_logs(b)
    assert sorted(got) == sorted(want) and len(want) == 6
    for key, rec in want.items():
        for field in ('loss', 'grad_norm', 'lr'):
            assert got[key][field] == rec[field], (key, field, got[key], rec)


def test_bad_input_is_one_line(tiny, run_cli, tmp_path):
    """(The data and model checks behind these lines are tested in-process in test_train_inputs.py.)"""
    proc = run_cli(['pt', '--model', tiny['model'], '--dataset', tiny['data'], '--global_batch_size', '3',
                    '--micro_batch_size', '2'], check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc, 'pt')
    assert len(lines) == 1 and 'is not divisible by --micro_batch_size 2' in lines[0], proc.stderr[-3000:]
