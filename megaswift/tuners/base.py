"""Tuners: which parameters of the megatron-core models train (``--tuner_type full | lora | freeze``).

    models = build_model(hf_config); load_hf_weights(models, hf_dir)
    models = prepare_model(models, args)          # before DDP and the optimizer
    # ... train; then for LoRA: export_peft_adapter(models, out_dir) or merge_lora(models)

``args`` is any object with these attributes (missing ones take the defaults in brackets):
``tuner_type`` ['full'], ``lora_rank`` [8], ``lora_alpha`` [32], ``lora_dropout`` [0.05],
``target_modules`` [['all-linear']], ``freeze_parameters`` / ``trainable_parameters`` [[]] (name
prefixes) and ``freeze_parameters_regex`` / ``trainable_parameters_regex`` [None].

Parameter patterns use megatron-core names with the *global* layer index
(``decoder.layers.3.mlp``, ``embedding``, ``output_layer``, ``decoder.final_layernorm``), the same
at every pipeline layout. A prefix matches whole name components (``decoder.layers.1`` does not
match layer 10). ``trainable_parameters`` wins over ``freeze_parameters``.

- ``full``: everything trains, minus ``freeze_parameters``.
- ``freeze``: ``freeze_parameters`` frozen, the rest trains; with only ``trainable_parameters``
  given, only those train.
- ``lora``: the base model is frozen; the adapters (and ``trainable_parameters``, if any) train.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterable

import torch

from megaswift.megatron.build import unwrap_model
from megaswift.megatron.parallel import ParallelContext
from megaswift.utils.errors import UserError
from megaswift.utils.registry import Registry, UnknownPluginError

logger = logging.getLogger(__name__)


class TunerError(UserError, ValueError):
    """A bad tuner argument; the message names the flag."""


def _list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def named_parameters(models) -> Iterable[tuple]:
    """(global mcore name, param) over ``models``; a tied output layer copy answers to the embedding's name."""
    from megaswift.megatron.convert import global_name, layer_offsets
    for model in models:
        model = unwrap_model(model)
        offsets = layer_offsets(model)
        for name, param in model.named_parameters():
            if name == 'output_layer.weight' and getattr(param, 'shared_embedding', False):
                name = 'embedding.word_embeddings.weight'
            yield global_name(name, offsets), param


def _matcher(prefixes, regex, flag: str) -> Callable[[str], bool] | None:
    prefixes = [p.rstrip('.') for p in _list(prefixes) if p]
    pattern = None
    if regex:
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise TunerError(f'--{flag}_regex: invalid regular expression {regex!r}: {e}') from None
    if not prefixes and pattern is None:
        return None
    return lambda n: any(n == p or n.startswith(p + '.') for p in prefixes) or bool(pattern and pattern.search(n))


def _set_trainable(models, trainable: Callable[[str], bool]) -> None:
    for name, param in named_parameters(models):
        param.requires_grad_(bool(trainable(name)))


def _patterns(args):
    freeze = _matcher(getattr(args, 'freeze_parameters', None), getattr(args, 'freeze_parameters_regex', None),
                      'freeze_parameters')
    train = _matcher(getattr(args, 'trainable_parameters', None),
                     getattr(args, 'trainable_parameters_regex', None), 'trainable_parameters')
    return freeze, train


def _check_matched(models, matcher, flag: str, parallel: ParallelContext) -> None:
    if matcher is not None and not any(matcher(n) for n, _ in named_parameters(models)):
        if parallel.pp_size == 1:  # else another stage may hold them
            raise TunerError(f'--{flag} matches no parameter (names look like decoder.layers.0.mlp.linear_fc1.weight, '
                             'embedding.word_embeddings.weight, output_layer.weight)')


def prepare_full(models, args, parallel: ParallelContext):
    freeze, train = _patterns(args)
    _check_matched(models, freeze, 'freeze_parameters', parallel)
    _set_trainable(models, lambda n: not (freeze and freeze(n)) or bool(train and train(n)))
    return models


def prepare_freeze(models, args, parallel: ParallelContext):
    freeze, train = _patterns(args)
    if freeze is None and train is None:
        raise TunerError('--tuner_type freeze needs --freeze_parameters (or --trainable_parameters) to say what to freeze')
    _check_matched(models, freeze, 'freeze_parameters', parallel)
    _check_matched(models, train, 'trainable_parameters', parallel)
    if freeze is None:
        _set_trainable(models, train)
    else:
        _set_trainable(models, lambda n: not freeze(n) or bool(train and train(n)))
    _make_inputs_require_grad(models)
    return models


def lora_config(args):
    from megaswift.tuners.lora import HF_TARGETS, LoraConfig, LoraError, resolve_target_modules
    try:
        cfg = LoraConfig(rank=int(getattr(args, 'lora_rank', 8)), alpha=float(getattr(args, 'lora_alpha', 32)),
                         dropout=float(getattr(args, 'lora_dropout', 0.05)),
                         target_modules=resolve_target_modules(getattr(args, 'target_modules', None)))
    except LoraError as e:
        raise TunerError(str(e)) from None
    hf = set(_list(getattr(args, 'target_modules', None))) & set(HF_TARGETS)
    for fused, parts in (('linear_qkv', ('q_proj', 'k_proj', 'v_proj')), ('linear_fc1', ('gate_proj', 'up_proj'))):
        if hf & set(parts) and not set(parts) <= hf:
            logger.warning('--target_modules %s: megatron-core fuses %s into %s, so the LoRA adapter covers all '
                           'of them (and the exported PEFT adapter lists all of them)', ','.join(sorted(hf & set(parts))),
                           '/'.join(parts), fused)
    if cfg.rank < 1:
        raise TunerError(f'--lora_rank must be >= 1, got {cfg.rank}')
    if not 0 <= cfg.dropout < 1:
        raise TunerError(f'--lora_dropout must be in [0, 1), got {cfg.dropout}')
    return cfg


def prepare_lora(models, args, parallel: ParallelContext):
    from megaswift.tuners.lora import add_lora
    cfg = lora_config(args)
    _, train = _patterns(args)
    _check_matched(models, train, 'trainable_parameters', parallel)
    add_lora(models, cfg, parallel=parallel)
    _set_trainable(models, lambda n: '.lora_A.' in n or '.lora_B.' in n or bool(train and train(n)))
    _make_inputs_require_grad(models)
    return models


def _make_inputs_require_grad(models) -> None:
    """With a frozen embedding, activation recomputation (an autograd.Function over the layer inputs)
    would give the trainable layers no gradient; make the embedding output require grad."""
    def hook(module, inputs, output):
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return output

    for model in models:
        model = unwrap_model(model)
        embedding = getattr(model, 'embedding', None) if getattr(model, 'pre_process', False) else None
        if embedding is None or getattr(embedding, '_megaswift_grad_hook', None) is not None:
            continue
        if not any(p.requires_grad for p in embedding.parameters()):
            embedding._megaswift_grad_hook = embedding.register_forward_hook(hook)


tuners = Registry('tuner', {'full': prepare_full, 'lora': prepare_lora, 'freeze': prepare_freeze})


def prepare_model(models, args, *, parallel: ParallelContext | None = None):
    """Apply ``args.tuner_type`` to ``models`` (one per virtual pipeline stage) in place; returns them.
    ``parallel``: the layout the models were built at (default: ``ParallelContext.from_megatron()``)."""
    tuner_type = getattr(args, 'tuner_type', None) or 'full'
    try:
        prepare = tuners.lookup(tuner_type, '--tuner_type')
    except UnknownPluginError as e:
        raise TunerError(str(e)) from None
    models = prepare(models, args, parallel if parallel is not None else ParallelContext.from_megatron())
    n_train, n_total = trainable_parameters(models)
    logger.info('tuner %s: %s of %s parameters train on this rank (%.4f%%)', tuner_type, f'{n_train:,}',
                f'{n_total:,}', 100.0 * n_train / max(n_total, 1))
    return models


def trainable_parameters(models) -> tuple:
    """(trainable, total) parameter counts held by this rank."""
    params = [p for _, p in named_parameters(models)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
