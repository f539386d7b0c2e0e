"""Training objectives: one file each, registered by name in ``losses`` (``--loss_type``).

A new objective is one file here (a subclass of ``Objective`` decorated with ``@losses.register('name')``) plus
its import below; a user's own goes in an ``--external_plugins`` file the same way.
"""
from __future__ import annotations

from . import cpo, dpo, gkd, grpo, kto, reward_model, sft  # noqa: F401  (register their objectives)
from .base import ModelOutput, Objective, build_objective, metric_pair
from .registry import losses

__all__ = ['ModelOutput', 'Objective', 'build_objective', 'losses', 'metric_pair']
