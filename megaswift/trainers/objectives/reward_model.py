"""Reward modelling (Bradley-Terry; Ouyang et al. 2022, with Llama 2's margin) on chosen/rejected pairs.

The model ends in a scalar value head (``megatron/heads.py``); a sequence's reward is the value at its last
token. Per step:

    loss = sum over pairs of [ -log s(r_c - r_r - margin) + coef * (r_c + r_r)^2 ]  /  pairs

``margin`` is the row's ``margin`` column (0 without one); ``coef`` is ``--center_rewards_coefficient``
(Eisenstein et al. 2023: keeps rewards centred on 0). Metrics: rewards/accuracies (r_c > r_r: swapping the
chosen and rejected columns turns it into 1 - itself), rewards/chosen, rewards/rejected, rewards/margins.
"""
from __future__ import annotations

import torch

from .base import ModelOutput, Objective, metric_pair
from .preference_losses import bradley_terry_loss
from .registry import losses
from .sequences import last_token_values

RM_METRICS = ('loss', 'rewards/accuracies', 'rewards/chosen', 'rewards/rejected', 'rewards/margins')


@losses.register('rm')
class RewardModelObjective(Objective):
    head = 'value'
    template_mode = 'rlhf'
    sequences = ('chosen_', 'rejected_')
    columns = ('margin',)
    train_metrics = eval_metrics = RM_METRICS

    def __init__(self, args):
        super().__init__(args)
        self.center = float(getattr(args, 'center_rewards_coefficient', None) or 0.0)

    def count(self, batch: dict) -> int:
        return int(batch['num_samples'])

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        rewards = last_token_values(output.output.float(), batch)
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = batch.get('margin')
        per_pair = bradley_terry_loss(chosen, rejected, None if margin is None else margin.to(chosen))
        if self.center:
            per_pair = per_pair + self.center * (chosen + rejected) ** 2
        n = chosen.new_tensor(float(chosen.numel()))
        c, r = chosen.detach(), rejected.detach()
        metrics = {'loss': metric_pair(per_pair.sum(), n),
                   'rewards/accuracies': metric_pair((c > r).float().sum(), n),
                   'rewards/chosen': metric_pair(c.sum(), n), 'rewards/rejected': metric_pair(r.sum(), n),
                   'rewards/margins': metric_pair((c - r).sum(), n)}
        den = batch['loss_denominator']
        return per_pair.sum() / den.to(per_pair.dtype), torch.tensor(chosen.numel(), dtype=torch.int), metrics


__all__ = ['RewardModelObjective']
