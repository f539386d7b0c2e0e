"""``--report_to tensorboard|wandb|swanlab``: experiment trackers, imported lazily.

Each reporter checks at construction (on every rank, before training) that its package is
installed and raises :class:`MissingReporterError` with the pip command otherwise; the package
itself is imported in ``on_train_begin`` on the main process only.

Scalars are named ``train/<key>`` and ``eval/<key>`` (for ``eval_<key>``) at x = ``logs['step']``.
Optional arguments read from ``args`` when present (ms-swift names): ``tensorboard_dir`` /
``logging_dir``; ``wandb_project``, ``wandb_exp_name``, ``wandb_save_dir``; ``swanlab_project``,
``swanlab_exp_name``, ``swanlab_workspace``, ``swanlab_mode``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from .base import Callback, numeric_items, register_callback, require_package


def _is_main(trainer) -> bool:
    return bool(getattr(trainer, 'is_main_process', True))


def tracker_scalars(logs: dict) -> tuple[int | None, dict[str, float]]:
    """``(step, {'train/loss': ..., 'eval/loss': ...})`` from one ``on_log`` dict."""
    values = numeric_items(logs)
    step = values.pop('step', None)
    out = {}
    for key, value in values.items():
        out[f'eval/{key[5:]}' if key.startswith('eval_') else f'train/{key}'] = value
    return (int(step) if step is not None else None), out


def args_config(args: Any) -> dict[str, Any]:
    """The plain (str/number/bool/None/list of those) fields of ``args``, for a tracker's run config."""
    raw = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(getattr(args, '__dict__', {}))
    simple = (str, int, float, bool, type(None))
    return {k: v for k, v in raw.items() if not k.startswith('_') and (
        isinstance(v, simple) or (isinstance(v, (list, tuple)) and all(isinstance(x, simple) for x in v)))}


def _run_name(args: Any, attr: str) -> str:
    return getattr(args, attr, None) or os.path.basename(os.path.normpath(args.output_dir))


@register_callback('tensorboard')
class TensorBoardCallback(Callback):
    """``torch.utils.tensorboard.SummaryWriter`` at ``args.tensorboard_dir`` (default ``output_dir/runs``)."""

    def __init__(self, args):
        super().__init__(args)
        require_package('tensorboard', 'tensorboard', '--report_to tensorboard')
        self.log_dir = (getattr(args, 'tensorboard_dir', None) or getattr(args, 'logging_dir', None)
                        or os.path.join(args.output_dir, 'runs'))
        self.writer = None

    def on_train_begin(self, trainer):
        if _is_main(trainer) and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.log_dir)

    def on_log(self, trainer, logs):
        if self.writer is None:
            return
        step, values = tracker_scalars(logs)
        step = trainer.state.global_step if step is None else step
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def on_train_end(self, trainer):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@register_callback('wandb')
class WandbCallback(Callback):
    """Weights & Biases: ``wandb.init`` at train begin (unless a run is active), ``wandb.log`` per log."""

    def __init__(self, args):
        super().__init__(args)
        require_package('wandb', 'wandb', '--report_to wandb')
        self.run = None

    def on_train_begin(self, trainer):
        if not _is_main(trainer) or self.run is not None:
            return
        import wandb
        self.run = wandb.run or wandb.init(
            project=getattr(self.args, 'wandb_project', None) or os.environ.get('WANDB_PROJECT') or 'megaswift',
            name=_run_name(self.args, 'wandb_exp_name'),
            dir=getattr(self.args, 'wandb_save_dir', None) or self.args.output_dir,
            config=args_config(self.args))

    def on_log(self, trainer, logs):
        if self.run is None:
            return
        step, values = tracker_scalars(logs)
        self.run.log(values, step=trainer.state.global_step if step is None else step)

    def on_train_end(self, trainer):
        if self.run is not None:
            self.run.finish()
            self.run = None


@register_callback('swanlab')
class SwanlabCallback(Callback):
    """SwanLab: ``swanlab.init`` at train begin, ``swanlab.log`` per log, ``swanlab.finish`` at the end."""

    def __init__(self, args):
        super().__init__(args)
        require_package('swanlab', 'swanlab', '--report_to swanlab')
        self.module = None

    def on_train_begin(self, trainer):
        if not _is_main(trainer) or self.module is not None:
            return
        import swanlab
        kwargs = dict(project=getattr(self.args, 'swanlab_project', None) or 'megaswift',
                      experiment_name=_run_name(self.args, 'swanlab_exp_name'),
                      config=args_config(self.args), logdir=os.path.join(self.args.output_dir, 'swanlog'))
        for key in ('workspace', 'mode'):
            if getattr(self.args, f'swanlab_{key}', None):
                kwargs[key] = getattr(self.args, f'swanlab_{key}')
        swanlab.init(**kwargs)
        self.module = swanlab

    def on_log(self, trainer, logs):
        if self.module is None:
            return
        step, values = tracker_scalars(logs)
        self.module.log(values, step=trainer.state.global_step if step is None else step)

    def on_train_end(self, trainer):
        if self.module is not None:
            self.module.finish()
            self.module = None
