"""``--on_nonfinite abort|skip``: what a training step with a non-finite loss or grad norm does.

Without a loss scaler (bf16, fp32) megatron-core's ``optimizer.step()`` applies non-finite gradients: its
``prepare_grads`` looks for inf/nan only through an fp16 grad scaler, and clipping by a NaN norm is a no-op
(``clip_coeff < 1.0`` is False for NaN), so one bad step writes NaN into every parameter and the Adam moments.
``checked_optimizer_step`` therefore runs megatron-core's step in its own pieces (``prepare_grads``,
``get_grad_norm``, clipping by that norm, ``step_with_ready_grads``) and decides between the norm and the update.
The decision (loss sum non-finite, grad norm non-finite) is all-reduced over the world, so all TP/PP/DP ranks
abort or skip together (only the last pipeline stage computes the loss; the grad norm is reduced over the model-
parallel group, and over DP with the distributed optimizer).

- ``abort`` (default): the error names the step and its samples; the run stops before any checkpoint of that step
  (the loop's save, ``--save_last`` and the preemption save all come after the step) and exits non-zero.
- ``skip``: the step's update is dropped (parameters, optimizer state and the lr schedule stay as they were, as
  megatron-core does for an fp16 overflow), counted (``nonfinite_skipped`` in the logs) and training goes on.

An fp16 overflow found by the loss scaler stays megatron-core's own skip (the scale backs off); it is not counted.
``strict_json`` turns non-finite numbers into ``null`` plus a ``nonfinite`` list, for the JSON files of a run.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch

from ..utils.dist import any_rank
from ..utils.errors import UserError

logger = logging.getLogger(__name__)
ON_NONFINITE = ('abort', 'skip')
SHOWN_SAMPLES = 32  # sample ids in the one-line error (all of them are in the log line before it)


class NonFiniteError(UserError, RuntimeError):
    """A non-finite loss or grad norm under ``--on_nonfinite abort``, or parameters that are not finite at a save.
    Every rank raises it together (the verdict is all-reduced), so no rank is reported as the one that failed."""
    _megaswift_reported = True  # utils.dist.report_failure: nothing to add per rank; the CLI prints the line once


def is_finite(value) -> bool:
    return value is None or math.isfinite(float(value))


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, 'chained_optimizers', [optimizer]))


def _clip(optimizer, grad_norm: float) -> None:
    """Clip every (non-stub) optimizer's gradients by the total norm, as megatron-core's ``step`` does."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    for opt in _optimizers(optimizer):
        if getattr(opt, 'is_stub_optimizer', False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


@torch.no_grad()
def checked_optimizer_step(optimizer, loss_finite: bool) -> tuple[bool, Optional[float], list[str]]:
    """megatron-core's ``optimizer.step()`` with the non-finite check between the grad norm and the update: returns
    (whether the update was applied, the grad norm, what was non-finite on any rank: 'loss', 'grad_norm')."""
    found_inf = optimizer.prepare_grads()  # fp16: unscale, look for inf/nan, update the loss scale
    grad_norm = None if found_inf else float(optimizer.get_grad_norm())
    verdict = any_rank([not loss_finite, not is_finite(grad_norm)])
    nonfinite = [name for name, bad in zip(('loss', 'grad_norm'), verdict) if bad]
    if found_inf or nonfinite:
        return False, grad_norm, nonfinite
    _clip(optimizer, grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm, []


class NonFinitePolicy:
    """``--on_nonfinite``. The trainer sets ``step_samples`` before each step (a callable describing its samples,
    asked only when the step is non-finite)."""

    def __init__(self, mode: str = 'abort'):
        self.mode = mode
        self.skipped = 0  # steps dropped so far (saved with the trainer state)
        self.step_samples: Optional[Callable[[], list]] = None

    def optimizer_step(self, trainer, loss_sum: float, loss_count: float) -> tuple[bool, Optional[float]]:
        """The trainer's optimizer step under the policy, given the step's reduced loss sum and count: (update
        applied, grad norm)."""
        ok, grad_norm, nonfinite = checked_optimizer_step(trainer.optimizer, math.isfinite(loss_sum))
        if nonfinite:
            self._handle(trainer, nonfinite, loss_sum / max(loss_count, 1e-12), grad_norm)
        return ok, grad_norm

    def _handle(self, trainer, nonfinite: list[str], loss: float, grad_norm: Optional[float]) -> None:
        step = trainer.state.global_step + 1
        what = ' and '.join(name.replace('_', ' ') for name in nonfinite)
        values = f'loss {loss:.6g}, grad norm ' + ('n/a (fp16 overflow)' if grad_norm is None else f'{grad_norm:.6g}')
        main = trainer.is_main_process
        if self.mode == 'skip':
            self.skipped += 1
            if main:
                logger.warning('step %d: non-finite %s (%s): its update is dropped (--on_nonfinite skip; %d step(s) '
                               'skipped so far)', step, what, values, self.skipped)
            return
        samples = self.step_samples() if self.step_samples is not None else []
        if main:
            logger.error('step %d: non-finite %s (%s); the samples of its micro-batches: %s', step, what, values,
                         samples)
        else:  # each rank's log says why it stopped (a multi-node job's logs are per node)
            logger.info('step %d: non-finite %s, found by the ranks together: stopping', step, what)
        flat = [s for mb in samples for s in (mb if isinstance(mb, list) else [mb])]
        shown = f'{flat}' if len(flat) <= SHOWN_SAMPLES else f'{flat[:SHOWN_SAMPLES]} and {len(flat) - SHOWN_SAMPLES}' \
            f' more (all of them in the log)'
        raise NonFiniteError(f'non-finite {what} at step {step} ({values}); samples of the step: {shown}. No '
                             f'checkpoint of this step was saved. Lower --lr (or raise --warmup_steps), or pass '
                             f'--on_nonfinite skip to drop such steps and go on')

    def state_dict(self) -> dict:
        return {'nonfinite_skipped': self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get('nonfinite_skipped', 0))

    def logs(self) -> dict:
        """``{'nonfinite_skipped': total}`` once a step was skipped."""
        return {'nonfinite_skipped': self.skipped} if self.skipped else {}


def training_rows(data, micro_batches: list[list[int]]) -> list[list[int]]:
    """The samples of each of a step's micro-batches: rows of the training set (``EncodedDataset.row_indices``);
    with ``--streaming``, the samples' places in the step's window of the stream."""
    collator = data.collator
    rows = getattr(collator.encoded, 'row_indices', None)
    return [[int(rows[i]) if rows is not None else int(i) for i in collator.sample_indices(mb)]
            for mb in micro_batches]


@torch.no_grad()
def check_parameters_finite(models, step: int) -> None:
    """Refuse (``NonFiniteError`` on every rank) to save parameters that hold NaN/inf: one pass over this rank's
    parameters (a float32 sum per tensor: NaN/inf propagate, nothing the size of a parameter is allocated), one
    device sync and one all-reduce. Called at each save, not each step."""
    named = [(name, p) for m in models for name, p in m.named_parameters()]
    sums = torch.stack([p.detach().sum(dtype=torch.float32) for _, p in named]) if named else torch.zeros(0)
    finite = torch.isfinite(sums).tolist()
    bad = [name.removeprefix('module.') for (name, _), ok in zip(named, finite) if not ok]
    if any_rank([bool(bad)])[0]:
        where = f'{len(bad)} parameter tensors on this rank, e.g. {bad[:3]}' if bad else 'on another rank'
        raise NonFiniteError(f'refusing to save the checkpoint of step {step}: the parameters hold NaN/inf ({where})')


def strict_json(value):
    """``value`` with every non-finite float replaced by None; a dict that held such values directly (or in a
    list/dict under a key) gets ``'nonfinite': [those keys]``. ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    out, flagged = {}, []
    for key, v in value.items():
        out[key] = strict_json(v)
        if _has_nonfinite(v) and not isinstance(v, dict):
            flagged.append(key)
    if flagged:
        out['nonfinite'] = sorted(set(out.get('nonfinite') or []) | set(flagged))
    return out


def _has_nonfinite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    return False


__all__ = ['ON_NONFINITE', 'NonFiniteError', 'NonFinitePolicy', 'check_parameters_finite', 'checked_optimizer_step',
           'strict_json', 'training_rows']
