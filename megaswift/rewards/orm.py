"""Built-in outcome reward models (ORMs), registered into :data:`megaswift.rewards.base.orms`.

Every ORM is a class instantiable with no arguments whose instances are called as
``orm(completions, **columns) -> list[float]``. Columns read (all optional, aligned with
``completions``; a missing column counts as all-None):

=================  =======================================================
``math``           ``solution``
``accuracy``       ``solution``
``format``         (none)
``react_format``   (none)
``cosine``         ``solution`` (via its accuracy ORM), ``response_token_ids``
``repetition``     (none)
``soft_overlong``  ``response_token_ids``
=================  =======================================================
"""
from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable

from .base import ORM, orms
from .math_answer import is_correct

_ANSWER_TAG_RE = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)


def column(columns: dict[str, Any], name: str, n: int) -> list[Any]:
    """Column ``name`` as a list of ``n`` entries (all None when absent); a length mismatch raises."""
    values = columns.get(name)
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward column '{name}' has {len(values)} entries but there are {n} completions")
    return values


def response_length(completion: str, token_ids: list[int] | None) -> int:
    """Length in tokens: ``len(response_token_ids)`` when given, else a whitespace word count."""
    if token_ids is not None:
        return len(token_ids)
    return len(completion.split())


class MathORM(ORM):
    """``math``: 1.0 when the completion's extracted final answer equals the solution's, else 0.0.

    Extraction and equivalence live in :mod:`megaswift.rewards.math_answer` (boxed, ``<answer>``
    tag or last number; numeric tolerance; sympy). A None solution scores 0.0.
    """

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        solutions = column(columns, 'solution', len(completions))
        return [float(is_correct(c, s)) for c, s in zip(completions, solutions)]


def _import_math_verify():
    try:
        from math_verify import parse, verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the 'accuracy' reward needs the math_verify package: pip install 'math-verify[antlr4_13_2]'"
                          ) from e
    return parse, verify


class MathAccuracy(ORM):
    """``accuracy``: 1.0 when ``math_verify`` verifies the completion against the solution, else 0.0.

    The ``<answer>...</answer>`` part of a completion is parsed when present, else the whole
    text. When ``math_verify`` cannot parse the gold solution, the ``math`` comparison decides.
    ``math_verify`` times out with SIGALRM, which works only in the main thread; elsewhere it
    runs without a timeout.
    """

    def __init__(self, timeout_seconds: int = 5):
        self.parse, self.verify = _import_math_verify()
        self.timeout_seconds = timeout_seconds

    def _timeout(self) -> int | None:
        return self.timeout_seconds if threading.current_thread() is threading.main_thread() else None

    def score(self, completion: str, solution: str | None) -> float:
        """The accuracy of one completion."""
        if solution is None or completion is None:
            return 0.0
        timeout = self._timeout()
        gold = self.parse(str(solution), extraction_mode='first_match', parsing_timeout=timeout)
        if not gold:
            return float(is_correct(completion, solution))
        tags = _ANSWER_TAG_RE.findall(completion)
        text = tags[-1] if tags else completion
        pred = self.parse(text, parsing_timeout=timeout)
        return float(bool(pred) and self.verify(gold, pred, timeout_seconds=timeout))

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        solutions = column(columns, 'solution', len(completions))
        return [self.score(c, s) for c, s in zip(completions, solutions)]


class Format(ORM):
    """``format``: 1.0 iff the completion is ``<think>...</think>`` then ``<answer>...</answer>``."""

    pattern = re.compile(r'^<think>.*?</think>\s*<answer>.*?</answer>$', re.DOTALL)

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        return [1.0 if self.pattern.match(c or '') else 0.0 for c in completions]


class ReActFormat(Format):
    """``react_format``: 1.0 iff the completion is ``<think>...</think>`` then ``Action: ... Action Input: ...``."""

    pattern = re.compile(r'^<think>.*?</think>\s*Action:.*?Action Input:.*?$', re.DOTALL)


class CosineReward(ORM):
    """``cosine``: accuracy scaled by response length along a half cosine (Yeo et al. 2025,
    "Demystifying Long Chain-of-Thought Reasoning in LLMs").

    With ``t = min(len, max_len)``, ``value = max_v + 0.5 * (min_v - max_v) * (1 + cos(pi * t / max_len))``,
    so a length-0 answer gets ``min_v`` (the ``*_min_len_value_*``) and a ``max_len`` answer ``max_v``
    (the ``*_max_len_value_*``). With the defaults a correct answer decays from 1.0 to 0.5 as it
    grows, and a wrong one rises from -0.5 to 0.0 (short wrong answers are punished most).
    Correctness is ``accuracy_orm(...) >= 1.0``; ``accuracy_orm`` is an ORM instance, an ORM
    name, or None for ``accuracy``.
    """

    def __init__(self, cosine_min_len_value_wrong: float = -0.5, cosine_max_len_value_wrong: float = 0.0,
                 cosine_min_len_value_correct: float = 1.0, cosine_max_len_value_correct: float = 0.5,
                 cosine_max_len: int = 1000, accuracy_orm: ORM | str | Callable | None = None):
        if cosine_max_len <= 0:
            raise ValueError(f'cosine_max_len must be positive, got {cosine_max_len}')
        self.min_len_value_wrong = cosine_min_len_value_wrong
        self.max_len_value_wrong = cosine_max_len_value_wrong
        self.min_len_value_correct = cosine_min_len_value_correct
        self.max_len_value_correct = cosine_max_len_value_correct
        self.max_len = cosine_max_len
        if accuracy_orm is None:
            accuracy_orm = MathAccuracy()
        elif isinstance(accuracy_orm, str):
            accuracy_orm = orms.lookup(accuracy_orm)()
        self.accuracy_orm = accuracy_orm

    @staticmethod
    def cosfn(t: float, max_len: float, min_v: float, max_v: float) -> float:
        """The value at length ``t``: ``min_v`` at 0, ``max_v`` at ``max_len`` (clamped beyond)."""
        t = min(max(t, 0), max_len)
        return max_v + 0.5 * (min_v - max_v) * (1.0 + math.cos(math.pi * t / max_len))

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        acc = self.accuracy_orm(completions, **columns)
        token_ids = column(columns, 'response_token_ids', len(completions))
        rewards = []
        for completion, ids, a in zip(completions, token_ids, acc):
            if a >= 1.0:
                min_v, max_v = self.min_len_value_correct, self.max_len_value_correct
            else:
                min_v, max_v = self.min_len_value_wrong, self.max_len_value_wrong
            rewards.append(self.cosfn(response_length(completion, ids), self.max_len, min_v, max_v))
        return rewards


class RepetitionPenalty(ORM):
    """``repetition``: ``(1 - unique_ngrams / total_ngrams) * repetition_max_penalty`` over word n-grams.

    0.0 for texts with fewer than ``repetition_n_grams`` words; ``repetition_max_penalty`` must be <= 0.
    """

    def __init__(self, repetition_n_grams: int = 3, repetition_max_penalty: float = -1.0):
        if repetition_max_penalty > 0:
            raise ValueError(f'repetition_max_penalty should not be positive, got {repetition_max_penalty}')
        if repetition_n_grams < 1:
            raise ValueError(f'repetition_n_grams must be >= 1, got {repetition_n_grams}')
        self.n = repetition_n_grams
        self.max_penalty = repetition_max_penalty

    def penalty(self, text: str) -> float:
        """The penalty of one text."""
        words = (text or '').lower().split()
        if len(words) < self.n:
            return 0.0
        ngrams = [tuple(words[i:i + self.n]) for i in range(len(words) - self.n + 1)]
        return (1.0 - len(set(ngrams)) / len(ngrams)) * self.max_penalty

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        return [self.penalty(c) for c in completions]


class SoftOverlong(ORM):
    """``soft_overlong``: DAPO's soft overlong punishment (Yu et al. 2025).

    With ``L`` the length in tokens (``response_token_ids``, else whitespace words), ``Lmax =
    soft_max_length`` and ``Lc = soft_cache_length``: 0 for ``L <= Lmax - Lc``, then linear
    ``(Lmax - Lc - L) / Lc`` down to -1 at ``L == Lmax``, and -1 beyond.
    """

    def __init__(self, soft_max_length: int = 1024, soft_cache_length: int = 256):
        if not 0 < soft_cache_length <= soft_max_length:
            raise ValueError(f'need 0 < soft_cache_length <= soft_max_length, got {soft_cache_length}, '
                             f'{soft_max_length}')
        self.max_length = soft_max_length
        self.cache_length = soft_cache_length

    def penalty(self, length: int) -> float:
        """The reward for a response of ``length`` tokens."""
        expected = self.max_length - self.cache_length
        if length <= expected:
            return 0.0
        return max(-1.0, (expected - length) / self.cache_length)

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        token_ids = column(columns, 'response_token_ids', len(completions))
        return [self.penalty(response_length(c, ids)) for c, ids in zip(completions, token_ids)]


orms.update({
    'math': MathORM,
    'accuracy': MathAccuracy,
    'format': Format,
    'react_format': ReActFormat,
    'cosine': CosineReward,
    'repetition': RepetitionPenalty,
    'soft_overlong': SoftOverlong,
})

__all__ = ['MathORM', 'MathAccuracy', 'Format', 'ReActFormat', 'CosineReward', 'RepetitionPenalty', 'SoftOverlong',
           'column', 'response_length']
