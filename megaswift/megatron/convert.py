"""Stream HF safetensors into megatron-core models, and megatron-core weights back out as HF tensors.

Both directions go one tensor at a time, so memory stays at "this rank's model shard + one full
tensor": loading reads only the tensors (and, for plain row/column shards, only the slices) this
rank needs through ``safetensors.safe_open``; exporting gathers one tensor across TP, hands it to
global rank 0 and lets it go before the next.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch

from megaswift.megatron.build import unwrap_model
from megaswift.megatron.heads import has_value_head, value_head_rule
from megaswift.megatron.parallel import ParallelContext
from megaswift.megatron.weights import copy_slice, expected_hf_shapes, full_shape, shard, to_hf, to_mcore, unshard

SAFE_INDEX = 'model.safetensors.index.json'
SAFE_SINGLE = 'model.safetensors'


class WeightLoadError(ValueError):
    pass


class HFCheckpoint:
    """Lazy access to the tensors of an HF safetensors checkpoint (sharded with an index, or single)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = str(hf_dir)
        index = os.path.join(self.hf_dir, SAFE_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.weight_map = dict(json.load(f)['weight_map'])
        elif os.path.isfile(os.path.join(self.hf_dir, SAFE_SINGLE)):
            from safetensors import safe_open
            with safe_open(os.path.join(self.hf_dir, SAFE_SINGLE), framework='pt') as f:
                self.weight_map = {k: SAFE_SINGLE for k in f.keys()}
        else:
            raise WeightLoadError(f'no {SAFE_INDEX} or {SAFE_SINGLE} in {self.hf_dir} (only safetensors '
                                  'checkpoints are supported)')
        self._handles = {}

    def _handle(self, name: str, needed_by: str):
        if name not in self.weight_map:
            raise WeightLoadError(f'HF checkpoint {self.hf_dir} has no tensor {name!r} '
                                  f'(needed for megatron-core parameter {needed_by!r})')
        file = self.weight_map[name]
        if file not in self._handles:
            path = os.path.join(self.hf_dir, file)
            if not os.path.isfile(path):
                raise WeightLoadError(f'shard file {file!r} (holding {name!r}, listed in {SAFE_INDEX}) is '
                                      f'missing from {self.hf_dir}')
            from safetensors import safe_open
            self._handles[file] = safe_open(path, framework='pt')
        return self._handles[file]

    def shape(self, name: str, needed_by: str) -> tuple:
        return tuple(self._handle(name, needed_by).get_slice(name).get_shape())

    def read(self, name: str, needed_by: str, sl=None) -> torch.Tensor:
        """The tensor, or only ``sl = (dim, start, stop)`` of it (clipped to its size)."""
        handle = self._handle(name, needed_by)
        if sl is None:
            return handle.get_tensor(name)
        dim, start, stop = sl
        view = handle.get_slice(name)
        size = view.get_shape()[dim]
        start, stop = min(start, size), min(stop, size)
        if start == stop:  # e.g. a TP rank holding only vocab padding
            return (view[0:1][:0] if dim == 0 else view[:, 0:1][:, :0])
        return view[start:stop] if dim == 0 else view[:, start:stop]

    def close(self):
        self._handles.clear()


def layer_offsets(model) -> dict:
    """local layer index -> global layer index for a GPTModel chunk."""
    return {k: layer.layer_number - 1 for k, layer in enumerate(model.decoder.layers)}


def global_name(name: str, offsets: dict) -> str:
    """``decoder.layers.{local}.x`` -> ``decoder.layers.{global}.x`` (names are per pipeline stage)."""
    prefix = 'decoder.layers.'
    if name.startswith(prefix):
        local, rest = name[len(prefix):].split('.', 1)
        return f'{prefix}{offsets[int(local)]}.{rest}'
    return name


def _model_tensors(model, lora: Optional[str] = None):
    """(global mcore name, tensor) for every parameter of a chunk (tied weights once).

    ``lora`` (a model with LoRA adapters): 'merged' gives every adapted base weight as ``W + scaling * B @ A``
    (this rank's shard; the model is not changed) and leaves the adapters out; 'adapted' gives those merged
    weights only (what changes in LoRA training)."""
    offsets = layer_offsets(model)
    adapted = {}
    if lora is not None:
        adapted = {id(m.weight): m for m in model.modules() if hasattr(m, 'lora_merged_weight')}
    for name, param in model.named_parameters():
        if lora is not None and ('.lora_A.' in name or '.lora_B.' in name):
            continue
        module = adapted.get(id(param))
        if module is not None:
            yield global_name(name, offsets), module.lora_merged_weight()
        elif lora != 'adapted':
            yield global_name(name, offsets), param


@torch.no_grad()
def load_hf_weights(models, hf_dir: str, *, parallel: Optional[ParallelContext] = None) -> None:
    """Fill this rank's TP/PP shard of every parameter of ``models`` from the HF checkpoint in ``hf_dir``.

    ``parallel``: the layout the models were built at (default: ``ParallelContext.from_megatron()``).
    Raises ``WeightLoadError`` naming the tensor for a missing tensor, a missing shard file, a shape
    mismatch (expected vs found) or a parameter no rule maps.
    """
    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    tp_rank, tp_size = parallel.tp_rank, parallel.tp_size
    ckpt = HFCheckpoint(hf_dir)
    try:
        for name, param, rule, layer, ctx in _mapped_tensors(models):
            _load_one(ckpt, rule, layer, name, param, ctx, tp_rank, tp_size)
    finally:
        ckpt.close()


def _mapped_tensors(models, lora: Optional[str] = None):
    """(mcore name, tensor, weight rule, global layer, weight context) for every tensor of this rank's models
    (``lora`` as in ``_model_tensors``)."""
    for model in models:
        model = unwrap_model(model)
        info = model.megaswift_info
        ctx = info.weight_context()
        wmap = info.family.weight_map(info.hf_config)
        value_head = has_value_head(model)
        for name, param in _model_tensors(model, lora):
            rule, layer = wmap.match(name)
            if value_head and name == 'output_layer.weight':
                rule = value_head_rule()
            if rule is None:
                raise WeightLoadError(f'no weight rule of family {info.family.model_type!r} maps megatron-core '
                                      f'parameter {name!r}')
            yield name, param, rule, layer, ctx


def _load_one(ckpt, rule, layer, name, param, ctx, tp_rank, tp_size):
    full = full_shape(rule.tp, param.shape, tp_size)
    hf_names = rule.hf_names(layer)
    for hf_name, want in zip(hf_names, expected_hf_shapes(rule, full, ctx)):
        found = ckpt.shape(hf_name, name)
        if found != tuple(want):
            raise WeightLoadError(f'shape mismatch for HF tensor {hf_name!r} (-> megatron-core {name!r}): expected '
                                  f'{tuple(want)}, found {found} in {ckpt.hf_dir}')
    sl = copy_slice(rule, full, tp_rank, tp_size)
    if sl is not None:  # read only this rank's rows/columns
        local = ckpt.read(hf_names[0], name, sl)
        if rule.tp == 'vocab' and local.shape[0] < param.shape[0]:
            local = torch.cat([local, local.new_zeros(param.shape[0] - local.shape[0], *local.shape[1:])])
    else:
        tensors = [ckpt.read(n, name) for n in hf_names]
        local = shard(to_mcore(rule, tensors, ctx), rule.tp, tp_rank, tp_size)
        del tensors
    if tuple(local.shape) != tuple(param.shape):
        raise WeightLoadError(f'{name!r}: converted shard has shape {tuple(local.shape)}, the parameter '
                              f'{tuple(param.shape)}')
    param.data.copy_(local.to(dtype=param.dtype))


def _owned_units(models, lora: Optional[str] = None):
    """unit -> [(rule, global layer or None, param, ctx)] for this rank; units: "embedding", layer ints, "final"."""
    units = {}
    for name, param, rule, layer, ctx in _mapped_tensors(models, lora):
        if not rule.export:
            continue
        unit = layer if layer is not None else ('embedding' if name.startswith('embedding.') else 'final')
        units.setdefault(unit, []).append((rule, layer, param, ctx))
    info = unwrap_model(models[0]).megaswift_info
    return units, info.family.weight_map(info.hf_config), info.hf_config.num_hidden_layers


@torch.no_grad()
def iter_hf_weights(models, *, parallel: Optional[ParallelContext] = None,
                    adapted_only: bool = False) -> Iterator[tuple]:
    """Yield ``(hf_name, full CPU tensor)`` in HF order on global rank 0; other ranks yield nothing.

    Every rank must run the iterator to the end: the TP gathers and the pipeline-stage -> rank 0
    transfers happen inside, one layer at a time. ``parallel`` as in ``load_hf_weights``. A model with LoRA
    adapters yields its adapted weights merged (``W + scaling * B @ A``, as ``merge_lora``; the model is not
    changed); ``adapted_only``: only those (a rollout engine that holds the base weights needs nothing else).
    """
    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    dist = torch.distributed
    tp_group, pp_group = parallel.tp_group, parallel.pp_group
    tp_rank, tp_size, pp_rank, rank = parallel.tp_rank, parallel.tp_size, parallel.pp_rank, parallel.rank
    units, wmap, num_layers = _owned_units(models, 'adapted' if adapted_only else 'merged')
    owned = [None] * parallel.pp_size
    dist.all_gather_object(owned, sorted(units, key=str), group=pp_group)
    owner = {u: stage for stage, us in enumerate(owned) for u in us}
    pp_ranks = dist.get_process_group_ranks(pp_group)
    device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')
    for unit in ['embedding', *range(num_layers), 'final']:
        if unit not in owner:
            if adapted_only:  # nothing adapted in it
                continue
            raise WeightLoadError(f'no pipeline stage holds {unit!r}')
        stage = owner[unit]
        tensors = {}
        if stage == pp_rank and parallel.dp_rank == 0:
            for rule, layer, param, ctx in units[unit]:
                full = _gather_tp(param.detach(), rule.tp, tp_group, tp_size)
                for hf_name, t in zip(rule.hf_names(layer), to_hf(rule, full, ctx)):
                    tensors[hf_name] = t
            if tp_rank == 0 and rank != 0:
                meta = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
                dist.send_object_list([meta], dst=0)
                for t in tensors.values():
                    dist.send(t.contiguous().to(device), dst=0)
                tensors = {}
        elif rank == 0:
            src = pp_ranks[stage]
            box = [None]
            dist.recv_object_list(box, src=src)
            for n, shape, dtype in box[0]:
                buf = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(buf, src=src)
                tensors[n] = buf
        if rank == 0:
            for n in sorted(tensors, key=wmap.hf_sort_key):
                yield n, tensors[n].detach().to('cpu', copy=True)
        del tensors


def _gather_tp(local: torch.Tensor, mode: Optional[str], tp_group, tp_size: int) -> torch.Tensor:
    if tp_size == 1 or mode is None or (mode == 'row' and local.dim() == 1):
        return local
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=tp_group)
    return unshard(parts, mode)


def hf_state_dict(models, *, parallel: Optional[ParallelContext] = None) -> dict:
    """All of ``iter_hf_weights`` as a dict (rank 0; empty elsewhere). Small models / tests only."""
    return dict(iter_hf_weights(models, parallel=parallel))
