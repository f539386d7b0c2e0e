"""Two objectives written as a user would, in an ``--external_plugins`` file (one class each + a registry line).

- ``z_loss_sft``: SFT plus PaLM's z-loss, ``coef * log(Z)^2`` per loss token, which keeps the softmax
  normaliser near 1 (log-sum-exp over the full vocabulary, correct under TP).
- ``ref_kl_sft``: SFT plus ``beta * (log pi - log pi_ref)^2`` per loss token, against a frozen reference model
  (``frozen_models = ('ref',)``, its log-probs stored in the batch before the policy's forward). At step 1 the
  policy equals the reference, so the term and its gradient are exactly 0; afterwards it pulls back.
"""
from __future__ import annotations

from megaswift.trainers.objectives import Objective, losses, metric_pair
from megaswift.utils.constants import IGNORE_INDEX

Z_LOSS_COEF = 1e-2
REF_KL_BETA = 5.0


@losses.register('z_loss_sft')
class ZLossSft(Objective):
    train_metrics = eval_metrics = ('loss', 'z_loss')

    def loss(self, output, batch, evaluate=False):
        mask = batch['labels'] != IGNORE_INDEX
        ce, _ = output.token_losses(batch['labels'])
        z = (output.log_sum_exp().square() * mask).sum()
        total = (ce * mask).sum() + Z_LOSS_COEF * z
        count = mask.sum()
        return (total / batch['loss_denominator'], count.int(),
                {'loss': metric_pair(total, count), 'z_loss': metric_pair(z, count)})


@losses.register('ref_kl_sft')
class RefKlSft(Objective):
    frozen_models = ('ref',)
    train_metrics = eval_metrics = ('loss', 'ref_kl')

    def frozen_outputs(self, name, output, batch):
        return {'ref_logps': output.token_logprobs(batch['labels'])}

    def loss(self, output, batch, evaluate=False):
        labels = batch['labels']
        mask = labels != IGNORE_INDEX
        logps = output.token_logprobs(labels)
        kl = ((logps - batch['ref_logps']).square() * mask).sum()
        total = -logps.sum() + REF_KL_BETA * kl
        count = mask.sum()
        return (total / batch['loss_denominator'], count.int(),
                {'loss': metric_pair(total, count), 'ref_kl': metric_pair(kl, count)})
