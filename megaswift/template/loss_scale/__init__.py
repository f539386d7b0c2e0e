"""``loss_scales`` (name -> LossScale class) and ``get_loss_scale(spec)``.

``--loss_scale`` is ``[strategy+]name[+name...]``: an optional leading base strategy
(``default`` | ``last_round`` | ``all``; ``default`` when left out) and then registered names.
``'react'`` == ``'default+react'``; ``'last_round'`` == ``'last_round+base'``. Several names chain:
each splits the parts the previous one returned and the weights multiply
(``'default+hermes+ignore_empty_think'``). Plugins register more with
``loss_scales['mine'] = MyLossScale`` (a ``LossScale`` subclass, built as ``MyLossScale(strategy)``).

Built-in weights (ms-swift's configs, ``config/*.json``):
- ``react``: ``Action:``/``Action Input:`` [2, 2], ``Thought:``/``Final Answer:`` [1, 1], ``Observation:`` [2, 0]
  ([weight of the key, weight of the text after it up to the next key]);
- ``hermes``: each ``<tool_call>...</tool_call>`` block 2, other text 1;
- ``qwen``: ``✿FUNCTION✿:``/``✿ARGS✿:`` [2, 2], ``✿RESULT✿:`` [2, 0], ``✿RETURN✿:`` [1, 1];
- ``ignore_empty_think``: a turn's leading empty ``<think>\\s*</think>\\s*`` (or bare ``</think>\\s*``) 0.
"""
from __future__ import annotations

from ...utils.errors import UserError
from ...utils.registry import did_you_mean
from .base import BASE_STRATEGIES, ConcatLossScale, LossScale, loss_scales
from .config import (ConfigLossScale, HermesLossScale, IgnoreEmptyThinkLossScale, QwenLossScale, ReactLossScale)


class LossScaleSpecError(UserError, ValueError):
    """A ``--loss_scale`` value that names no strategy or registered loss scale."""


loss_scales.update({
    'base': LossScale,
    'ignore_empty_think': IgnoreEmptyThinkLossScale,
    'react': ReactLossScale,
    'hermes': HermesLossScale,
    'qwen': QwenLossScale,
})


def get_loss_scale(spec: str | LossScale) -> LossScale:
    """``'[strategy+]name[+name...]'`` -> a LossScale (a ``ConcatLossScale`` for several names)."""
    if isinstance(spec, LossScale):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise LossScaleSpecError(f'loss_scale must be a non-empty string like "default" or "last_round+react", '
                                 f'got {spec!r}')
    names = [n.strip() for n in spec.strip().split('+')]
    if '' in names:
        raise LossScaleSpecError(f"loss_scale '{spec}' has an empty name (write e.g. 'default+react')")
    strategy = 'default'
    if names[0] in BASE_STRATEGIES:
        strategy, names = names[0], names[1:]
    for name in names:
        if name in BASE_STRATEGIES:
            raise LossScaleSpecError(f"loss_scale '{spec}': '{name}' is a base strategy; give at most one, first "
                                     f"(e.g. '{name}+react')")
        if name not in loss_scales:
            choices = sorted(set(loss_scales) | set(BASE_STRATEGIES))
            raise LossScaleSpecError(f"unknown loss_scale '{name}' in '{spec}' (available: {', '.join(choices)})"
                                     f'{did_you_mean(name, choices)}')
    scales = [_build(name, strategy) for name in names or ['base']]
    if len(scales) == 1:
        return scales[0]
    return ConcatLossScale(scales, strategy, names)


def _build(name: str, strategy: str) -> LossScale:
    cls = loss_scales[name]
    if not (isinstance(cls, type) and issubclass(cls, LossScale)):
        raise TypeError(f"loss_scales['{name}'] must be a LossScale subclass, got {cls!r}")
    return cls(strategy)


__all__ = ['BASE_STRATEGIES', 'ConcatLossScale', 'ConfigLossScale', 'HermesLossScale', 'IgnoreEmptyThinkLossScale',
           'LossScale', 'LossScaleSpecError', 'QwenLossScale', 'ReactLossScale', 'get_loss_scale', 'loss_scales']
