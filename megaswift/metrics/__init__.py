"""Evaluation metrics (``--eval_metric``); see :mod:`.base` for the contract.

Built-ins: ``loss`` (token-weighted mean), ``acc`` (token accuracy), ``nlg`` (ROUGE-1/2/L, BLEU-4).
"""
from .base import Metric, UnknownMetricError, build_metrics, metrics, register_metric
from .builtin import AccMetric, LossMetric
from .hf import HFMetric, hf_metric, register_hf_metric
from .nlg import NlgMetric, nlg_scores

__all__ = ['Metric', 'metrics', 'register_metric', 'build_metrics', 'UnknownMetricError', 'LossMetric', 'AccMetric',
           'NlgMetric', 'nlg_scores', 'HFMetric', 'hf_metric', 'register_hf_metric']
