"""Generalised knowledge distillation (Agarwal et al. 2024) from a frozen teacher.

    loss = sum over the step's loss tokens t of JSD_beta(teacher_t || student_t)  /  loss tokens

with both distributions at ``--temperature`` and JSD_beta the generalised Jensen-Shannon divergence
(``preference_losses.generalized_jsd``: beta 0 = KL(teacher || student), 1 = KL(student || teacher)). The teacher
(``--teacher_model``, same tokenizer) runs in the same parallel layout; its vocabulary-parallel logits are kept
only at the loss positions, and the divergence sums over the vocabulary across tensor-parallel ranks.

Which tokens the divergence is taken on, decided once per step (the same on every rank, from ``--seed`` and the
step, so a resumed run decides alike):

- with probability ``--lmbda``: the student's own completions of the step's prompts (on-policy distillation),
  sampled at ``--temperature`` with at most ``--max_completion_length`` new tokens;
- otherwise, with ``--seq_kd``: the teacher's completions (sequence-level KD);
- otherwise: the dataset's responses (supervised KD).

Logged: ``jsd`` (= the loss; ``eval_jsd`` on ``--val_dataset``'s responses), ``completions/generated`` (the
fraction of trained sequences that were generated) and ``completions/mean_length`` (their mean trained tokens).
Generated completions come from ``trainers/rollout.py`` (the in-trainer generation).
"""
from __future__ import annotations

import random

import torch

from ...utils.constants import IGNORE_INDEX
from .base import ModelOutput, Objective, metric_pair
from .preference_losses import generalized_jsd
from .registry import losses


@losses.register('gkd')
class GkdObjective(Objective):
    frozen_models = ('teacher',)
    eval_metrics = ('loss', 'jsd')

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta)
        self.temperature = float(getattr(args, 'temperature', 1.0))
        self.lmbda = float(getattr(args, 'lmbda', 0.0) or 0.0)
        self.seq_kd = bool(getattr(args, 'seq_kd', False))
        self.max_completion_length = int(getattr(args, 'max_completion_length', 512) or 512)
        self.seed = int(getattr(args, 'seed', 0) or 0)
        self.train_metrics = ('loss', 'jsd', 'completions/generated', 'completions/mean_length')

    def completion_source(self, step: int) -> str | None:
        """Whose completions step ``step`` trains on: 'policy' (on-policy), 'teacher' (``--seq_kd``) or None
        (the dataset's responses)."""
        if self.lmbda > 0 and random.Random(f'gkd-lmbda:{self.seed}:{step}').random() < self.lmbda:
            return 'policy'
        return 'teacher' if self.seq_kd else None

    def rollout(self, batches: list[dict], rollout) -> list[dict]:
        source = self.completion_source(rollout.step)
        if source is None:
            return batches
        return rollout.completions(source, self.temperature, self.max_completion_length)

    def _log_probs(self, output: ModelOutput, batch: dict) -> torch.Tensor:
        positions = output.masked(batch['labels'] != IGNORE_INDEX)
        return positions.scaled(self.temperature).log_softmax()

    def frozen_outputs(self, name: str, output: ModelOutput, batch: dict) -> dict:
        return {'teacher_log_probs': self._log_probs(output, batch)}

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        student = self._log_probs(output, batch)
        positions = output.masked(batch['labels'] != IGNORE_INDEX)
        per_token = generalized_jsd(student, batch['teacher_log_probs'].to(student.dtype), self.beta,
                                    vocab_sum=positions.vocab_sum)
        total = per_token.sum()
        n = total.new_tensor(float(per_token.numel()))
        sequences = total.new_tensor(float(batch['num_sequences']))
        generated = sequences if 'generated_tokens' in batch else total.new_zeros(())
        jsd = metric_pair(total, n)  # the loss: mean generalised JSD per token (also logged by that name)
        return (total / batch['loss_denominator'].to(total.dtype), torch.tensor(per_token.numel(), dtype=torch.int),
                {'loss': jsd, 'jsd': jsd, 'completions/generated': metric_pair(generated, sequences),
                 'completions/mean_length': metric_pair(n, sequences)})


__all__ = ['GkdObjective']
