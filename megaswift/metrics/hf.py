"""Adapter for HF-style metric functions: ``compute_metrics(EvalPrediction) -> dict[str, float]``.

    def my_metric(pred):            # pred.predictions, pred.label_ids: numpy arrays
        return {'exact': float((pred.predictions == pred.label_ids).all(-1).mean())}

    register_hf_metric('exact', my_metric, preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))

The metric's ``update(preds, labels)`` stores each batch (after ``preprocess_logits_for_metrics``,
which HF calls with the logits and labels tensors) as numpy; ``compute`` gathers the batches of
all data-parallel ranks, pads them along dim 1 with ``pad_index`` (-100, as HF's evaluation loop
does) and concatenates them along dim 0 before calling the function once.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .base import Metric, metrics


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def pad_concat(arrays: list[np.ndarray], pad_index: int = -100) -> np.ndarray | None:
    """Concatenate along dim 0, padding dim 1 to the longest with ``pad_index``; None when empty."""
    if not arrays:
        return None
    if arrays[0].ndim < 2 or all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    width = max(a.shape[1] for a in arrays)
    padded = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, width - a.shape[1])
        padded.append(np.pad(a, pad, constant_values=pad_index))
    return np.concatenate(padded, axis=0)


class HFMetric(Metric):
    """Base of the classes :func:`hf_metric` builds; set ``compute_metrics`` on a subclass."""

    inputs = ('preds', 'labels')
    compute_metrics: Callable[[Any], dict] | None = None
    preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None
    pad_index: int = -100

    def __init__(self):
        super().__init__()
        self.add_state('predictions', [], 'cat')
        self.add_state('label_ids', [], 'cat')

    def update(self, preds, labels) -> None:
        preprocess = type(self).preprocess_logits_for_metrics
        if preprocess is not None:
            preds = preprocess(preds, labels)
        self.predictions.append(_to_numpy(preds))
        self.label_ids.append(_to_numpy(labels))

    def _compute(self) -> dict[str, float]:
        from transformers import EvalPrediction
        fn = type(self).compute_metrics
        if fn is None:
            raise NotImplementedError(f'{type(self).__name__}.compute_metrics is not set')
        pred = EvalPrediction(predictions=pad_concat(self.predictions, self.pad_index),
                              label_ids=pad_concat(self.label_ids, self.pad_index))
        return dict(fn(pred))


def hf_metric(compute_metrics: Callable[[Any], dict], preprocess_logits_for_metrics: Callable | None = None,
              name: str | None = None) -> type[HFMetric]:
    """A :class:`Metric` subclass that feeds the gathered batches to ``compute_metrics``."""
    attrs = {'compute_metrics': staticmethod(compute_metrics),
             'preprocess_logits_for_metrics': (staticmethod(preprocess_logits_for_metrics)
                                               if preprocess_logits_for_metrics is not None else None)}
    cls_name = name or getattr(compute_metrics, '__name__', 'hf_metric')
    return type(f'HFMetric_{cls_name}', (HFMetric,), attrs)


def register_hf_metric(name: str, compute_metrics: Callable[[Any], dict],
                       preprocess_logits_for_metrics: Callable | None = None) -> type[HFMetric]:
    """``metrics[name] = hf_metric(...)``; returns the class."""
    metrics[name] = cls = hf_metric(compute_metrics, preprocess_logits_for_metrics, name)
    return cls
