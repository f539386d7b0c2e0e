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


class ORM:
    """Outcome reward: one score per completion."""

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float]:
        raise NotImplementedError


class PRM:
    """Process reward: one score, or one score per reasoning step, per completion."""

    def __call__(self, completions: list[str], **columns: list[Any]) -> list[float | list[float]]:
        raise NotImplementedError


orms: dict[str, type[ORM]] = {}
prms: dict[str, type[PRM]] = {}
