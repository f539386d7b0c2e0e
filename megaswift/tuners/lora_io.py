"""LoRA adapters out of (and into) TP/PP-sharded megatron-core models; PEFT-format export.

``lora_state_dict`` gathers every adapter tensor to global rank 0 as a full (unsharded) tensor,
keyed by its *global* megatron-core name (``decoder.layers.3.self_attention.linear_qkv.lora_B.weight``),
so the dict is the same at every TP/PP layout. ``load_lora_state_dict`` is its inverse.

``export_peft_adapter`` writes what ``peft.PeftModel.from_pretrained(hf_model, dir)`` loads: the
fused ``linear_qkv`` adapter becomes q/k/v adapters that share A (duplicated) and split B with the
inverse of the per-KV-group interleave (``weights.split_qkv``); ``linear_fc1`` becomes gate/up
(B halves of ``[gate; up]``). ``delta_W = (lora_alpha / r) * B @ A`` per HF module, as in PEFT.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from megaswift.megatron.build import unwrap_model
from megaswift.megatron.parallel import ParallelContext
from megaswift.megatron.weights import shard, split_qkv, unshard
from megaswift.tuners.lora import LoraError, lora_modules

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PEFT_PREFIX = 'base_model.model.'


def _gather_tp(t: torch.Tensor, mode, group, size: int) -> torch.Tensor:
    if size == 1 or mode is None:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return unshard(parts, mode)


def _sort_key(name: str):
    parts = name.split('.')
    layer = int(parts[2]) if name.startswith('decoder.layers.') else -1
    module = next((k for k, t in enumerate(('linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2')) if t in parts), 9)
    return layer, module, name


@torch.no_grad()
def lora_state_dict(models, *, value=None, parallel: Optional[ParallelContext] = None) -> dict:
    """Full adapter tensors on global rank 0 ({} elsewhere); every rank must call it.

    ``value``: param -> tensor to collect instead of the weight (e.g. ``lambda p: p.grad``).
    ``parallel``: the layout the models were built at (default: ``ParallelContext.from_megatron()``).
    """
    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    group, tp_size = parallel.tp_group, parallel.tp_size
    keep = parallel.tp_rank == 0 and torch.distributed.get_rank(parallel.dp_cp_group) == 0
    local = {}
    for gname, module, _ in lora_modules(models):
        for key, mode in module.lora_modes().items():
            param = getattr(module, key.split('.')[0]).weight
            t = param if value is None else value(param)
            if t is None:
                raise LoraError(f'{gname}.{key}: nothing to collect (no gradient?)')
            full = _gather_tp(t.detach(), mode, group, tp_size)
            if keep:
                local[f'{gname}.{key}'] = full.to('cpu', copy=True)
    if parallel.world_size == 1:
        return dict(sorted(local.items(), key=lambda kv: _sort_key(kv[0])))
    gathered = [None] * parallel.world_size if parallel.rank == 0 else None
    torch.distributed.gather_object(local, gathered, dst=0)
    if gathered is None:
        return {}
    merged = {k: v for part in gathered for k, v in part.items()}
    return dict(sorted(merged.items(), key=lambda kv: _sort_key(kv[0])))


@torch.no_grad()
def load_lora_state_dict(models, state_dict: dict, *, parallel: Optional[ParallelContext] = None) -> None:
    """Copy this rank's shard of each full adapter tensor in ``state_dict`` (as ``lora_state_dict``
    returns it, given to every rank) into ``models``. Missing keys or wrong shapes raise ``LoraError``."""
    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    tp_rank, tp_size = parallel.tp_rank, parallel.tp_size
    missing = []
    for gname, module, _ in lora_modules(models):
        for key, mode in module.lora_modes().items():
            name = f'{gname}.{key}'
            if name not in state_dict:
                missing.append(name)
                continue
            param = getattr(module, key.split('.')[0]).weight
            local = shard(state_dict[name].to(param.device), mode, tp_rank, tp_size)
            if tuple(local.shape) != tuple(param.shape):
                raise LoraError(f'{name}: full tensor {tuple(state_dict[name].shape)} gives a shard of '
                                f'{tuple(local.shape)} at TP={tp_size}, the parameter is {tuple(param.shape)}')
            param.copy_(local.to(param.dtype))
    if missing:
        raise LoraError(f'{len(missing)} LoRA tensors missing from the state dict, e.g. {missing[:3]}')


def to_peft_tensors(state_dict: dict, model) -> tuple:
    """(PEFT-named tensors, sorted HF target module names) from a ``lora_state_dict`` result."""
    info = unwrap_model(model).megaswift_info
    ctx, wmap = info.weight_context(), info.family.weight_map(info.hf_config)
    tensors, targets = {}, set()
    for name, t in state_dict.items():
        module_name, leaf = name.rsplit('.lora_', 1)  # leaf: 'A.weight' | 'B.weight'
        rule, layer = wmap.match(module_name + '.weight')
        if rule is None:
            raise LoraError(f'no weight rule maps {module_name!r}')
        hf_modules = [n.rsplit('.', 1)[0] for n in rule.hf_names(layer)]
        if leaf.startswith('A') or rule.transform == 'copy':
            parts = [t] * len(hf_modules)
        elif rule.transform == 'qkv':
            parts = split_qkv(t, ctx)
        else:  # gate_up: B is [gate; up]
            parts = torch.chunk(t, 2, dim=0)
        for hf_module, part in zip(hf_modules, parts):
            tensors[f'{PEFT_PREFIX}{hf_module}.lora_{leaf}'] = part.contiguous().clone()
            targets.add(hf_module.rsplit('.', 1)[-1])
    return tensors, sorted(targets)


def export_peft_adapter(models, output_dir, hf_config=None, *, parallel: Optional[ParallelContext] = None) -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format, HF names) to
    ``output_dir`` on global rank 0; every rank must call it. Returns the directory."""
    from safetensors.torch import save_file
    first = unwrap_model(models[0])
    config = getattr(first, 'megaswift_lora', None)
    if config is None:
        raise LoraError('export_peft_adapter: the models have no LoRA adapters (prepare_model with tuner_type lora)')
    hf_config = hf_config if hf_config is not None else first.megaswift_info.hf_config
    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    sd = lora_state_dict(models, parallel=parallel)
    out = Path(output_dir)
    if parallel.rank == 0:
        tensors, targets = to_peft_tensors(sd, first)
        out.mkdir(parents=True, exist_ok=True)
        adapter_config = {
            'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': config.rank, 'lora_alpha': config.alpha,
            'lora_dropout': config.dropout, 'target_modules': targets, 'bias': 'none', 'fan_in_fan_out': False,
            'use_rslora': False, 'use_dora': False, 'init_lora_weights': True, 'inference_mode': True,
            'modules_to_save': None, 'layers_to_transform': None, 'layers_pattern': None, 'rank_pattern': {},
            'alpha_pattern': {}, 'revision': None,
            'base_model_name_or_path': getattr(hf_config, '_name_or_path', None) or None,
        }
        tmp = out / (ADAPTER_WEIGHTS + '.tmp')
        save_file(tensors, str(tmp), metadata={'format': 'pt'})
        os.replace(tmp, out / ADAPTER_WEIGHTS)
        (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + '\n')
    if parallel.world_size > 1:
        torch.distributed.barrier()
    return str(out)
