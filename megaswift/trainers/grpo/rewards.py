"""GRPO's rewards: ``--reward_funcs`` (names in the ``orms`` registry, ``--external_plugins`` ones included, or
reward-model directories) weighted by ``--reward_weights``, with the calling convention of ``megaswift sample``:
``reward(completions, **columns)`` with one entry per completion in every column (``messages``: the prompt
conversation, ``solution``, ``response_token_ids``, and every other column of the dataset row)."""
from __future__ import annotations

from typing import Any

import torch

from ...rewards import get_orm, looks_like_model, orms, score_completions
from ...utils.errors import ArgumentError


def reward_labels(names: list[str]) -> list[str]:
    """How each of ``--reward_funcs`` is named in logs (``rewards/<label>/mean``, completions.jsonl): a registry
    name as it is, a reward-model directory by its last path component."""
    import os
    return [os.path.basename(os.path.normpath(n)) if n not in orms and looks_like_model(n) else n for n in names]


class RewardSet:
    def __init__(self, names: list[str], weights: list[float] | None = None):
        if not names:
            raise ArgumentError('--rlhf_type grpo needs --reward_funcs (e.g. accuracy format, or a reward model '
                                'directory)')
        if weights and len(weights) != len(names):
            raise ArgumentError(f'--reward_weights: {len(weights)} weights for {len(names)} --reward_funcs')
        self.names = list(names)
        self.weights = torch.tensor(list(weights) if weights else [1.0] * len(names), dtype=torch.float64)
        self.funcs = [get_orm(n) for n in self.names]

    def score(self, completions: list[str], columns: dict[str, list[Any]]) -> torch.Tensor:
        """``[num_completions, num_funcs]`` float64."""
        per_func = [score_completions(fn, completions, columns, f'reward function {name!r}')
                    for name, fn in zip(self.names, self.funcs)]
        return torch.tensor(per_func, dtype=torch.float64).reshape(len(self.names), len(completions)).t()

    def total(self, per_func: torch.Tensor) -> torch.Tensor:
        """The weighted sum over the functions: ``[num_completions]``."""
        return per_func @ self.weights


__all__ = ['RewardSet']
