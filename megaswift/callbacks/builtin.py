"""The default callbacks: ``print`` (progress bar + log lines), ``jsonl`` (logging.jsonl) and
``loss_curve`` (loss_curve.png). All three act on the main process only."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from ..trainers.nonfinite import strict_json
from .base import Callback, numeric_items, register_callback, scalar

logger = logging.getLogger(__name__)
LOG_FILE = 'logging.jsonl'
CURVE_FILE = 'loss_curve.png'
_SHORT = {'tokens_per_sec': 'tok/s', 'packing_efficiency': 'pack_eff', 'memory_mb': 'mem_mb'}


def _is_main(trainer) -> bool:
    return bool(getattr(trainer, 'is_main_process', True))


def _fmt_value(value: Any) -> str:
    value = scalar(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f'{value:.3e}'
        return f'{value:.4f}'.rstrip('0').rstrip('.') if abs(value) < 1e4 else f'{value:.0f}'
    return str(value)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


@register_callback('print')
class PrintCallback(Callback):
    """A tqdm progress bar (steps, ETA, latest loss/lr) and one line per log / evaluation."""

    def __init__(self, args):
        super().__init__(args)
        self.bar = None
        self.start_time = None
        self.start_step = 0
        self._printed_eval: dict = {}

    def on_train_begin(self, trainer):
        if not _is_main(trainer):
            return
        from tqdm.auto import tqdm
        state = trainer.state
        self.start_time, self.start_step = time.time(), state.global_step
        self.bar = tqdm(total=state.max_steps or None, initial=state.global_step, desc='train', unit='step',
                        dynamic_ncols=True, disable=bool(getattr(self.args, 'disable_tqdm', False)))

    def on_step_end(self, trainer):
        if self.bar is not None:
            self.bar.update(max(trainer.state.global_step - self.bar.n, 0))

    def _write(self, line: str) -> None:
        from tqdm.auto import tqdm
        tqdm.write(line)

    def _eta(self, step: int, max_steps: int | None) -> str:
        if self.start_time is None or not max_steps or step <= self.start_step:
            return ''
        per_step = (time.time() - self.start_time) / (step - self.start_step)
        return f' eta {_fmt_time(per_step * (max_steps - step))}'

    def on_log(self, trainer, logs):
        if not _is_main(trainer):
            return
        step = logs.get('step', trainer.state.global_step)
        max_steps = trainer.state.max_steps
        if self.bar is not None and 'loss' in logs:
            self.bar.set_postfix({k: _fmt_value(logs[k]) for k in ('loss', 'lr') if k in logs}, refresh=False)
        shown = {k: v for k, v in logs.items() if k not in ('step', 'elapsed_s') and v is not None
                 and not (k in self._printed_eval and scalar(v) == self._printed_eval[k])}
        if not any(k != 'epoch' for k in shown):  # an eval-only log whose metrics on_eval_end printed
            return
        parts = [f'{_SHORT.get(k, k)}={_fmt_value(v)}' for k, v in shown.items()]
        where = f'{step}/{max_steps} ({100 * step / max_steps:.1f}%)' if max_steps else f'{step}'
        timing = ''
        if 'elapsed_s' in logs:
            timing = f' | elapsed {_fmt_time(float(scalar(logs["elapsed_s"])))}{self._eta(step, max_steps)}'
        self._write(f'[step {where}] {" ".join(parts)}{timing}')

    def on_eval_end(self, trainer, metrics):
        if _is_main(trainer) and metrics:
            self._printed_eval = {k: scalar(v) for k, v in metrics.items()}
            parts = ' '.join(f'{k}={_fmt_value(v)}' for k, v in metrics.items())
            self._write(f'[eval @ step {trainer.state.global_step}] {parts}')

    def on_save(self, trainer, checkpoint_dir):
        if _is_main(trainer):
            self._write(f'[step {trainer.state.global_step}] saved checkpoint {checkpoint_dir}')

    def on_train_end(self, trainer):
        if self.bar is not None:
            self.bar.update(max(trainer.state.global_step - self.bar.n, 0))
            self.bar.close()
            self.bar = None
        if _is_main(trainer) and self.start_time is not None:
            self._write(f'[train end] {trainer.state.global_step} steps in {_fmt_time(time.time() - self.start_time)}')


def read_jsonl(path: str) -> list[dict]:
    """The parseable dict lines of a jsonl file (a torn last line from a crash is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


@register_callback('jsonl')
class JsonlCallback(Callback):
    """``output_dir/logging.jsonl``: one JSON object per ``on_log``, flushed at once.

    On a resumed run (``global_step > 0`` at train begin) the lines logged after the resumed step
    are dropped first, so steps are never duplicated; a fresh run (step 0) starts a new file. Every line is
    strict JSON: a NaN/inf value is written as null and its key listed under ``nonfinite``.
    """

    def __init__(self, args):
        super().__init__(args)
        self.path = os.path.join(args.output_dir, LOG_FILE)
        self._file = None

    def _open(self):
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
            self._file = open(self.path, 'a', encoding='utf-8')
        return self._file

    def on_train_begin(self, trainer):
        if not _is_main(trainer):
            return
        step = trainer.state.global_step
        if os.path.isfile(self.path):
            keep = [r for r in read_jsonl(self.path) if step > 0 and _step_of(r) <= step]
            tmp = f'{self.path}.tmp'
            with open(tmp, 'w', encoding='utf-8') as f:
                f.writelines(json.dumps(strict_json(r)) + '\n' for r in keep)
            os.replace(tmp, self.path)
        self._open()

    def on_log(self, trainer, logs):
        if not _is_main(trainer):
            return
        record = strict_json({k: scalar(v) for k, v in logs.items()})
        record.setdefault('step', trainer.state.global_step)
        f = self._open()
        f.write(json.dumps(record) + '\n')
        f.flush()

    def on_train_end(self, trainer):
        if self._file is not None:
            self._file.close()
            self._file = None


def _step_of(record: dict) -> int:
    try:
        return int(record.get('step', 0))
    except (TypeError, ValueError):
        return 0


@register_callback('loss_curve')
class LossCurveCallback(Callback):
    """``output_dir/loss_curve.png``: train loss (and eval loss when logged) against step.

    Written on each save and at train end. On resume the earlier points come from
    ``logging.jsonl`` (or ``trainer.state.log_history``), up to the resumed step.
    """

    def __init__(self, args):
        super().__init__(args)
        self.path = os.path.join(args.output_dir, CURVE_FILE)
        self.train: dict[int, float] = {}
        self.eval: dict[int, float] = {}
        self._warned = False

    def _add(self, record: dict) -> None:
        values, step = numeric_items(record), _step_of(record)
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        if 'loss' in values:
            self.train[step] = values['loss']
        if 'eval_loss' in values:
            self.eval[step] = values['eval_loss']

    def on_train_begin(self, trainer):
        if not _is_main(trainer):
            return
        step = trainer.state.global_step
        history = read_jsonl(os.path.join(self.args.output_dir, LOG_FILE)) or list(trainer.state.log_history or [])
        for record in history:
            if step > 0 and _step_of(record) <= step:
                self._add(record)

    def on_log(self, trainer, logs):
        record = dict(logs)
        record.setdefault('step', trainer.state.global_step)
        self._add(record)

    def on_save(self, trainer, checkpoint_dir):
        self.plot(trainer)

    def on_train_end(self, trainer):
        self.plot(trainer)

    def plot(self, trainer) -> str | None:
        """Write the figure (main process, at least one point); returns its path or None."""
        if not _is_main(trainer) or not (self.train or self.eval):
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned:
                logger.warning('loss_curve: matplotlib is not installed (pip install matplotlib); no %s', CURVE_FILE)
                self._warned = True
            return None
        fig = Figure(figsize=(8, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if self.train:
            steps = sorted(self.train)
            losses = [self.train[s] for s in steps]
            half = len(steps) // 50  # a centred moving average over ~4% of the points (no lag)
            ax.plot(steps, losses, color='tab:blue', lw=1, alpha=0.35 if half else 1.0,
                    label='train loss (raw)' if half else 'train loss')
            if half:
                ax.plot(steps, _moving_average(losses, half), color='tab:blue', lw=1.8,
                        label=f'train loss (mean of {2 * half + 1})')
        if self.eval:
            steps = sorted(self.eval)
            ax.plot(steps, [self.eval[s] for s in steps], 'o-', color='tab:orange', lw=1.5, ms=4, label='eval loss')
        ax.set_xlabel('step')
        ax.set_ylabel('loss')
        ax.set_title(f'{os.path.basename(os.path.normpath(self.args.output_dir))} (step {trainer.state.global_step})')
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
        tmp = f'{self.path}.tmp'
        fig.savefig(tmp, format='png')
        os.replace(tmp, self.path)
        return self.path


def _moving_average(values: list[float], half: int) -> list[float]:
    """Mean of ``values[i - half : i + half + 1]`` (clipped at both ends) for each i."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(i - half, 0), min(i + half + 1, len(values))
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out
