"""Loss scale: the training weight of every piece of a rendered conversation.

``LossScale(base_strategy).apply(segments) -> [(text, weight), ...]`` whose texts concatenate
to the whole conversation. The base strategy picks the weighted segments:
- ``default``: every assistant turn (content + end token);
- ``last_round``: the assistant turns after the last user message (as in ms-swift: with agent
  data that is the tool-calling turn(s) and the final answer; without tools, the last turn);
- ``all``: every token (pre-training style; template glue included).
A message's ``loss`` field (true/false or a number >= 0) overrides the strategy for that turn: it
becomes the turn's base weight (false/0 masks the turn, true trains it even outside the last
round, 0.5 halves it). Unlike ms-swift, the turn is still split by ``get_loss_scale`` and the
weights multiply, so e.g. a ReAct observation stays at weight 0 whatever ``loss`` says.

Subclasses split a weighted segment further in ``get_loss_scale(context, **kwargs) -> (parts, weights)``
(e.g. zero weight on a ReAct ``Observation:``); the weights multiply the base weight. The keyword
arguments are ``segment`` (the ``Segment``), ``is_last_round`` (bool) and ``query`` (the text of the
last user message before it, or None); overrides should accept ``**kwargs``.

Weights of 0 and 1 only fold into ``labels``; any other weight makes the template emit a per-token
``loss_scale`` list. ``is_binary`` is only a hint; the template decides from the actual weights.
"""
from __future__ import annotations

import math

from ...utils.registry import Registry
from ..errors import TemplateError
from ..segments import Segment

BASE_STRATEGIES = ('default', 'last_round', 'all')


class LossScale:
    is_binary = True  # a hint for readers; binarity of an encoded sample is decided from its weights

    def __init__(self, base_strategy: str = 'default'):
        if base_strategy not in BASE_STRATEGIES:
            raise ValueError(f"unknown loss-scale strategy '{base_strategy}' "
                             f"(choose from {', '.join(BASE_STRATEGIES)})")
        self.base_strategy = base_strategy

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.base_strategy}')"

    def get_loss_scale(self, context: str, **kwargs) -> tuple[list[str], list[float]]:
        """Split one weighted segment's text into parts with relative weights. Default: unchanged."""
        return [context], [1.0]

    # ------------------------------------------------------------------ strategy
    def base_weight(self, segment: Segment, is_last_round: bool) -> float:
        if segment.trainable and segment.loss is not None:
            return message_loss(segment)
        if self.base_strategy == 'all':
            return 1.0
        if not segment.trainable:
            return 0.0
        if self.base_strategy == 'last_round':
            return 1.0 if is_last_round else 0.0
        return 1.0

    def apply(self, segments: list[Segment]) -> list[tuple[str, float]]:
        user_indices = [s.message_index for s in segments if s.role == 'user' and s.message_index is not None]
        last_user = max(user_indices) if user_indices else -1
        out: list[tuple[str, float]] = []
        query = None
        for seg in segments:
            if seg.role == 'user' and seg.message_index is not None:
                query = seg.text
            is_last_round = seg.message_index is not None and seg.message_index > last_user
            weight = self.base_weight(seg, is_last_round)
            if weight == 0.0 or not seg.text:
                out.append((seg.text, 0.0))
                continue
            parts, weights = self.get_loss_scale(seg.text, segment=seg, is_last_round=is_last_round, query=query)
            check_split(self, seg.text, parts, weights)
            out += [(p, weight * float(w)) for p, w in zip(parts, weights)]
        return out


class ConcatLossScale(LossScale):
    """``strategy+a+b``: ``b`` splits each part that ``a`` returned; weights multiply."""

    def __init__(self, scales: list[LossScale], base_strategy: str = 'default', names: list[str] | None = None):
        super().__init__(base_strategy)
        self.scales = list(scales)
        self.names = names or [type(s).__name__ for s in self.scales]
        self.is_binary = all(getattr(s, 'is_binary', True) for s in self.scales)

    def __repr__(self) -> str:
        return f"ConcatLossScale('{'+'.join([self.base_strategy, *self.names])}')"

    def get_loss_scale(self, context: str, **kwargs) -> tuple[list[str], list[float]]:
        parts, weights = [context], [1.0]
        for scale in self.scales:
            new_parts, new_weights = [], []
            for part, weight in zip(parts, weights):
                if weight == 0.0 or not part:  # nothing left to scale
                    new_parts.append(part)
                    new_weights.append(weight)
                    continue
                sub_parts, sub_weights = scale.get_loss_scale(part, **kwargs)
                check_split(scale, part, sub_parts, sub_weights)
                new_parts += sub_parts
                new_weights += [weight * float(w) for w in sub_weights]
            parts, weights = new_parts, new_weights
        return parts, weights


def check_split(scale, text: str, parts, weights) -> None:
    name = type(scale).__name__
    if len(parts) != len(weights):
        raise ValueError(f'{name}.get_loss_scale returned {len(parts)} parts but {len(weights)} weights')
    if ''.join(parts) != text:
        raise ValueError(f'{name}.get_loss_scale must return parts that join to its input')
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f'{name}.get_loss_scale returned weight {w!r}; weights must be finite numbers >= 0')


def message_loss(segment: Segment) -> float:
    """The message's ``loss`` field as a weight; a bad value is a TemplateError naming the field."""
    value = segment.loss
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    raise TemplateError(f'must be true, false or a number >= 0, got {value!r}',
                        f'messages[{segment.message_index}].loss')


loss_scales = Registry('loss scale')
