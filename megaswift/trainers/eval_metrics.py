"""``--eval_metric`` on megatron-core: which metrics can run, and computing them from an evaluation's outputs.

A metric consumes either what a teacher-forced evaluation step produces (``EVAL_OUTPUTS``: per-token predictions
and labels of the loss tokens, summed losses and counts) or what greedy generation produces
(``GENERATED_OUTPUTS``: decoded texts, ``generate.py``), never both. The built-in eval loss and token accuracy
come from the objective itself.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ..utils.errors import ArgumentError
from .generate import GENERATED_OUTPUTS, needs_generation

EVAL_OUTPUTS = ('loss_sum', 'num_tokens', 'correct', 'preds', 'labels', 'token_loss')


def build_eval_metrics(names: list[str]) -> list:
    """The ``megaswift.metrics`` named by ``--eval_metric`` (beyond 'loss' and 'acc'), checked against what
    evaluation produces."""
    names = [n for n in names if n not in ('loss', 'acc')]
    if not names:
        return []
    from ..metrics import build_metrics
    try:
        built = build_metrics(names)
    except ValueError as e:
        raise ArgumentError(f'--eval_metric: {e}') from None
    metrics = dict(built) if isinstance(built, dict) else dict(zip(names, built))
    for name, metric in metrics.items():
        inputs = tuple(getattr(metric, 'inputs', ()) or ())
        generated = [k for k in inputs if k in GENERATED_OUTPUTS]
        missing = [k for k in inputs if k not in (GENERATED_OUTPUTS if generated else EVAL_OUTPUTS)]
        if missing:
            raise ArgumentError(f"--eval_metric {name}: needs {missing}, which evaluation on megatron-core does not "
                                f"produce (it has {', '.join(EVAL_OUTPUTS)} from teacher forcing, or "
                                f"{', '.join(GENERATED_OUTPUTS)} from generation, not both)")
    return list(metrics.values())


def compute_eval_metrics(metrics: list, outputs: list, generate: Callable[[], dict], dp_group) -> dict:
    """Each metric updated from the last stage's evaluation ``outputs`` (or from ``generate()``'s texts, generated
    once for all metrics that need them) and computed over ``dp_group``, as ``{'eval_<name>': value}``."""
    result, generated = {}, None
    for metric in metrics:
        metric.reset()
        if needs_generation(metric):
            generated = generated or generate()
            _update(metric, **generated)
        else:
            for out in outputs:
                _update(metric, loss_sum=out['loss'][0], num_tokens=out['loss'][1], correct=out['acc'][0],
                        preds=out['pred'], labels=out['target'], token_loss=out['token_loss'])
        values = metric.compute(group=dp_group)
        result.update({k if k.startswith('eval_') else f'eval_{k}': _to_float(v) for k, v in values.items()})
        metric.reset()
    return result


def _update(metric, **kw) -> None:
    if getattr(metric, 'inputs', None):
        metric.update_from(kw)
        return
    params = inspect.signature(metric.update).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    metric.update(**kw)


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean())
    return v


__all__ = ['EVAL_OUTPUTS', 'build_eval_metrics', 'compute_eval_metrics']
