"""Loss scale: the training weight of every piece of a rendered conversation.

``LossScale(base_strategy).apply(segments) -> [(text, weight), ...]`` whose texts concatenate
to the whole conversation. The base strategy picks the weighted segments:
- ``default``: every assistant turn (content + end token);
- ``last_round``: only the last assistant turn;
- ``all``: every token (pre-training style; template glue included).
A message's ``loss`` field (true/false or a number) overrides the strategy for that turn.
Subclasses split a weighted segment further in ``get_loss_scale(context, **kw) -> (parts, weights)``
(e.g. zero weight on a ReAct ``Observation:``); the weights multiply the base weight.
"""
from __future__ import annotations

from ..segments import Segment

BASE_STRATEGIES = ('default', 'last_round', 'all')


class LossScale:
    is_binary = True  # a hint for readers; binarity of an encoded sample is decided from its weights

    def __init__(self, base_strategy: str = 'default'):
        if base_strategy not in BASE_STRATEGIES:
            raise ValueError(f"unknown loss-scale strategy '{base_strategy}' (choose from {', '.join(BASE_STRATEGIES)})")
        self.base_strategy = base_strategy

    def get_loss_scale(self, context: str, *, segment: Segment, is_last_round: bool) -> tuple[list[str], list[float]]:
        """Split one weighted segment's text into parts with relative weights. Default: unchanged."""
        return [context], [1.0]

    def base_weight(self, segment: Segment, last_assistant: int | None) -> float:
        if segment.trainable and segment.loss is not None:
            return float(segment.loss)
        if self.base_strategy == 'all':
            return 1.0
        if not segment.trainable:
            return 0.0
        if self.base_strategy == 'last_round':
            return 1.0 if segment.message_index == last_assistant else 0.0
        return 1.0

    def apply(self, segments: list[Segment]) -> list[tuple[str, float]]:
        trainable = [s.message_index for s in segments if s.trainable]
        last = trainable[-1] if trainable else None
        out: list[tuple[str, float]] = []
        for seg in segments:
            weight = self.base_weight(seg, last)
            if weight == 0.0 or not seg.text:
                out.append((seg.text, 0.0))
                continue
            parts, weights = self.get_loss_scale(seg.text, segment=seg, is_last_round=seg.message_index == last)
            if ''.join(parts) != seg.text:
                raise ValueError(f'{type(self).__name__}.get_loss_scale must return parts that join to its input')
            out += [(p, weight * w) for p, w in zip(parts, weights)]
        return out


loss_scales: dict[str, type[LossScale]] = {}
