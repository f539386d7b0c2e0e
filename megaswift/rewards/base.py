"""Reward functions: one calling convention for `sample` now and GRPO later.

``reward(completions: list[str], **columns) -> list[float]``

``columns`` are aligned with ``completions`` (one entry per completion): ``messages``
(the prompt conversation the completion answers, without the completion), ``solution``
(the ground truth or None), ``response_token_ids`` (list[int] or None) and every other
column of the dataset row. ORMs return one float per completion; PRMs may return a list
of per-step floats for a completion. Unknown columns must be accepted (``**kwargs``).
"""
from __future__ import annotations

from typing import Any

from ..utils.registry import Registry


class ORM:
    """Outcome reward: one score per completion."""

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float]:
        raise NotImplementedError


class PRM:
    """Process reward: one score, or one score per reasoning step, per completion."""

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float | list[float]]:
        raise NotImplementedError


_HINT = ('It may also be a reward model directory or an org/name hub id; '
         'more can be registered with --external_plugins.')
orms = Registry('ORM', hint=_HINT)
prms = Registry('PRM', hint=_HINT)


def reduce_reward(value: float | list[float]) -> float:
    """One float for a reward value: a per-step list becomes its minimum (the weakest step).

    An empty list raises ValueError; None raises TypeError.
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError('cannot reduce an empty list of step rewards')
        return float(min(float(v) for v in value))
    if value is None:
        raise TypeError('reward value is None')
    return float(value)


def score_completions(fn, completions: list[str], columns: dict[str, list[Any]], kind: str = 'reward') -> list[float]:
    """``fn(completions, **columns)`` checked: one finite float per completion (a per-step list reduced with
    :func:`reduce_reward`); anything else is a RuntimeError naming ``kind`` and the function."""
    import math
    values = fn(completions, **columns)
    if len(values) != len(completions):
        raise RuntimeError(f'{kind} {type(fn).__name__} returned {len(values)} rewards for {len(completions)} '
                           f'completions')
    scores = [reduce_reward(v) for v in values]
    if any(not math.isfinite(s) for s in scores):
        raise RuntimeError(f'{kind} {type(fn).__name__} returned a non-finite reward: {scores}')
    return scores


class ReducedReward(ORM):
    """An ORM view of a PRM: each completion's per-step list is reduced with :func:`reduce_reward`."""

    def __init__(self, prm: PRM):
        self.prm = prm

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float]:
        return [reduce_reward(v) for v in self.prm(completions, **columns)]
