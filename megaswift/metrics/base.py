"""Megatron-style evaluation metrics: states accumulated per rank, reduced across data parallel.

A metric declares its states with :meth:`Metric.add_state`, accumulates them in ``update(**kw)``
and turns them into numbers in ``_compute()``. :meth:`Metric.compute` first reduces every state
across ``group`` (pass the data-parallel group; the default group when None) when
torch.distributed is initialised, then calls ``_compute`` on the reduced values. Local states are
left untouched, so ``compute`` may be called more than once. ``compute`` is a collective: every
rank of ``group`` must call it.

State reductions: ``'sum' | 'mean' | 'max' | 'min'`` for tensors (all_reduce), ``'cat'`` for
Python lists (all_gather_object, concatenated in rank order).

Plugins register a subclass with ``metrics['name'] = MyMetric`` (or ``@register_metric('name')``)
and select it with ``--eval_metric name``; an HF ``compute_metrics(EvalPrediction)`` function is
registered with :func:`megaswift.metrics.register_hf_metric`.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from ..utils.registry import Registry, UnknownPluginError

_TENSOR_REDUCTIONS = ('sum', 'mean', 'max', 'min')


class Metric:
    """Base class. Subclasses call ``add_state`` in ``__init__`` and implement ``update`` and ``_compute``.

    ``inputs`` names the keyword arguments ``update`` takes, so that a trainer can call
    ``metric.update_from(outputs)`` with whatever it has at hand.
    """

    inputs: tuple[str, ...] = ()
    #: returned by :meth:`safe_div` for an empty denominator (ms-swift's ``nan_value``)
    nan_value: float = 0.0

    def __init__(self):
        self._defaults: dict[str, Any] = {}
        self._reductions: dict[str, str] = {}

    def add_state(self, name: str, default: torch.Tensor | list, reduction: str = 'sum') -> None:
        """Declare a state, set it to (a copy of) ``default``; ``reset`` restores it."""
        if isinstance(default, list):
            if reduction != 'cat':
                raise ValueError(f"state '{name}': a list state needs reduction='cat', got {reduction!r}")
        elif isinstance(default, torch.Tensor):
            if reduction not in _TENSOR_REDUCTIONS:
                raise ValueError(f"state '{name}': reduction must be one of {_TENSOR_REDUCTIONS}, got {reduction!r}")
        else:
            raise TypeError(f"state '{name}': default must be a torch.Tensor or a list, got {type(default).__name__}")
        if not hasattr(self, '_defaults'):
            Metric.__init__(self)
        self._defaults[name] = default
        self._reductions[name] = reduction
        setattr(self, name, _fresh(default))

    def update(self, **kwargs: Any) -> None:
        raise NotImplementedError

    def update_from(self, outputs: dict[str, Any]) -> None:
        """``update(**{k: outputs[k] for k in self.inputs})``; a missing input raises KeyError naming it."""
        missing = [k for k in self.inputs if k not in outputs]
        if missing:
            raise KeyError(f'{type(self).__name__} needs {missing} (has {sorted(outputs)})')
        self.update(**{k: outputs[k] for k in self.inputs})

    def _compute(self) -> dict[str, float]:
        raise NotImplementedError

    def compute(self, group=None) -> dict[str, float]:
        """Reduce the states across ``group`` (when torch.distributed is initialised), then compute."""
        local = {name: getattr(self, name) for name in self._defaults}
        reduced = self._reduced_states(group)
        try:
            for name, value in reduced.items():
                setattr(self, name, value)
            result = self._compute()
        finally:
            for name, value in local.items():
                setattr(self, name, value)
        return {key: _as_float(value) for key, value in result.items()}

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, _fresh(default))

    def safe_div(self, num: Any, den: Any) -> float:
        num, den = _as_float(num), _as_float(den)
        return num / den if den != 0 else float(self.nan_value)

    def accumulate(self, name: str, value: Any) -> None:
        """``state += value`` with the value cast to the state's dtype; the state follows the value's device."""
        state = getattr(self, name)
        value = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
        setattr(self, name, state.to(value.device) + value.to(state.dtype))

    def _reduced_states(self, group) -> dict[str, Any]:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return {}
        world = dist.get_world_size(group)
        if world == 1:
            return {}
        backend = dist.get_backend(group)
        out = {}
        for name, reduction in self._reductions.items():
            value = getattr(self, name)
            if reduction == 'cat':
                gathered: list = [None] * world
                dist.all_gather_object(gathered, list(value), group=group)
                out[name] = [item for part in gathered for item in part]
                continue
            device = value.device
            work = value.detach().clone()
            if reduction == 'mean' and not work.is_floating_point():
                work = work.double()
            if backend == 'nccl' and work.device.type != 'cuda':
                work = work.cuda()
            elif backend == 'gloo' and work.device.type == 'cuda':
                work = work.cpu()
            op = {'sum': dist.ReduceOp.SUM, 'mean': dist.ReduceOp.SUM,
                  'max': dist.ReduceOp.MAX, 'min': dist.ReduceOp.MIN}[reduction]
            dist.all_reduce(work, op=op, group=group)
            if reduction == 'mean':
                work = work / world
            out[name] = work.to(device)
        return out


def _fresh(default: Any) -> Any:
    return list(default) if isinstance(default, list) else default.detach().clone()


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item())
    return float(value)


metrics = Registry('metric')

#: Class decorator: ``@register_metric('name')`` stores the class as ``metrics['name']``.
register_metric = metrics.register

#: ``--eval_metric`` names that are not registered (the registry's error).
UnknownMetricError = UnknownPluginError


def build_metrics(names: list[str] | str | None, **kwargs: Any) -> dict[str, Metric]:
    """``{name: metrics[name](**accepted kwargs)}`` in the given order (``'a,b'`` strings are split).

    Each constructor receives only the ``kwargs`` its signature accepts (all of them when it takes
    ``**kwargs``). Unknown names raise :class:`UnknownMetricError` (a ValueError) with the closest match.
    """
    if isinstance(names, str):
        names = [names]
    flat = [n for item in names or [] for n in item.replace(',', ' ').split()]
    out: dict[str, Metric] = {}
    for name in flat:
        if name in out:
            continue
        cls = metrics.lookup(name, '--eval_metric')
        out[name] = cls(**_accepted(cls, kwargs))
    return out


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}
