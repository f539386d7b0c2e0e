"""Direct preference optimisation (Rafailov et al. 2023) and its variants, on chosen/rejected pairs.

    loss = sum over the step's pairs of  sum_k w_k * l_k(rc, rr)          /  number of pairs
         + (w_sft + rpo_alpha) * sum over chosen loss tokens of -log pi  /  number of chosen loss tokens

with ``rc = log pi(y_c|x) - log pi_ref(y_c|x)`` (``rr`` likewise), ``l_k`` the ``--loss_type`` variants of
``preference_losses.dpo_pair_loss`` and ``w_k`` their ``--loss_weights``. Both counts are the whole step's (all
micro-batches and data-parallel ranks), so every layout trains the same loss. ``ipo`` takes length-averaged
log-probs (IPO's formulation, as TRL >= 0.29), the others summed ones; ``--ld_alpha`` down-weights the tokens past the shorter
response of the pair (LD-DPO). The reference model is frozen (``--ref_model``, default ``--model``; under LoRA the
base model with the adapters off); ``--reference_free`` drops it.
"""
from __future__ import annotations

import torch

from ...utils.constants import IGNORE_INDEX
from .base import ModelOutput, Objective, metric_pair
from .preference_losses import dpo_pair_loss
from .registry import losses
from .sequences import sequence_logps

PAIR_METRICS = ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
                'logps/chosen', 'logps/rejected', 'nll_loss')


def chosen_token_mask(batch: dict) -> torch.Tensor:
    """The loss tokens of the chosen responses (even-numbered sequences)."""
    from ...template.collator import sequence_ids
    ids = sequence_ids(batch).to(batch['labels'].device)
    return (batch['labels'] != IGNORE_INDEX) & (ids >= 0) & (ids % 2 == 0)


class PairObjective(Objective):
    """Shared by the pair objectives: pairs are sequences (2k, 2k+1) of a micro-batch; the step normalisers are
    its pairs and its chosen loss tokens; the metrics are TRL's / ms-swift's names."""
    template_mode = 'rlhf'
    sequences = ('chosen_', 'rejected_')
    normalisers = ('chosen_tokens', 'pairs')
    train_metrics = eval_metrics = PAIR_METRICS

    def count(self, batch: dict) -> dict[str, int]:
        return {'pairs': int(batch['num_samples']), 'chosen_tokens': int(chosen_token_mask(batch).sum())}

    def chosen_nll(self, logps, batch: dict) -> torch.Tensor:
        """Summed negative log-likelihood of the chosen responses' loss tokens."""
        return -(logps.per_token * chosen_token_mask(batch)).sum()

    def finish(self, pair_losses: torch.Tensor, nll_sum: torch.Tensor, nll_weight: float, batch: dict,
               metrics: dict):
        """``(loss / step normalisers, pairs, metrics)``; the logged 'loss' is the trained one exactly."""
        den = batch['loss_denominator']
        pairs, tokens = den['pairs'], den['chosen_tokens']
        loss = pair_losses.sum() / pairs.to(pair_losses.dtype)
        if nll_weight:
            loss = loss + nll_weight * nll_sum / tokens.to(nll_sum.dtype)
        n = pair_losses.new_tensor(float(pair_losses.numel()))
        metrics['loss'] = metric_pair(loss * pairs, n)
        metrics['nll_loss'] = metric_pair(nll_sum, chosen_token_mask(batch).sum())
        return loss, torch.tensor(pair_losses.numel(), dtype=torch.int), metrics


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict:
    """rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}: per-pair means."""
    n = chosen.new_tensor(float(chosen.numel()))
    return {'rewards/chosen': metric_pair(chosen.sum(), n), 'rewards/rejected': metric_pair(rejected.sum(), n),
            'rewards/accuracies': metric_pair((chosen > rejected).float().sum(), n),
            'rewards/margins': metric_pair((chosen - rejected).sum(), n),
            'logps/chosen': metric_pair(chosen_logps.sum(), n), 'logps/rejected': metric_pair(rejected_logps.sum(), n)}


@losses.register('dpo')
class DpoObjective(PairObjective):

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta)
        self.loss_types = list(getattr(args, 'loss_type', None) or ['sigmoid'])
        self.loss_weights = list(getattr(args, 'loss_weights', None) or [1.0] * len(self.loss_types))
        self.eps = float(getattr(args, 'label_smoothing', 0.0) or 0.0)
        self.rpo_alpha = float(getattr(args, 'rpo_alpha', None) or 0.0)
        self.ld_alpha = getattr(args, 'ld_alpha', None)
        self.frozen_models = () if getattr(args, 'reference_free', False) else ('ref',)

    def frozen_outputs(self, name: str, output: ModelOutput, batch: dict) -> dict:
        logps = sequence_logps(output, batch, self.ld_alpha)
        return {'ref_logps': logps.sums, 'ref_logps_mean': logps.means}

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        logps = sequence_logps(output, batch, self.ld_alpha)
        nll_weight = self.rpo_alpha
        pair_losses = torch.zeros_like(logps.sums[0::2])
        ratios = {}
        for loss_type, weight in zip(self.loss_types, self.loss_weights):
            if loss_type == 'sft':
                nll_weight += weight
                continue
            average = loss_type == 'ipo'
            if average not in ratios:
                ratios[average] = self._ratios(logps.means if average else logps.sums, batch, average)
            rc, rr = ratios[average]
            pair_losses = pair_losses + weight * dpo_pair_loss(loss_type, rc, rr, self.beta, self.eps)
        rc, rr = ratios.get(False) or self._ratios(logps.sums, batch, False)
        chosen, rejected = logps.pairs()
        metrics = reward_metrics(self.beta * rc.detach(), self.beta * rr.detach(), chosen.detach(),
                                 rejected.detach())
        return self.finish(pair_losses, self.chosen_nll(logps, batch), nll_weight, batch, metrics)

    def _ratios(self, policy: torch.Tensor, batch: dict, average: bool):
        """``(rc, rr)``: the policy's minus the reference's log-probs of the chosen / rejected responses."""
        if 'ref' in self.frozen_models:
            policy = policy - batch['ref_logps_mean' if average else 'ref_logps'].to(policy.dtype)
        return policy[0::2], policy[1::2]


__all__ = ['DpoObjective', 'PairObjective', 'chosen_token_mask', 'reward_metrics']
