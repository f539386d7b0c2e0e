"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired completions labelled desirable or not.

    loss = sum over the step's completions of  wD (1 - s(beta (r - z0)))   (desirable)
                                           or  wU (1 - s(beta (z0 - r)))   (undesirable)   /  completions

with ``r = log pi(y|x) - log pi_ref(y|x)`` (summed log-probs) and the reference point
``z0 = max(0, mean over the step's mismatched completions y' of log pi(y'|x) - log pi_ref(y'|x))``, detached.
Every encoded sample holds its completion and a mismatched one (another row's answer to this prompt,
``dataset.add_kl_responses``): two sequences, ``('', 'kl_')``. ``z0`` comes from a forward-only pass of the
policy (frozen model 'policy') and the reference over the step's micro-batches, summed over data-parallel ranks
before the step: one value per step whatever the layout (TRL estimates it per micro-batch).
"""
from __future__ import annotations

import logging

import torch

from .base import ModelOutput, Objective, metric_pair
from .preference_losses import kto_loss
from .registry import losses
from .sequences import sequence_logps

logger = logging.getLogger(__name__)

KTO_METRICS = ('loss', 'kl', 'rewards/chosen', 'rewards/rejected', 'logps/chosen', 'logps/rejected')


@losses.register('kto')
class KtoObjective(Objective):
    template_mode = 'kto'
    sequences = ('', 'kl_')
    columns = ('label',)
    frozen_models = ('ref', 'policy')
    train_metrics = eval_metrics = KTO_METRICS

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta)
        self.desirable_weight = float(getattr(args, 'desirable_weight', 1.0))
        self.undesirable_weight = float(getattr(args, 'undesirable_weight', 1.0))

    @classmethod
    def check_data(cls, encoded, args) -> None:
        """The paper's advice: weighted desirable : undesirable examples within [1, 4/3]."""
        labels = [int(encoded.arrays(i)['label']) for i in range(len(encoded))]
        n_desirable, n_undesirable = sum(labels), len(labels) - sum(labels)
        wd, wu = float(getattr(args, 'desirable_weight', 1.0)), float(getattr(args, 'undesirable_weight', 1.0))
        if n_desirable == 0 or n_undesirable == 0:
            logger.warning('KTO: the training set has %d desirable and %d undesirable completions; KTO needs both',
                           n_desirable, n_undesirable)
            return
        ratio = wd * n_desirable / (wu * n_undesirable)
        if not 1.0 <= ratio <= 4 / 3:
            logger.warning('KTO: desirable_weight * desirable / (undesirable_weight * undesirable) = %.3f * %d / '
                           '(%.3f * %d) = %.3f is outside [1, 4/3], which the KTO paper advises; set '
                           '--desirable_weight / --undesirable_weight accordingly', wd, n_desirable, wu,
                           n_undesirable, ratio)

    def count(self, batch: dict) -> int:
        return int(batch['num_samples'])

    def frozen_outputs(self, name: str, output: ModelOutput, batch: dict) -> dict:
        key = 'ref_logps' if name == 'ref' else 'policy_logps'
        return {key: sequence_logps(output, batch).sums}

    def prepare_step(self, batches: list[dict], parallel) -> None:
        device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else None
        total = torch.zeros(2, dtype=torch.float64, device=device)  # every DP rank, with or without batches
        for b in batches:
            if 'policy_logps' in b:  # the last pipeline stage
                kl = (b['policy_logps'] - b['ref_logps'])[1::2]
                total += torch.stack([kl.double().sum(), kl.new_tensor(float(kl.numel()), dtype=torch.float64)]).to(total)
        if parallel is not None and parallel.dp_size > 1:
            torch.distributed.all_reduce(total, group=parallel.dp_group)
        z0 = (total[0] / total[1].clamp(min=1.0)).clamp(min=0.0).float()
        for b in batches:
            b['kto_kl'] = z0

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        logps = sequence_logps(output, batch).sums
        completions, ref = logps[0::2], batch['ref_logps'][0::2].to(logps.dtype)
        ratios = completions - ref
        desirable = batch['label'].to(ratios.device).bool()
        z0 = batch['kto_kl'].to(ratios.dtype)
        per_sample = kto_loss(ratios, desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        n = ratios.new_tensor(float(ratios.numel()))
        n_d, n_u = desirable.sum().to(n.dtype), (~desirable).sum().to(n.dtype)
        rewards = self.beta * ratios.detach()
        metrics = {'loss': metric_pair(per_sample.sum(), n), 'kl': metric_pair(z0 * n, n),
                   'rewards/chosen': metric_pair(rewards[desirable].sum(), n_d),
                   'rewards/rejected': metric_pair(rewards[~desirable].sum(), n_u),
                   'logps/chosen': metric_pair(completions.detach()[desirable].sum(), n_d),
                   'logps/rejected': metric_pair(completions.detach()[~desirable].sum(), n_u)}
        den = batch['loss_denominator']
        return per_sample.sum() / den.to(per_sample.dtype), torch.tensor(ratios.numel(), dtype=torch.int), metrics


__all__ = ['KtoObjective']
