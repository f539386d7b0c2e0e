"""megaswift.callbacks driven by a fake trainer: registry, logging.jsonl (and its resume), loss curve,
progress printing, reporters (with fake tracker modules) and the user-facing errors."""
from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import pytest

from megaswift.callbacks import (Callback, JsonlCallback, LossCurveCallback, MissingReporterError, PrintCallback,
                                 TensorBoardCallback, UnknownCallbackError, WandbCallback, build_callbacks, call_hook,
                                 callbacks)

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def make_trainer(tmp_path, max_steps=10, global_step=0, is_main=True, **args):
    args = SimpleNamespace(output_dir=str(tmp_path), logging_steps=2, report_to=None, **args)
    state = SimpleNamespace(global_step=global_step, max_steps=max_steps, epoch=0.0, log_history=[])
    return SimpleNamespace(args=args, state=state, is_main_process=is_main)


def train_loss(step):
    return 2.0 * math.exp(-step / 6) + 0.1


def drive(cbs, trainer, until, eval_every=4, save_every=4, begin=True, end=True):
    """The trainer's hook sequence from trainer.state.global_step to ``until``."""
    if begin:
        call_hook(cbs, 'on_train_begin', trainer)
    while trainer.state.global_step < until:
        call_hook(cbs, 'on_step_begin', trainer)
        trainer.state.global_step += 1
        step = trainer.state.global_step
        trainer.state.epoch = step / trainer.state.max_steps
        call_hook(cbs, 'on_step_end', trainer)
        if step % trainer.args.logging_steps == 0:
            logs = {'step': step, 'loss': train_loss(step), 'lr': 1e-4 * (1 - step / 20), 'grad_norm': 1.5,
                    'tokens_per_sec': 1234.5, 'packing_efficiency': 0.93, 'memory_mb': 512.0, 'elapsed_s': 0.5 * step}
            trainer.state.log_history.append(logs)
            call_hook(cbs, 'on_log', trainer, logs)
        if step % eval_every == 0:
            call_hook(cbs, 'on_eval_begin', trainer)
            metrics = {'eval_loss': train_loss(step) + 0.2, 'eval_acc': 0.5}
            call_hook(cbs, 'on_eval_end', trainer, metrics)
            logs = {'step': step, **metrics}
            trainer.state.log_history.append(logs)
            call_hook(cbs, 'on_log', trainer, logs)
        if step % save_every == 0:
            ckpt = f'{trainer.args.output_dir}/checkpoint-{step}'
            call_hook(cbs, 'on_save', trainer, ckpt)
    if end:
        call_hook(cbs, 'on_train_end', trainer)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_registry_defaults_and_order(tmp_path, monkeypatch):
    assert {'print', 'jsonl', 'loss_curve', 'tensorboard', 'wandb', 'swanlab'} <= set(callbacks)
    trainer = make_trainer(tmp_path)
    assert [type(c) for c in build_callbacks([], trainer.args)] == [PrintCallback, JsonlCallback, LossCurveCallback]

    class Mine(Callback):
        pass
    callbacks['mine'] = Mine
    try:
        fake = types.ModuleType('tensorboard')
        monkeypatch.setitem(sys.modules, 'tensorboard', fake)
        trainer.args.report_to = ['tensorboard']
        cbs = build_callbacks('mine,jsonl print', trainer.args)  # duplicates of the defaults are dropped
        assert [type(c) for c in cbs] == [PrintCallback, JsonlCallback, LossCurveCallback, Mine, TensorBoardCallback]
        assert all(c.args is trainer.args for c in cbs)
        trainer.args.report_to = 'none'
        assert len(build_callbacks(['mine'], trainer.args)) == 4
    finally:
        del callbacks['mine']


def test_unknown_names_suggest(tmp_path):
    trainer = make_trainer(tmp_path)
    with pytest.raises(UnknownCallbackError, match=r"unknown callback 'jsnl'.*did you mean 'jsonl'\?") as info:
        build_callbacks(['jsnl'], trainer.args)
    assert isinstance(info.value, ValueError)
    trainer.args.report_to = ['tensorbord']
    with pytest.raises(ValueError, match=r"--report_to.*did you mean 'tensorboard'\?"):
        build_callbacks([], trainer.args)


@pytest.mark.parametrize('name', ['wandb', 'swanlab', 'tensorboard'])
def test_missing_reporter_hint(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import of it fails
    trainer = make_trainer(tmp_path)
    trainer.args.report_to = name
    with pytest.raises(MissingReporterError, match=rf"--report_to {name} needs the '{name}' package.*"
                                                   rf'pip install {name}') as info:
        build_callbacks([], trainer.args)
    assert isinstance(info.value, ImportError)


def test_jsonl_lines_flushed_and_curve(tmp_path):
    trainer = make_trainer(tmp_path)
    cbs = build_callbacks([], trainer.args)
    drive(cbs, trainer, until=4, end=False)
    log = tmp_path / 'logging.jsonl'
    lines = read_lines(log)  # readable before train end: flushed per line
    assert [(r['step'], 'eval_loss' in r) for r in lines] == [(2, False), (4, False), (4, True)]
    assert lines[0]['loss'] == pytest.approx(train_loss(2)) and lines[0]['tokens_per_sec'] == 1234.5
    png = tmp_path / 'loss_curve.png'
    assert png.read_bytes()[:8] == PNG_MAGIC  # written on save
    drive(cbs, trainer, until=10, begin=False)
    lines = read_lines(log)
    assert [r['step'] for r in lines if 'loss' in r] == [2, 4, 6, 8, 10]
    assert [r['step'] for r in lines if 'eval_loss' in r] == [4, 8]
    from PIL import Image
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size == (800, 450)


def test_resume_truncates_later_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=30)
    drive(build_callbacks([], trainer.args), trainer, until=10, end=False)  # "crashed" after step 10
    log = tmp_path / 'logging.jsonl'
    with open(log, 'a') as f:
        f.write('{"step": 11, "lo')  # a torn last line
    resumed = make_trainer(tmp_path, max_steps=30, global_step=8)  # last checkpoint: step 8
    cbs = build_callbacks([], resumed.args)
    drive(cbs, resumed, until=30)
    lines = read_lines(log)
    train_steps = [r['step'] for r in lines if 'loss' in r]
    assert train_steps == list(range(2, 31, 2))
    assert [r['step'] for r in lines if 'eval_loss' in r] == [4, 8, 12, 16, 20, 24, 28]
    curve = next(c for c in cbs if isinstance(c, LossCurveCallback))
    assert sorted(curve.train) == train_steps and sorted(curve.eval) == [4, 8, 12, 16, 20, 24, 28]
    assert (tmp_path / 'loss_curve.png').read_bytes()[:8] == PNG_MAGIC

    fresh = make_trainer(tmp_path, max_steps=4)  # a new run (step 0) in the same directory starts over
    drive(build_callbacks([], fresh.args), fresh, until=2)
    assert [r['step'] for r in read_lines(log)] == [2]


def test_non_main_process_writes_nothing(tmp_path, capsys):
    trainer = make_trainer(tmp_path, is_main=False)
    drive(build_callbacks([], trainer.args), trainer, until=10)
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr()
    assert out.out == '' and out.err == ''


def test_print_progress_and_lines(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    cbs = build_callbacks([], trainer.args)
    drive(cbs, trainer, until=10)
    out = capsys.readouterr()
    text = out.out + out.err
    assert '[step 2/10 (20.0%)] loss=1.5331 lr=9.000e-05 grad_norm=1.5 tok/s=1234.5 pack_eff=0.93' in text
    assert 'eta 0:00:' in text and 'elapsed 0:00:01' in text
    assert '[eval @ step 4] eval_loss=' in text and 'saved checkpoint' in text and '[train end] 10 steps' in text
    assert text.count('eval_loss=') == 2  # printed once per evaluation (not again by on_log)
    assert '10/10' in text  # the tqdm bar reached the end
    printer = next(c for c in cbs if isinstance(c, PrintCallback))
    assert printer.bar is None  # closed at train end


def test_tensorboard_with_fake_writer(tmp_path, monkeypatch):
    scalars, closed = [], []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            closed.append(self.log_dir)

    monkeypatch.setitem(sys.modules, 'tensorboard', types.ModuleType('tensorboard'))
    fake = types.ModuleType('torch.utils.tensorboard')
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', fake)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.args.report_to = 'tensorboard'
    drive(build_callbacks([], trainer.args), trainer, until=4)
    assert ('train/loss', pytest.approx(train_loss(2)), 2) in scalars
    assert ('eval/loss', pytest.approx(train_loss(4) + 0.2), 4) in scalars
    assert not any(tag.endswith('/step') for tag, _, _ in scalars)
    assert closed == [str(tmp_path / 'runs')]


def test_wandb_with_fake_module(tmp_path, monkeypatch):
    calls = {}

    class Run:
        def log(self, values, step):
            calls.setdefault('log', []).append((step, values))

        def finish(self):
            calls['finish'] = True

    fake = types.ModuleType('wandb')
    fake.run = None
    fake.init = lambda **kw: calls.setdefault('init', kw) and Run()
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    trainer = make_trainer(tmp_path, max_steps=4, wandb_project='proj', lr=1e-4, callbacks=['x'], obj=object())
    trainer.args.report_to = ['wandb']
    cbs = build_callbacks([], trainer.args)
    assert isinstance(cbs[-1], WandbCallback)
    drive(cbs, trainer, until=4)
    assert calls['init']['project'] == 'proj' and calls['init']['name'] == tmp_path.name
    assert calls['init']['config']['lr'] == 1e-4 and 'obj' not in calls['init']['config']
    assert [s for s, _ in calls['log']] == [2, 4, 4] and calls['log'][2][1] == {'eval/loss': pytest.approx(
        train_loss(4) + 0.2), 'eval/acc': 0.5}
    assert calls['finish']
