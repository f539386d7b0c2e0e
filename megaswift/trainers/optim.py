"""Optimizers and learning-rate schedules on megatron-core's ``get_megatron_optimizer`` / ``OptimizerParamScheduler``.

``optimizers`` maps a name to a function ``(args, dtype) -> OptimizerConfig``; ``param_group_hooks`` is a list of
functions ``(args, config) -> {ParamKey: ParamGroupOverride}`` whose overrides are merged into megatron-core's
parameter groups (the built-in ones: no weight decay on biases and 1-D parameters, ``--embedding_lr`` for the
embedding and output layer). Register your own with ``optimizers['name'] = fn`` or
``param_group_hooks.append(fn)`` from an ``--external_plugins`` file. Nothing here imports megatron-core
until an optimizer is built, so the arguments can check ``--optimizer`` against the registry cheaply.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ..utils.registry import Registry

logger = logging.getLogger(__name__)


def _common(args, dtype: torch.dtype) -> dict:
    out = dict(lr=float(args.lr), min_lr=float(args.min_lr), weight_decay=float(args.weight_decay),
               clip_grad=float(args.clip_grad), bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
               params_dtype=dtype, use_distributed_optimizer=bool(args.use_distributed_optimizer))
    if dtype == torch.float16:
        out['initial_loss_scale'] = 2.0 ** 16  # megatron-core's 2**32 skips ~30 steps before the first update
    return out


def adamw(args, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig
    return OptimizerConfig(optimizer='adam', adam_beta1=float(args.adam_beta1), adam_beta2=float(args.adam_beta2),
                           adam_eps=float(args.adam_eps), decoupled_weight_decay=True, **_common(args, dtype))


def sgd(args, dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig
    return OptimizerConfig(optimizer='sgd', sgd_momentum=float(args.sgd_momentum), **_common(args, dtype))


optimizers = Registry('optimizer', {'adamw': adamw, 'adam': adamw, 'sgd': sgd})


def no_decay_overrides(args, config) -> dict:
    """Megatron's default: biases and 1-D parameters (norms) get no weight decay."""
    from megatron.core.optimizer import ParamKey, ParamPredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride
    one_d = ParamPredicate(name='param_len_1', fn=lambda p: p.dim() == 1)
    return {ParamKey(name='*.bias', predicate=one_d): ParamGroupOverride(wd_mult=0.0)}


def embedding_lr_overrides(args, config) -> dict:
    """``--embedding_lr``: its own peak lr (same schedule shape, decaying to --min_lr) for embedding/output."""
    if getattr(args, 'embedding_lr', None) is None:
        return {}
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride
    lr = float(args.embedding_lr)
    return {ParamKey(attr='is_embedding_or_output_parameter'):
            ParamGroupOverride(max_lr=lr, min_lr=min(float(args.min_lr), lr))}


param_group_hooks: list[Callable] = [no_decay_overrides, embedding_lr_overrides]


def param_group_overrides(args, config) -> dict:
    out: dict = {}
    for hook in param_group_hooks:
        for key, override in (hook(args, config) or {}).items():
            out[key] = {**out.get(key, {}), **override}
    return out


def build_optimizer(args, ddp_models: list, dtype: torch.dtype):
    """megatron-core's optimizer (distributed with --use_distributed_optimizer) over the DDP-wrapped chunks."""
    from megatron.core.optimizer import get_megatron_optimizer
    config = optimizers.lookup(args.optimizer, '--optimizer')(args, dtype)
    return get_megatron_optimizer(config, ddp_models, config_overrides=param_group_overrides(args, config))


def warmup_steps(args, max_steps: int) -> int:
    steps = int(args.warmup_steps) if args.warmup_steps else int(math.floor(float(args.warmup_ratio) * max_steps))
    return steps


def build_scheduler(args, optimizer, max_steps: int):
    """Linear warmup from 0 to --lr over the warmup steps, then cosine / linear decay to --min_lr or constant."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    warmup = warmup_steps(args, max_steps)
    # megatron-core needs warmup < decay steps; a one-step run without warmup decays over that one step
    decay = max(int(max_steps), warmup + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else float(args.lr), max_lr=float(args.lr), min_lr=float(args.min_lr),
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=float(args.weight_decay), end_wd=float(args.weight_decay), wd_incr_steps=decay,
        wd_incr_style='constant', use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def current_lr(optimizer) -> float:
    """The lr of the default parameter group (what Megatron logs)."""
    groups = optimizer.param_groups
    for g in groups:
        if g.get('default_config', False):
            return float(g['lr'])
    return float(groups[0]['lr']) if groups else 0.0
