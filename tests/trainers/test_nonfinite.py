"""``--on_nonfinite abort|skip`` on real tiny runs, and strict JSON logs.

With ``--lr 1e6`` the tiny model's grad norm is NaN from step 3 (step 1 trains, its huge update leaves step 2 with
a zero gradient, then the parameters blow up). ``abort`` (the default) stops every rank at that step with one error
line naming the step and its samples, and saves nothing of it; ``skip`` drops that step's update (parameters,
optimizer state and lr schedule as after step 2) and counts it. The JSON files the runs write are parsed strictly
(Python's ``json`` accepts NaN unless told otherwise).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from train_cases import write_chat_data


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f'not JSON: {constant}')
    return json.loads(text, parse_constant=refuse)


def strict_jsonl(path: Path) -> list[dict]:
    return [strict_loads(line) for line in path.read_text().splitlines() if line.strip()]


def safetensors_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path / 'model.safetensors'))


def tensor_shards(out: Path, step: int, part: str = '') -> dict[str, bytes]:
    """The tensor files of a checkpoint's model (``part=''``) or optimizer (``'optim'``) as saved by torch_dist."""
    return {p.name: p.read_bytes() for p in sorted((out / f'iter_{step:07d}' / part).glob('*.distcp'))}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory, tiny_llama_dir):
    return {'model': tiny_llama_dir, 'data': write_chat_data(tmp_path_factory.mktemp('nonfinite') / 'chat.jsonl',
                                                             n=40, seed=1)}


def huge_lr_run(tiny, out: Path, *flags: str) -> list[str]:
    return ['sft', '--model', tiny['model'], '--dataset', tiny['data'], '--max_length', '64', '--packing', 'true',
            '--global_batch_size', '4', '--logging_steps', '1', '--lr', '1e6', '--output_dir', out, *flags]


@pytest.mark.slow
def test_huge_lr_aborts_on_every_rank_at_the_step_and_saves_nothing_of_it(tiny, run_cli, tmp_path):
    """PP=2 under torchrun: rank 0 (first stage) never computes the loss, rank 1 (last stage) does; both stop at
    step 3 together. The checkpoint of step 2 (before it) is kept and finite; there is none after it."""
    out = tmp_path / 'abort'
    env = {'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1', 'NPROC_PER_NODE': '2'}
    proc = run_cli(huge_lr_run(tiny, out, '--max_steps', '5', '--save_steps', '2',
                               '--pipeline_model_parallel_size', '2'), env=env, check=False, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if 'megaswift sft: error:' in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    match = re.search(r'^megaswift sft: error: non-finite grad norm at step 3 \(loss [\d.]+, grad norm nan\); '
                      r'samples of the step: \[([\d, ]+)\]\. No checkpoint', errors[0])
    assert match, errors[0]
    samples = [int(s) for s in match[1].split(', ')]
    assert len(samples) >= 4 and all(0 <= s < 40 for s in samples), samples  # 4 packed rows of dataset rows
    # every rank stopped on the agreed verdict, none on an error of its own (report_failure's 'rank R of W failed')
    assert re.search(r'\[megaswift rank1\] INFO .* step 3: non-finite grad norm, found by the ranks together',
                     proc.stderr), proc.stderr[-3000:]
    assert not re.search(r'rank \d of 2 on .* failed:', proc.stderr), proc.stderr[-3000:]

    logs = strict_jsonl(out / 'logging.jsonl')
    assert [r['step'] for r in logs] == [1, 2]
    assert all(math.isfinite(r['loss']) and math.isfinite(r['grad_norm']) for r in logs)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(('iter_', 'checkpoint-'))) == \
        ['checkpoint-2', 'iter_0000002']  # neither --save_steps 2 (step 4) nor --save_last
    assert (out / 'latest_checkpointed_iteration.txt').read_text() == '2'
    weights = safetensors_weights(out / 'checkpoint-2')
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_skip_drops_the_step_and_counts_it(tiny, run_cli, tmp_path):
    """The same run with --on_nonfinite skip goes on: step 3's update is dropped, so the checkpoints of steps 2 and
    3 hold the same weights and optimizer state (those of steps 1 and 2 differ: a real update), the lr schedule
    stays at step 2 and the step is counted."""
    out = tmp_path / 'skip'
    env = {'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    run_cli(huge_lr_run(tiny, out, '--max_steps', '3', '--save_steps', '1', '--save_safetensors', 'false',
                        '--on_nonfinite', 'skip'), env=env)
    logs = strict_jsonl(out / 'logging.jsonl')
    assert [r['step'] for r in logs] == [1, 2, 3]
    assert 'nonfinite' not in logs[1] and 'nonfinite_skipped' not in logs[1]
    assert logs[2]['nonfinite'] == ['grad_norm'] and logs[2]['grad_norm'] is None, logs[2]
    assert logs[2]['nonfinite_skipped'] == 1 and logs[2]['lr'] == logs[1]['lr']

    for part in ('', 'optim'):  # model, optimizer state
        assert tensor_shards(out, 2, part) and tensor_shards(out, 2, part) == tensor_shards(out, 3, part), part
        assert tensor_shards(out, 1, part) != tensor_shards(out, 2, part), part

    states = {s: strict_loads((out / f'iter_{s:07d}' / 'trainer_state.json').read_text()) for s in (2, 3)}
    assert states[3]['scheduler']['num_steps'] == states[2]['scheduler']['num_steps'] == 2
    assert (states[2]['nonfinite_skipped'], states[3]['nonfinite_skipped']) == (0, 1)
    assert states[3]['log_history'][2]['grad_norm'] is None  # strict JSON in the checkpoint too


def test_jsonl_log_is_strict_json(tmp_path):
    """NaN/inf become null, listed under 'nonfinite' (a resumed run rewrites the kept lines the same way); the
    printed line still shows nan."""
    from types import SimpleNamespace

    from megaswift.callbacks import JsonlCallback, PrintCallback
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path)), is_main_process=True,
                              state=SimpleNamespace(global_step=1, max_steps=2, log_history=[]))
    cb = JsonlCallback(trainer.args)
    cb.on_log(trainer, {'step': 1, 'loss': float('nan'), 'grad_norm': float('inf'), 'lr': 1e-3,
                        'loss_per_sample': torch.tensor([1.0, float('-inf')])})
    cb.on_train_end(trainer)
    (tmp_path / 'logging.jsonl').open('a').write('{"step": 1, "eval_loss": NaN}\n')  # as an older megaswift wrote
    trainer.state.global_step = 1
    cb.on_train_begin(trainer)  # resume at step 1: the kept lines are rewritten
    cb.on_train_end(trainer)
    first, second = strict_jsonl(tmp_path / 'logging.jsonl')
    assert first == {'step': 1, 'loss': None, 'grad_norm': None, 'lr': 1e-3, 'loss_per_sample': [1.0, None],
                     'nonfinite': ['grad_norm', 'loss', 'loss_per_sample']}
    assert second == {'step': 1, 'eval_loss': None, 'nonfinite': ['eval_loss']}

    printed = []
    shown = PrintCallback(SimpleNamespace())
    shown._write = printed.append
    shown.on_log(trainer, {'step': 1, 'loss': float('nan')})
    assert printed and 'loss=nan' in printed[0]


def test_saving_refuses_nonfinite_parameters():
    from megaswift.trainers.nonfinite import NonFiniteError, check_parameters_finite
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    check_parameters_finite([model], step=7)
    with torch.no_grad():
        model[1].weight[0, 2] = float('nan')
    with pytest.raises(NonFiniteError, match=r"step 7: the parameters hold NaN/inf \(1 parameter tensors .*'1.weight'"):
        check_parameters_finite([model], step=7)


def test_on_nonfinite_is_checked_at_parse_time(monkeypatch):
    from megaswift.arguments.train import SftArguments
    from megaswift.cli.parser import CLIError, parse_args
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert parse_args(SftArguments, ['--model', 'm', '--dataset', 'd.jsonl']).on_nonfinite == 'abort'
    with pytest.raises(CLIError, match=r"--on_nonfinite: unknown value 'ignore' \(abort, skip\)"):
        parse_args(SftArguments, ['--model', 'm', '--dataset', 'd.jsonl', '--on_nonfinite', 'ignore'])



def _agree_on_two_ranks(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from megaswift.utils.dist import any_rank
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:  # flags: seen on rank 1 only, on rank 0 only, on no rank (the negative control)
        Path(out, f'rank{rank}.json').write_text(json.dumps(any_rank([rank == 1, rank == 0, False])))
    finally:
        dist.destroy_process_group()


def test_a_flag_of_one_rank_reaches_every_rank(tmp_path):
    """The verdict's all-reduce on its own (2 gloo ranks): what any rank saw, every rank acts on."""
    torch.multiprocessing.spawn(_agree_on_two_ranks, args=(str(tmp_path / 'store'), str(tmp_path)), nprocs=2)
    assert [strict_loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)] == [[True, True, False]] * 2
