"""Training callbacks (``--callbacks``, ``--report_to``); see :mod:`.base` for the hook contract.

Built-ins: ``print``, ``jsonl``, ``loss_curve`` (always on), ``tensorboard``, ``wandb``, ``swanlab``.
"""
from .base import (DEFAULT_CALLBACKS, REPORTERS, Callback, MissingReporterError, UnknownCallbackError,
                   build_callbacks, call_hook, callbacks, register_callback)
from .builtin import JsonlCallback, LossCurveCallback, PrintCallback
from .reporters import SwanlabCallback, TensorBoardCallback, WandbCallback

__all__ = ['Callback', 'callbacks', 'register_callback', 'build_callbacks', 'call_hook', 'DEFAULT_CALLBACKS',
           'REPORTERS', 'UnknownCallbackError', 'MissingReporterError', 'PrintCallback', 'JsonlCallback',
           'LossCurveCallback', 'TensorBoardCallback', 'WandbCallback', 'SwanlabCallback']
