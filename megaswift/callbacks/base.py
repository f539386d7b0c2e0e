"""Training callbacks: one base class, one registry, one builder.

The trainer calls every hook on every rank; a callback that writes files or prints checks
``trainer.is_main_process`` itself. What a hook may read from ``trainer``:

- ``trainer.args``: the training arguments (``output_dir``, ``logging_steps``, ``report_to``, ...);
- ``trainer.state``: ``global_step``, ``max_steps``, ``epoch``, ``log_history`` (list of dicts);
- ``trainer.is_main_process``: True on the one rank that writes files and prints.

``on_log`` receives the dict that was just logged (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_sec``, ``packing_efficiency``, ``memory_mb``, ``elapsed_s``, ``eval_*`` after an
evaluation, ``mfu`` on GPU). ``on_save`` receives the checkpoint directory that was just written.

Plugins register a subclass with ``callbacks['name'] = MyCallback`` (or ``@register_callback('name')``)
from an ``--external_plugins`` file and select it with ``--callbacks name``.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import sys
from typing import Any, Iterable

from ..utils.errors import UserError
from ..utils.registry import Registry, UnknownPluginError

logger = logging.getLogger(__name__)

#: Always built, in this order, before ``--callbacks`` and ``--report_to`` entries.
DEFAULT_CALLBACKS = ('print', 'jsonl', 'loss_curve')
#: ``--report_to`` values that name a reporter callback.
REPORTERS = ('tensorboard', 'wandb', 'swanlab')


class Callback:
    """No-op hooks; override the ones you need. The constructor receives the training arguments."""

    def __init__(self, args: Any):
        self.args = args

    def on_train_begin(self, trainer) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def on_step_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    def on_log(self, trainer, logs: dict) -> None:
        pass

    def on_eval_begin(self, trainer) -> None:
        pass

    def on_eval_end(self, trainer, metrics: dict) -> None:
        pass

    def on_save(self, trainer, checkpoint_dir: str) -> None:
        pass


callbacks = Registry('callback')


#: Class decorator: ``@register_callback('name')`` stores the class as ``callbacks['name']``.
register_callback = callbacks.register


#: ``--callbacks`` / ``--report_to`` names that are not registered (the registry's error).
UnknownCallbackError = UnknownPluginError


class MissingReporterError(UserError, ImportError):
    """A ``--report_to`` backend whose Python package is not installed."""


def package_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a ``None`` in sys.modules means no)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_package(module: str, pip_name: str, what: str) -> None:
    """Raise :class:`MissingReporterError` with an install hint when ``module`` is missing."""
    if not package_available(module):
        raise MissingReporterError(f"{what} needs the '{module}' package, which is not installed: "
                                   f'pip install {pip_name}')


def split_names(value: Any) -> list[str]:
    """``None`` / ``'a,b'`` / ``'a b'`` / ``['a', 'b,c']`` -> a flat list of names."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, str):
            out.extend(n for n in item.replace(',', ' ').split() if n)
        else:
            out.append(item)
    return out


def _report_to_names(args: Any) -> list[str]:
    names = split_names(getattr(args, 'report_to', None))
    if 'none' in names:
        return []
    if 'all' in names:  # every reporter whose package is installed (as in HF transformers)
        installed = {'tensorboard': 'tensorboard', 'wandb': 'wandb', 'swanlab': 'swanlab'}
        return [n for n in REPORTERS if package_available(installed[n])]
    for name in names:
        if name not in REPORTERS:
            raise UnknownPluginError('reporter', name, list(REPORTERS) + ['all', 'none'], '--report_to', hint='')
    return names


def build_callbacks(names: list[str] | str | None, args: Any) -> list[Callback]:
    """Instances for ``DEFAULT_CALLBACKS + names + args.report_to``, each name once, in that order.

    ``names`` may also hold :class:`Callback` subclasses or instances (programmatic use).
    Unknown names raise :class:`UnknownCallbackError` (a ValueError) with the closest match;
    a reporter whose package is missing raises :class:`MissingReporterError` with the pip command.
    Both are raised on every rank, before training starts.
    """
    requested = list(DEFAULT_CALLBACKS) + split_names(names) + _report_to_names(args)
    out: list[Callback] = []
    seen: set = set()
    for item in requested:
        key = item if isinstance(item, str) else (type(item) if isinstance(item, Callback) else item)
        if key in seen:
            continue
        seen.add(key)
        if isinstance(item, Callback):
            out.append(item)
        elif isinstance(item, type) and issubclass(item, Callback):
            out.append(item(args))
        else:
            out.append(callbacks.lookup(str(item), '--callbacks')(args))
    return out


def call_hook(cbs: Iterable[Callback], hook: str, trainer, *args: Any) -> None:
    """``getattr(cb, hook)(trainer, *args)`` for each callback, in order."""
    for cb in cbs:
        getattr(cb, hook)(trainer, *args)


def scalar(value: Any) -> Any:
    """A JSON-friendly Python value: 1-element tensors/arrays become numbers, others lists."""
    if hasattr(value, 'detach'):  # torch.Tensor
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, 'item') and getattr(value, 'size', 2) == 1:  # numpy scalar / 1-element array
        return value.item()
    if hasattr(value, 'tolist'):
        return value.tolist()
    return value


def numeric_items(logs: dict) -> dict[str, float]:
    """The finite-or-nan numeric entries of ``logs`` (bools and non-numbers dropped), as floats."""
    out = {}
    for key, value in logs.items():
        value = scalar(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isinf(value):
                out[key] = value
    return out
