"""``nlg``: ROUGE-1/2/L F1 (rouge-score) and BLEU-4 (nltk) of generated text against references.

Scores are per-pair and averaged over pairs (as ms-swift's ``compute_rouge_bleu``), reported in
percent: ``{'rouge-1', 'rouge-2', 'rouge-l', 'bleu-4'}``. BLEU-4 is nltk's ``sentence_bleu`` with
uniform 1..4-gram weights and ``SmoothingFunction().method3``.

Text is tokenised once for both: lower-cased runs of letters/digits, with every CJK, kana and
hangul character its own token (so Chinese/Japanese/Korean text scores without a segmenter).
On ASCII text this equals rouge-score's default tokenizer without stemming.
A pair whose reference is empty is skipped; an empty prediction scores 0.
"""
from __future__ import annotations

import re

from .base import Metric, register_metric

_CJK = '\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff'
_TOKEN_RE = re.compile(rf'[{_CJK}]|[^\W_{_CJK}]+')
KEYS = ('rouge-1', 'rouge-2', 'rouge-l', 'bleu-4')


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(str(text).lower())


class _Tokenizer:
    """The ``tokenize(text)`` object rouge-score's ``RougeScorer(tokenizer=...)`` expects."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


def nlg_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean per-pair ROUGE-1/2/L F1 and BLEU-4, in percent (0 for every key when no pair counts)."""
    if len(predictions) != len(references):
        raise ValueError(f'nlg: {len(predictions)} predictions but {len(references)} references')
    try:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError as e:  # pragma: no cover - both are core requirements
        raise ImportError('--eval_metric nlg needs rouge-score and nltk: pip install rouge-score nltk') from e
    scorer = RougeScorer(['rouge1', 'rouge2', 'rougeL'], tokenizer=_Tokenizer())
    smoothing = SmoothingFunction().method3
    sums = dict.fromkeys(KEYS, 0.0)
    count = 0
    for pred, ref in zip(predictions, references):
        ref_tokens, pred_tokens = tokenize(ref), tokenize(pred)
        if not ref_tokens:
            continue
        count += 1
        if not pred_tokens:
            continue
        rouge = scorer.score(ref, pred)  # (target, prediction)
        sums['rouge-1'] += rouge['rouge1'].fmeasure
        sums['rouge-2'] += rouge['rouge2'].fmeasure
        sums['rouge-l'] += rouge['rougeL'].fmeasure
        sums['bleu-4'] += sentence_bleu([ref_tokens], pred_tokens, smoothing_function=smoothing)
    return {k: 100.0 * v / count if count else 0.0 for k, v in sums.items()}


@register_metric('nlg')
class NlgMetric(Metric):
    """``update(predictions: list[str], references: list[str])``; the text is gathered across data
    parallel ranks (all_gather_object) and scored on each rank by :func:`nlg_scores`."""

    inputs = ('predictions', 'references')

    def __init__(self):
        super().__init__()
        self.add_state('predictions', [], 'cat')
        self.add_state('references', [], 'cat')

    def update(self, predictions: list[str], references: list[str]) -> None:
        if isinstance(predictions, str) or isinstance(references, str):
            raise TypeError('nlg: predictions and references must be lists of strings')
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(f'nlg: {len(predictions)} predictions but {len(references)} references')
        self.predictions.extend(map(str, predictions))
        self.references.extend(map(str, references))

    def _compute(self) -> dict[str, float]:
        return nlg_scores(self.predictions, self.references)
