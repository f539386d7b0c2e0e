"""``ConfigLossScale``: a loss scale read from a JSON file (the format of ms-swift's loss-scale configs).

The file maps keys to weights. The *shape of the value* says how the key is read:

- ``"key": [w_key, w_after]`` (two numbers): the key is a **literal string**. Each assistant turn is
  cut at every occurrence of a key; the key text gets ``w_key`` and the text after it, up to the next
  key (or the end of the turn), gets ``w_after``. Text before the first key keeps weight 1. Where two
  keys start at the same place the longer wins (``Action Input:`` over ``Action``).
- ``"pattern": w`` or ``"pattern": [w]`` (one number): the key is a **regular expression** (Python
  ``re``, compiled with ``re.DOTALL`` so ``.`` crosses newlines); every match gets weight ``w`` and
  unmatched text keeps weight 1. Matches are taken left to right without overlap (at the same start
  the key listed first wins); ``^`` anchors at the start of the turn; empty matches are ignored.

A file may mix both kinds: each kind is applied to the whole turn and the two weights multiply.
Weights must be finite numbers >= 0. ms-swift's own files (``react.json``, ``hermes.json``,
``qwen.json``, ``ignore_empty_think.json``) load unchanged.

Subclass and set ``loss_scale_config`` to a file name in ``config/`` next to this module or to a path,
or pass ``config=`` (a path or an already-parsed dict) to the constructor.
"""
from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path

from .base import LossScale

CONFIG_DIR = Path(__file__).with_name('config')


class ConfigLossScale(LossScale):
    loss_scale_config: str | None = None  # file name in config/, or a path

    def __init__(self, base_strategy: str = 'default', config: str | Path | dict | None = None):
        super().__init__(base_strategy)
        source = config if config is not None else self.loss_scale_config
        if source is None:
            raise ValueError(f'{type(self).__name__}: set loss_scale_config or pass config=')
        if isinstance(source, dict):
            self.literal, self.regex = parse_config(source, '<dict>')
        else:
            self.literal, self.regex = _load(str(resolve_config_path(source)))
        weights = [w for pair in self.literal.values() for w in pair] + [w for _, w in self.regex]
        self.is_binary = all(w in (0.0, 1.0) for w in weights)
        self._literal_re = None
        if self.literal:  # longest first: at one position the regex alternation takes the first that matches
            keys = sorted(self.literal, key=len, reverse=True)
            self._literal_re = re.compile('|'.join(re.escape(k) for k in keys))

    def get_loss_scale(self, context: str, **kwargs) -> tuple[list[str], list[float]]:
        spans = [(0, len(context), 1.0)]
        if self._literal_re is not None:
            spans = self._literal_spans(context)
        if self.regex:
            spans = _intersect(spans, self._regex_spans(context))
        spans = [s for s in spans if s[1] > s[0]] or [(0, len(context), 1.0)]
        return [context[s:e] for s, e, _ in spans], [w for _, _, w in spans]

    def _literal_spans(self, text: str) -> list[tuple[int, int, float]]:
        spans, start, weight = [], 0, 1.0
        for m in self._literal_re.finditer(text):
            w_key, w_after = self.literal[m.group()]
            spans += [(start, m.start(), weight), (m.start(), m.end(), w_key)]
            start, weight = m.end(), w_after
        spans.append((start, len(text), weight))
        return spans

    def _regex_spans(self, text: str) -> list[tuple[int, int, float]]:
        spans, pos = [], 0
        cache: dict[int, re.Match | None] = {}  # each pattern's next match, reused while it starts at/after pos
        while pos < len(text):
            best = None
            for k, (pattern, weight) in enumerate(self.regex):
                m = cache.get(k, False)
                if m is False or (m is not None and m.start() < pos):
                    m = cache[k] = _first_nonempty(pattern, text, pos)
                if m is not None and (best is None or m.start() < best[0].start()):
                    best = (m, weight)
            if best is None:
                break
            m, weight = best
            spans += [(pos, m.start(), 1.0), (m.start(), m.end(), weight)]
            pos = m.end()
        spans.append((pos, len(text), 1.0))
        return spans


def _first_nonempty(pattern: re.Pattern, text: str, pos: int):
    m = pattern.search(text, pos)
    while m is not None and m.end() == m.start():
        if m.start() >= len(text):
            return None
        m = pattern.search(text, m.start() + 1)
    return m


def _intersect(a: list[tuple[int, int, float]], b: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Two covers of the same text -> their common refinement, weights multiplied."""
    out, i, j = [], 0, 0
    a = [s for s in a if s[1] > s[0]]
    b = [s for s in b if s[1] > s[0]]
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            out.append((start, end, a[i][2] * b[j][2]))
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return out


def resolve_config_path(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and not path.is_file():
        path = CONFIG_DIR / path
    if not path.is_file():
        raise FileNotFoundError(f"loss-scale config '{source}' not found (looked in {CONFIG_DIR} too)")
    return path


@lru_cache(maxsize=64)
def _load(path: str):
    try:
        data = json.loads(Path(path).read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f"loss-scale config '{path}' is not valid JSON ({e})") from None
    return parse_config(data, path)


def parse_config(data, where: str) -> tuple[dict[str, tuple[float, float]], list[tuple[re.Pattern, float]]]:
    """JSON mapping -> (literal keys -> (w_key, w_after), [(compiled regex, w)])."""
    if not isinstance(data, dict) or not data:
        raise ValueError(f"loss-scale config '{where}' must be a non-empty JSON object")
    literal: dict[str, tuple[float, float]] = {}
    regex: list[tuple[re.Pattern, float]] = []
    for key, value in data.items():
        def bad(why: str):
            return ValueError(f"loss-scale config '{where}', key {key!r}: {why}")
        if not isinstance(key, str) or not key:
            raise bad('keys must be non-empty strings')
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for w in values:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise bad(f'weights must be finite numbers >= 0, got {w!r}')
        if len(values) == 2:
            literal[key] = (float(values[0]), float(values[1]))
        elif len(values) == 1:
            try:
                regex.append((re.compile(key, re.DOTALL), float(values[0])))
            except re.error as e:
                raise bad(f'is not a valid regular expression ({e})') from None
        else:
            raise bad('value must be [w_key, w_after] (literal key) or w / [w] (regex key)')
    return literal, regex


# ---------------------------------------------------------------------- built-ins
class ReactLossScale(ConfigLossScale):
    """ReAct: Action/Action Input and what follows x2; Thought/Final Answer x1; Observation: x2, its result 0."""
    loss_scale_config = 'react.json'


class HermesLossScale(ConfigLossScale):
    """Hermes: each ``<tool_call>...</tool_call>`` block x2; other assistant text x1."""
    loss_scale_config = 'hermes.json'


class QwenLossScale(ConfigLossScale):
    """Qwen ✿ markers: ✿FUNCTION✿:/✿ARGS✿: and their text x2; ✿RESULT✿: x2 and its result 0; ✿RETURN✿: x1."""
    loss_scale_config = 'qwen.json'


class IgnoreEmptyThinkLossScale(ConfigLossScale):
    """An empty ``<think>...</think>`` prefix (whitespace only) of a turn gets weight 0."""
    loss_scale_config = 'ignore_empty_think.json'
