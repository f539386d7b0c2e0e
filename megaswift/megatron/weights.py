"""Declarative HF <-> megatron-core weight maps, and the tensor maths they need.

A family's map is a tuple of ``WeightRule``s, one per megatron-core tensor, written in HF order::

    WeightRule('decoder.layers.{i}.self_attention.linear_qkv.weight',
               ('model.layers.{i}.self_attn.q_proj.weight', '...k_proj.weight', '...v_proj.weight'),
               transform='qkv', tp='col')

``{i}`` is the *global* layer index on both sides (megatron-core's own parameter names use the
index local to a pipeline stage; ``convert.py`` translates).

Transforms (HF tensors -> one full, unsharded megatron-core tensor):

- ``copy``: one tensor as is (``tp='vocab'`` also pads the vocab rows, see below).
- ``qkv``: q/k/v (weights or biases) fused in megatron-core's layout, grouped per KV head:
  ``[for each KV group g: the q heads of g, k head g, v head g]`` (rows of ``head_dim``).
- ``gate_up``: ``linear_fc1 = [gate; up]`` (SwiGLU).

TP sharding (``tp``), one slice per rank of the full tensor:

- ``None``: replicated (norms).
- ``col``: dim 0 (column-parallel). For ``qkv`` this *is* the per-group split, because the fused
  layout is group-major and the KV group count is divisible by TP (checked before building).
- ``gate_up``: each rank holds ``[gate rows of rank r; up rows of rank r]``; a plain dim-0 split
  of ``[gate; up]`` would be wrong.
- ``row``: dim 1 (row-parallel ``linear_proj`` / ``linear_fc2``).
- ``vocab``: dim 0 of the vocab rows, after padding the vocab to ``padded_vocab_size(...)``, a
  multiple of ``make_vocab_size_divisible_by * tp`` (Megatron-LM's rule). Padding rows are zeros
  and are stripped again on export.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
TRANSFORMS = ('copy', 'qkv', 'gate_up')
TP_MODES = (None, 'col', 'row', 'vocab', 'gate_up')


@dataclass(frozen=True)
class WeightRule:
    mcore: str
    hf: tuple
    transform: str = 'copy'
    tp: Optional[str] = None
    te_alias: Optional[str] = None  # the name of this tensor under the Transformer Engine spec
    export: bool = True  # False for a tensor that duplicates another on export (tied output layer)

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f'unknown transform {self.transform!r} in rule for {self.mcore}')
        if self.tp not in TP_MODES:
            raise ValueError(f'unknown tp mode {self.tp!r} in rule for {self.mcore}')
        n = {'copy': 1, 'qkv': 3, 'gate_up': 2}[self.transform]
        if len(self.hf) != n:
            raise ValueError(f'transform {self.transform!r} takes {n} HF tensors, got {self.hf}')

    @property
    def layered(self) -> bool:
        return '{i}' in self.mcore

    def hf_names(self, layer: Optional[int] = None) -> list:
        return [n.format(i=layer) for n in self.hf]


@dataclass(frozen=True)
class WeightContext:
    """What the transforms need to know about the model."""
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    multiple = max(1, divisible_by) * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _pattern(name: str) -> re.Pattern:
    return re.compile('^' + re.escape(name).replace(re.escape('{i}'), r'(\d+)') + '$')


class WeightMap:
    """A family's rules, with lookup by megatron-core name (local-spec or TE spelling)."""

    def __init__(self, rules: Sequence[WeightRule]):
        self.rules = tuple(rules)
        self._patterns = []
        for rule in self.rules:
            self._patterns.append((_pattern(rule.mcore), rule))
            if rule.te_alias:
                self._patterns.append((_pattern(rule.te_alias), rule))
        order = []
        for rule in self.rules:
            for name in rule.hf:
                module = name.rsplit('.', 1)[0]
                if module not in order:
                    order.append(module)
        self._module_order = {m: k for k, m in enumerate(order)}

    def match(self, mcore_name: str):
        """(rule, global layer index or None) for a megatron-core name with a *global* index."""
        for pattern, rule in self._patterns:
            m = pattern.match(mcore_name)
            if m:
                return rule, (int(m.group(1)) if m.groups() else None)
        return None, None

    def hf_sort_key(self, hf_name: str):
        """HF's own order: by layer, then module as the rules list them, weight before bias."""
        layer = re.search(r'\.layers\.(\d+)\.', hf_name)
        generic = re.sub(r'\.layers\.\d+\.', '.layers.{i}.', hf_name)
        module, leaf = generic.rsplit('.', 1)
        return (int(layer.group(1)) if layer else -1, self._module_order.get(module, len(self._module_order)),
                0 if leaf == 'weight' else 1, hf_name)


def standard_rules(*, qkv_bias: bool = False, qk_norm: bool = False, tie_word_embeddings: bool = False,
                   prefix: str = 'model') -> tuple:
    """The Llama-style decoder map that Llama, Mistral, Qwen2 and Qwen3 share (HF order)."""
    L, H = 'decoder.layers.{i}.', prefix + '.layers.{i}.'
    attn = H + 'self_attn.'
    rules = [WeightRule('embedding.word_embeddings.weight', (prefix + '.embed_tokens.weight',), tp='vocab'),
             WeightRule(L + 'self_attention.linear_qkv.weight',
                        tuple(f'{attn}{p}_proj.weight' for p in 'qkv'), 'qkv', 'col')]
    if qkv_bias:
        rules.append(WeightRule(L + 'self_attention.linear_qkv.bias',
                                tuple(f'{attn}{p}_proj.bias' for p in 'qkv'), 'qkv', 'col'))
    rules.append(WeightRule(L + 'self_attention.linear_proj.weight', (attn + 'o_proj.weight',), tp='row'))
    if qk_norm:
        rules += [WeightRule(L + 'self_attention.q_layernorm.weight', (attn + 'q_norm.weight',)),
                  WeightRule(L + 'self_attention.k_layernorm.weight', (attn + 'k_norm.weight',))]
    rules += [
        WeightRule(L + 'mlp.linear_fc1.weight', (H + 'mlp.gate_proj.weight', H + 'mlp.up_proj.weight'),
                   'gate_up', 'gate_up'),
        WeightRule(L + 'mlp.linear_fc2.weight', (H + 'mlp.down_proj.weight',), tp='row'),
        WeightRule(L + 'input_layernorm.weight', (H + 'input_layernorm.weight',),
                   te_alias=L + 'self_attention.linear_qkv.layer_norm_weight'),
        WeightRule(L + 'pre_mlp_layernorm.weight', (H + 'post_attention_layernorm.weight',),
                   te_alias=L + 'mlp.linear_fc1.layer_norm_weight'),
        WeightRule('decoder.final_layernorm.weight', (prefix + '.norm.weight',)),
    ]
    if tie_word_embeddings:
        # Only a pipeline's last stage without the embedding holds a separate copy of the output
        # layer; it is loaded from the embedding and never exported.
        rules.append(WeightRule('output_layer.weight', (prefix + '.embed_tokens.weight',), tp='vocab', export=False))
    else:
        rules.append(WeightRule('output_layer.weight', ('lm_head.weight',), tp='vocab'))
    return tuple(rules)


# ---- transforms: HF tensors <-> one full megatron-core tensor -------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: WeightContext) -> torch.Tensor:
    ng, d = ctx.num_query_groups, ctx.head_dim
    per = ctx.num_attention_heads // ng
    rest = q.shape[1:]
    q = q.reshape(ng, per * d, *rest)
    k = k.reshape(ng, d, *rest)
    v = v.reshape(ng, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, *rest)


def split_qkv(fused: torch.Tensor, ctx: WeightContext):
    ng, d = ctx.num_query_groups, ctx.head_dim
    per = ctx.num_attention_heads // ng
    rest = fused.shape[1:]
    g = fused.reshape(ng, (per + 2) * d, *rest)
    q, k, v = torch.split(g, [per * d, d, d], dim=1)
    return (q.reshape(ng * per * d, *rest).contiguous(), k.reshape(ng * d, *rest).contiguous(),
            v.reshape(ng * d, *rest).contiguous())


def expected_hf_shapes(rule: WeightRule, full_shape: Sequence[int], ctx: WeightContext) -> list:
    """The HF tensor shapes that make up a megatron-core tensor of ``full_shape`` (unsharded)."""
    full, rest = tuple(full_shape), tuple(full_shape[1:])
    if rule.transform == 'qkv':
        d, ng = ctx.head_dim, ctx.num_query_groups
        return [(ctx.num_attention_heads * d, *rest), (ng * d, *rest), (ng * d, *rest)]
    if rule.transform == 'gate_up':
        return [(full[0] // 2, *rest)] * 2
    if rule.tp == 'vocab':
        return [(ctx.vocab_size, *rest)]
    return [full]


def to_mcore(rule: WeightRule, tensors: Sequence[torch.Tensor], ctx: WeightContext) -> torch.Tensor:
    if rule.transform == 'qkv':
        return fuse_qkv(*tensors, ctx)
    if rule.transform == 'gate_up':
        return torch.cat(list(tensors), dim=0)
    (t,) = tensors
    return pad_vocab(t, ctx.padded_vocab_size) if rule.tp == 'vocab' else t


def to_hf(rule: WeightRule, full: torch.Tensor, ctx: WeightContext) -> list:
    if rule.transform == 'qkv':
        return list(split_qkv(full, ctx))
    if rule.transform == 'gate_up':
        return [c.contiguous() for c in torch.chunk(full, 2, dim=0)]
    return [full[:ctx.vocab_size] if rule.tp == 'vocab' else full]


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    if t.shape[0] > padded:
        raise ValueError(f'vocab rows {t.shape[0]} exceed the padded vocab size {padded}')
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


# ---- tensor parallel: full <-> per-rank shard ----------------------------------------------------

def full_shape(mode: Optional[str], local_shape: Sequence[int], tp_size: int) -> tuple:
    shape = list(local_shape)
    if mode in ('col', 'vocab', 'gate_up'):
        shape[0] *= tp_size
    elif mode == 'row' and len(shape) > 1:
        shape[1] *= tp_size
    return tuple(shape)


def shard(full: torch.Tensor, mode: Optional[str], rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full megatron-core tensor."""
    if size == 1 or mode is None or (mode == 'row' and full.dim() == 1):
        return full
    if mode in ('col', 'vocab'):
        return torch.chunk(full, size, dim=0)[rank]
    if mode == 'row':
        return torch.chunk(full, size, dim=1)[rank]
    if mode == 'gate_up':
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    raise ValueError(mode)


def unshard(shards: Sequence[torch.Tensor], mode: Optional[str]) -> torch.Tensor:
    """Inverse of ``shard``: the full tensor from every TP rank's slice (in rank order)."""
    if len(shards) == 1 or mode is None or (mode == 'row' and shards[0].dim() == 1):
        return shards[0]
    if mode in ('col', 'vocab'):
        return torch.cat(list(shards), dim=0)
    if mode == 'row':
        return torch.cat(list(shards), dim=1)
    if mode == 'gate_up':
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(mode)


def copy_slice(rule: WeightRule, full_shape: Sequence[int], rank: int, size: int):
    """For a ``copy`` rule: ``(dim, start, stop)`` of the *full* megatron-core tensor this TP rank
    holds, so that only that slice of the HF tensor is read from disk; None for the whole tensor."""
    mode = rule.tp
    if rule.transform != 'copy' or size == 1 or mode is None or (mode == 'row' and len(full_shape) == 1):
        return None
    dim = 1 if mode == 'row' else 0
    step = full_shape[dim] // size
    return dim, rank * step, (rank + 1) * step
