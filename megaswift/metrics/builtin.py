"""Built-in metrics on tensors: ``loss`` (token-weighted mean) and ``acc`` (token accuracy)."""
from __future__ import annotations

import torch

from .base import Metric, register_metric


@register_metric('loss')
class LossMetric(Metric):
    """Token-weighted mean loss: ``sum(loss_sum) / sum(num_tokens)`` over all updates and ranks.

    ``update(loss_sum, num_tokens)``: the summed (unreduced) token losses of a micro-batch and the
    number of tokens they cover (tensors or numbers). ``compute() -> {'loss': float}``.
    """

    inputs = ('loss_sum', 'num_tokens')

    def __init__(self):
        super().__init__()
        self.add_state('loss_sum', torch.tensor(0.0, dtype=torch.float64), 'sum')
        self.add_state('num_tokens', torch.tensor(0.0, dtype=torch.float64), 'sum')

    def update(self, loss_sum, num_tokens) -> None:
        self.accumulate('loss_sum', loss_sum)
        self.accumulate('num_tokens', num_tokens)

    def _compute(self) -> dict[str, float]:
        return {'loss': self.safe_div(self.loss_sum, self.num_tokens)}


@register_metric('acc')
class AccMetric(Metric):
    """Token accuracy over positions whose label is not ``ignore_index``.

    ``update(preds, labels)``: ``preds`` are token ids with the shape of ``labels``, or logits with
    one more (last) dimension (argmax is taken). ``labels`` must already be aligned with ``preds``
    (Megatron's pre-shifted labels). ``compute() -> {'acc': float}`` in [0, 1].
    """

    inputs = ('preds', 'labels')

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state('correct', torch.tensor(0, dtype=torch.int64), 'sum')
        self.add_state('total', torch.tensor(0, dtype=torch.int64), 'sum')

    def update(self, preds, labels) -> None:
        preds, labels = torch.as_tensor(preds).detach(), torch.as_tensor(labels).detach()
        if preds.dim() == labels.dim() + 1:
            preds = preds.argmax(dim=-1)
        preds = preds.to(labels.device)
        if preds.shape != labels.shape:
            raise ValueError(f'acc: preds {tuple(preds.shape)} and labels {tuple(labels.shape)} do not match '
                             '(preds must be token ids shaped like labels, or logits with one extra last dim)')
        mask = labels != self.ignore_index
        self.accumulate('correct', ((preds == labels) & mask).sum())
        self.accumulate('total', mask.sum())

    def _compute(self) -> dict[str, float]:
        return {'acc': self.safe_div(self.correct, self.total)}
