"""Advantages from the rewards of a generation batch: ``rewards`` is ``[num_prompts, num_generations]`` (row ``p``:
the completions of prompt ``p``), and so is the result.

- ``grpo``: ``A = r - mean(group)`` (Shao et al. 2024);
- ``rloo``: ``A = r - mean(group without r)`` = ``G / (G - 1) * (r - mean(group))`` (leave-one-out baseline);
- ``reinforce_plus_plus``: ``A = r - mean(group)``, then divided by the standard deviation of those over the whole
  batch (REINFORCE++ with baseline: global normalisation), whatever ``scale_rewards`` says.

``scale_rewards`` then divides grpo / rloo advantages by the group's reward std (``group``: GRPO as published), the
batch's (``batch``) or nothing (``none``: Dr. GRPO). Standard deviations are unbiased, plus ``eps`` = 1e-4.
"""
from __future__ import annotations

import torch

ADVANTAGE_ESTIMATORS = ('grpo', 'rloo', 'reinforce_plus_plus')
SCALE_REWARDS = ('group', 'batch', 'none')
EPS = 1e-4


def compute_advantages(rewards: torch.Tensor, estimator: str = 'grpo', scale_rewards: str = 'group') -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f'rewards must be [num_prompts, num_generations], got {tuple(rewards.shape)}')
    rewards = rewards.double()
    g = rewards.shape[1]
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if estimator == 'grpo':
        adv = centred
    elif estimator == 'rloo':
        if g < 2:
            raise ValueError('rloo needs at least 2 generations per prompt')
        adv = centred * g / (g - 1)
    elif estimator == 'reinforce_plus_plus':
        return centred / (_std(centred.reshape(-1)) + EPS)
    else:
        raise ValueError(f"advantage_estimator: unknown '{estimator}' ({', '.join(ADVANTAGE_ESTIMATORS)})")
    if scale_rewards == 'group':
        return adv / (_std(rewards, dim=1).unsqueeze(1) + EPS)
    if scale_rewards == 'batch':
        return adv / (_std(rewards.reshape(-1)) + EPS)
    if scale_rewards == 'none':
        return adv
    raise ValueError(f"scale_rewards: unknown '{scale_rewards}' ({', '.join(SCALE_REWARDS)})")


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    n = x.shape[dim] if dim is not None else x.numel()
    if n < 2:
        return torch.zeros(()) if dim is None else torch.zeros(x.shape[0], dtype=x.dtype)
    return x.std() if dim is None else x.std(dim=dim)


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """``[num_prompts]`` bool: the groups whose completions all got the same reward (no learning signal; what
    ``--dynamic_sample`` drops)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values).abs() < 1e-12


__all__ = ['ADVANTAGE_ESTIMATORS', 'SCALE_REWARDS', 'compute_advantages', 'zero_std_groups']
