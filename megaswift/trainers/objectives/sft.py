"""Supervised fine-tuning and continued pre-training: loss-scaled next-token cross entropy.

    loss = sum over the step's loss tokens t of loss_scale[t] * ce[t]  /  number of the step's loss tokens

``ce`` is label-smoothed with ``--label_smoothing`` (over the real vocabulary, correct under TP). The labels
and loss scales of ``batch`` are already aligned with the output (position t holds the id predicted at t,
``IGNORE_INDEX`` where nothing is learnt). Evaluation adds token accuracy and the per-token predictions,
targets and losses that ``--eval_metric`` metrics consume.
"""
from __future__ import annotations

from ...utils.constants import IGNORE_INDEX
from .base import ModelOutput, Objective, metric_pair
from .registry import losses


@losses.register('sft')
class SftObjective(Objective):
    eval_metrics = ('loss', 'acc')

    def __init__(self, args):
        super().__init__(args)
        self.label_smoothing = float(getattr(args, 'label_smoothing', 0.0) or 0.0)

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        labels = batch['labels']
        mask = labels != IGNORE_INDEX
        scale = batch.get('loss_scale')
        weights = mask.float() if scale is None else scale.float() * mask
        count = mask.sum()
        if evaluate:
            per_token, pred = output.token_losses(labels, self.label_smoothing, with_argmax=True)
            loss_sum = (per_token * weights).sum()
        else:
            loss_sum = output.weighted_loss_sum(labels, weights, self.label_smoothing)
        metrics = {'loss': metric_pair(loss_sum, count)}
        if evaluate:
            metrics['acc'] = metric_pair(((pred == labels) & mask).sum(), count)
            metrics.update(pred=pred[mask], target=labels[mask], token_loss=per_token.detach()[mask])
        denominator = batch['loss_denominator']
        return loss_sum / denominator.to(loss_sum.dtype), count.int(), metrics
