"""GRPO and its relatives (DAPO, Dr. GRPO, BNPO, CISPO, GSPO) on completions the policy generated.

The generation, rewards and advantages happen in ``trainers/grpo/trainer.py`` (a generation batch at a time); each
training micro-batch arrives here as packed prompt + completion sequences whose labels are the completion tokens,
with ``advantages`` (one per completion) and, from the frozen passes, ``ref_logps`` (``--beta`` > 0) and
``old_logps`` (when a generation batch trains more than one step: ``--steps_per_generation`` or ``--num_iterations``
> 1; otherwise the policy is its own old policy and the ratio is 1 with the gradient of ``A * log pi``).

Log-probs are those of the sampling distribution, the logits divided by ``--temperature`` (as TRL), computed with
the fused linear cross entropy on the completion positions (no ``N x V`` logits). The loss is
``trainers/grpo/losses.py`` (the formulas, each loss type's normaliser). Logged: ``kl`` (k3, when ``--beta`` > 0),
``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (token shares), ``entropy`` (mean
per completion token, computed without gradient in chunks) and ``rollout/logp_diff`` (mean |trainer - engine|
log-prob of the sampled tokens, at temperature 1: ~0 on a generation's first step unless the engine is stale).
"""
from __future__ import annotations

import torch

from ...template.collator import sequence_ids
from ...utils.constants import IGNORE_INDEX
from ..grpo.losses import aggregate, per_token_loss
from .base import ModelOutput, Objective, metric_pair
from .registry import losses

ENTROPY_CHUNK = 512


@losses.register('grpo')
class GrpoObjective(Objective):
    normalisers = ('tokens', 'sequences', 'micro_batches')
    columns = ('advantages',)

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta or 0.0)
        self.temperature = float(getattr(args, 'temperature', 1.0) or 1.0)
        types = getattr(args, 'loss_type', None) or ['grpo']
        self.loss_type = types[0] if isinstance(types, (list, tuple)) else types
        self.epsilon_low = float(getattr(args, 'epsilon', 0.2))
        high = getattr(args, 'epsilon_high', None)
        self.epsilon_high = float(high if high is not None else self.epsilon_low)
        self.level = getattr(args, 'importance_sampling_level', 'token')
        self.max_completion_length = int(getattr(args, 'max_completion_length', 512))
        self.uses_old_logps = (int(getattr(args, 'steps_per_generation', 1) or 1) > 1
                               or int(getattr(args, 'num_iterations', 1) or 1) > 1)
        self.frozen_models = (('ref',) if self.beta else ()) + (('policy',) if self.uses_old_logps else ())
        self.log_entropy = bool(getattr(args, 'log_entropy', True))
        self.train_metrics = ('loss', 'kl', 'clip_ratio/low_mean', 'clip_ratio/high_mean', 'clip_ratio/region_mean',
                              'entropy', 'rollout/logp_diff')

    def count(self, batch: dict) -> dict[str, int]:
        return {'tokens': int((batch['labels'] != IGNORE_INDEX).sum()), 'sequences': int(batch['num_sequences']),
                'micro_batches': 1}

    def _logps(self, output: ModelOutput, batch: dict) -> torch.Tensor:
        return output.scaled(self.temperature).token_logprobs(batch['labels'])

    def frozen_outputs(self, name: str, output: ModelOutput, batch: dict) -> dict[str, torch.Tensor]:
        key = {'ref': 'ref_logps', 'policy': 'old_logps'}[name]
        return {key: self._logps(output, batch).detach()}

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        mask = batch['labels'] != IGNORE_INDEX
        logps = self._logps(output, batch)[mask]
        seq_index = sequence_ids(batch)[mask]
        num_seqs = int(batch['num_sequences'])
        old = batch['old_logps'][mask].to(logps.dtype) if 'old_logps' in batch else logps.detach()
        ref = batch['ref_logps'][mask].to(logps.dtype) if 'ref_logps' in batch else None
        advantages = batch['advantages'].to(device=logps.device, dtype=logps.dtype)[seq_index]
        per_token, info = per_token_loss(logps, old, advantages, seq_index, num_seqs, loss_type=self.loss_type,
                                         epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                                         importance_sampling_level=self.level, beta=self.beta, ref_logps=ref)
        loss = aggregate(per_token, seq_index, num_seqs, self.loss_type, batch['loss_denominator'],
                         self.max_completion_length)
        n = logps.new_tensor(float(logps.numel()))
        zero = logps.new_zeros(())
        low, high = info['clipped_low'].sum().to(n.dtype), info['clipped_high'].sum().to(n.dtype)
        # 'loss': summed over the step's micro-batches and ranks, sum / count is the step loss that was optimised
        share = n / batch['loss_denominator']['tokens'].to(n.dtype).clamp(min=1)
        metrics = {'loss': metric_pair(loss.detach(), share),
                   'kl': metric_pair(info['kl'].sum() if 'kl' in info else zero, n if 'kl' in info else zero),
                   'clip_ratio/low_mean': metric_pair(low, n), 'clip_ratio/high_mean': metric_pair(high, n),
                   'clip_ratio/region_mean': metric_pair(low + high, n),
                   'entropy': metric_pair(self._entropy_sum(output, batch['labels'] != IGNORE_INDEX)
                                          if self.log_entropy else zero, n if self.log_entropy else zero),
                   'rollout/logp_diff': self._engine_diff(logps, batch, mask, n)}
        return loss, torch.tensor(int(logps.numel()), dtype=torch.int), metrics

    def _engine_diff(self, logps: torch.Tensor, batch: dict, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Mean |log-prob of the policy now - the rollout engine's| over the completion tokens: ~0 on a generation's
        first step (the engine holds the pushed weights; a shifted or stale engine shows here), growing as the
        policy moves. The engine reports the raw distribution, so only at ``--temperature`` 1."""
        if 'rollout_logps' not in batch or self.temperature != 1.0:
            return metric_pair(n.new_zeros(()), n.new_zeros(()))
        engine = batch['rollout_logps'][mask].to(logps.dtype)
        return metric_pair((logps.detach() - engine).abs().sum(), n)

    @torch.no_grad()
    def _entropy_sum(self, output: ModelOutput, mask: torch.Tensor) -> torch.Tensor:
        """Sum over the completion tokens of the sampling distribution's entropy (chunks of ``ENTROPY_CHUNK``
        positions: at most that many rows of vocabulary-parallel logits at a time)."""
        positions = output.scaled(self.temperature).masked(mask)
        total = positions.output.new_zeros((), dtype=torch.float32)
        for start in range(0, positions.output.shape[0], ENTROPY_CHUNK):
            chunk = ModelOutput(positions.output[start:start + ENTROPY_CHUNK], positions.head_weight,
                                positions.vocab_size, positions.tp_group, positions.impl)
            lsm = chunk.log_softmax()
            total = total + (-chunk.vocab_sum(torch.exp(lsm) * lsm)).sum().float()
        return total


__all__ = ['GrpoObjective']
