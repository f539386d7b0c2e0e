"""Generalised knowledge distillation (Agarwal et al. 2024) from a frozen teacher on the dataset's responses.

    loss = sum over the step's loss tokens t of JSD_beta(teacher_t || student_t)  /  loss tokens

with both distributions at ``--temperature`` and JSD_beta the generalised Jensen-Shannon divergence
(``preference_losses.generalized_jsd``: beta 0 = KL(teacher || student), 1 = KL(student || teacher)). The teacher
(``--teacher_model``, same tokenizer) runs in the same parallel layout; its vocabulary-parallel logits are kept
only at the loss positions, and the divergence sums over the vocabulary across tensor-parallel ranks.
"""
from __future__ import annotations

import torch

from ...utils.constants import IGNORE_INDEX
from .base import ModelOutput, Objective, metric_pair
from .preference_losses import generalized_jsd
from .registry import losses


@losses.register('gkd')
class GkdObjective(Objective):
    frozen_models = ('teacher',)
    train_metrics = eval_metrics = ('loss',)

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta)
        self.temperature = float(getattr(args, 'temperature', 1.0))

    def _log_probs(self, output: ModelOutput, batch: dict) -> torch.Tensor:
        positions = output.masked(batch['labels'] != IGNORE_INDEX)
        if self.temperature != 1.0:
            return _scaled(positions, self.temperature).log_softmax()
        return positions.log_softmax()

    def frozen_outputs(self, name: str, output: ModelOutput, batch: dict) -> dict:
        return {'teacher_log_probs': self._log_probs(output, batch)}

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        student = self._log_probs(output, batch)
        positions = output.masked(batch['labels'] != IGNORE_INDEX)
        per_token = generalized_jsd(student, batch['teacher_log_probs'].to(student.dtype), self.beta,
                                    vocab_sum=positions.vocab_sum)
        total = per_token.sum()
        n = total.new_tensor(float(per_token.numel()))
        return (total / batch['loss_denominator'].to(total.dtype), torch.tensor(per_token.numel(), dtype=torch.int),
                {'loss': metric_pair(total, n)})


def _scaled(output: ModelOutput, temperature: float) -> ModelOutput:
    """The output whose logits are divided by ``temperature`` (hidden states scale the same way when the head is
    fused: the head is linear)."""
    return ModelOutput(output.output / temperature, output.head_weight, output.vocab_size, output.tp_group,
                       output.impl)


__all__ = ['GkdObjective']
