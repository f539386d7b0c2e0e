"""LoRA on megatron-core's tensor-parallel linear layers, exact under TP and sequence parallelism.

``y = base(x) + (alpha / r) * B @ A @ dropout(x)``. The base module keeps its class's behaviour and
its parameter names (``linear_qkv.weight`` still loads and saves through ``weights.py``); the
adapter adds ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r]:

- column-parallel base (``linear_qkv``, ``linear_fc1``): A replicated, B sharded like the base
  weight (dim 0; for ``linear_fc1`` in the ``[gate_r; up_r]`` layout of ``weights.py``).
  Without SP the replicated ``h = A x`` goes through ``copy_to_tensor_model_parallel_region`` so its
  gradient is summed over the B shards. With SP ``x`` is this rank's sequence chunk: ``h`` is
  computed locally and all-gathered (reduce-scattered backward), and A's gradient (a sum over
  this rank's tokens) is all-reduced over TP by ``copy_to_tensor_model_parallel_region(A)``.
- row-parallel base (``linear_proj``, ``linear_fc2``): A sharded on dim 1 over the input shard,
  ``A_r x_r`` all-reduced (reduce-scattered under SP) before the replicated B; under SP, B's
  gradient is all-reduced over TP the same way.

So every LoRA gradient is complete and identical on all TP ranks after ``backward()`` alone: no
``sequence_parallel`` tag, no extra step in the training loop. Dropout masks: the replicated
column input uses the default RNG (equal on all TP ranks, as megatron-core assumes); sharded
inputs use the model-parallel RNG tracker. B starts at zero, so step 0 is the base model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megaswift.megatron.build import unwrap_model
from megaswift.megatron.convert import global_name, layer_offsets
from megaswift.megatron.parallel import ParallelContext

TARGETS = ('linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2')
ROW_TARGETS = ('linear_proj', 'linear_fc2')
HF_TARGETS = {'q_proj': 'linear_qkv', 'k_proj': 'linear_qkv', 'v_proj': 'linear_qkv', 'o_proj': 'linear_proj',
              'gate_proj': 'linear_fc1', 'up_proj': 'linear_fc1', 'down_proj': 'linear_fc2'}
ALL_LINEAR = ('all-linear', 'all_linear', 'all')


class LoraError(ValueError):
    pass


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple = TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def resolve_target_modules(target_modules) -> tuple:
    """mcore module names for ``--target_modules`` (``all-linear``, mcore names, or HF q/k/v/o/gate/up/down)."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules or ['all-linear'])
    out = []
    for name in names:
        if name in ALL_LINEAR:
            found = TARGETS
        elif name in TARGETS:
            found = (name,)
        elif name in HF_TARGETS:
            found = (HF_TARGETS[name],)
        else:
            raise LoraError(f'--target_modules: unknown module {name!r}; use all-linear, {", ".join(TARGETS)} or '
                            f'{", ".join(HF_TARGETS)} (q/k/v and gate/up select the fused linear_qkv / linear_fc1)')
        out += [f for f in found if f not in out]
    return tuple(t for t in TARGETS if t in out)


class LoraWeight(torch.nn.Module):
    """Holds one LoRA matrix as ``.weight`` (so names read ``lora_A.weight`` as in PEFT)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(tensor)


def _layer_tp_group(module, parallel):
    """The TP group of a megatron-core linear layer (local / TE spelling), else the context's."""
    return getattr(module, 'tp_group', None) or getattr(module, '_tp_group', None) or parallel.tp_group


class LoraParallelLinear:
    """Mixed into the class of an existing Column/RowParallelLinear (see ``_lora_class``)."""

    lora_parallel: str  # 'col' | 'row'
    lora_b_layout: str  # TP layout of B for 'col' ('col' | 'gate_up'), None for 'row'
    lora_tp_group: object  # the base layer's TP group
    lora_dp_cp_group: object  # the data (+ context) parallel group its replicas span

    @property
    def lora_tp_size(self) -> int:
        return torch.distributed.get_world_size(self.lora_tp_group) if torch.distributed.is_initialized() else 1

    @property
    def lora_sequence_parallel(self) -> bool:
        return bool(getattr(self, 'sequence_parallel', self.config.sequence_parallel)) and self.lora_tp_size > 1

    lora_enabled = True  # False inside ``adapters_disabled``: the base layer alone

    def forward(self, input_, *args, **kwargs):
        out = super().forward(input_, *args, **kwargs)
        if not self.lora_enabled:
            return out
        gather = kwargs.get('runtime_gather_output', args[1] if len(args) > 1 else None)  # column-parallel only
        delta = self.lora_delta(input_, gather)
        return (out[0] + delta, *out[1:])

    def _lora_input(self, x):
        """The input the base weight sees: TE layers with a fused norm apply it inside."""
        if not hasattr(self, 'layer_norm_weight'):
            return x
        eps = getattr(self, 'eps', self.config.layernorm_epsilon)
        w = self.layer_norm_weight + (1 if self.config.layernorm_zero_centered_gamma else 0)
        if self.config.normalization == 'RMSNorm':
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
        return F.layer_norm(x, x.shape[-1:], w, getattr(self, 'layer_norm_bias', None), eps)

    def _lora_dropout(self, x, sharded: bool):
        if not self.training or self.lora_dropout_p == 0:
            return x
        rng = contextlib.nullcontext()
        if sharded and self.lora_tp_size > 1:
            from megatron.core import tensor_parallel
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            return F.dropout(x, self.lora_dropout_p, training=True)

    def lora_delta(self, input_, runtime_gather_output=None):
        from megatron.core.tensor_parallel import mappings as mp
        group, tp, sp = self.lora_tp_group, self.lora_tp_size, self.lora_sequence_parallel
        a, b = self.lora_A.weight, self.lora_B.weight
        x = self._lora_input(input_)
        if self.lora_parallel == 'col':
            x = self._lora_dropout(x, sharded=sp)
            if sp:  # x: this rank's tokens; A's grad is a partial sum over them
                h = F.linear(x, mp.copy_to_tensor_model_parallel_region(a, group=group))
                h = mp.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=group)
            else:
                h = F.linear(x, a)
                if tp > 1:
                    h = mp.copy_to_tensor_model_parallel_region(h, group=group)
            y = F.linear(h, b) * self.lora_scaling
            gather = getattr(self, 'gather_output', False) if runtime_gather_output is None else runtime_gather_output
            if gather and tp > 1:
                y = mp.gather_from_tensor_model_parallel_region(y, group=group)
            return y
        if not getattr(self, 'input_is_parallel', True) and tp > 1:
            x = mp.scatter_to_tensor_model_parallel_region(x, group=group)
        h = F.linear(self._lora_dropout(x, sharded=tp > 1), a)
        if sp:  # tokens are scattered after A; B's grad is a partial sum over this rank's tokens
            h = mp.reduce_scatter_to_sequence_parallel_region(h, group=group)
            b = mp.copy_to_tensor_model_parallel_region(b, group=group)
        elif tp > 1:
            h = mp.reduce_from_tensor_model_parallel_region(h, group=group)
        return F.linear(h, b) * self.lora_scaling

    def lora_modes(self) -> dict:
        """TP layout of each LoRA tensor in ``weights.shard``/``unshard`` terms."""
        if self.lora_parallel == 'col':
            return {'lora_A.weight': None, 'lora_B.weight': self.lora_b_layout}
        return {'lora_A.weight': 'row', 'lora_B.weight': None}

    def sharded_state_dict(self, prefix='', sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        dp_cp_group = (metadata or {}).get('dp_cp_group')
        groups = {'tp_group': self.lora_tp_group,
                  'dp_cp_group': dp_cp_group if dp_cp_group is not None else self.lora_dp_cp_group}
        for name, mode in self.lora_modes().items():
            if mode is None:
                continue  # replicated: the base class already made a replicated ShardedTensor
            param = getattr(self, name.split('.')[0]).weight
            sh = make_tp_sharded_tensor_for_checkpoint(param, prefix + name, 1 if mode == 'row' else 0,
                                                       prepend_offsets=sharded_offsets, **groups)
            if mode == 'gate_up':
                sh = apply_swiglu_sharded_factory(sh, sharded_offsets,
                                                  (metadata or {}).get('singleton_local_shards', False))
            sd[prefix + name] = sh
        return sd

    @torch.no_grad()
    def lora_merged_weight(self) -> torch.Tensor:
        """``W + scaling * B @ A`` on this rank's shard (computed in fp32, in W's dtype); W is left as it is."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.weight.float() + self.lora_scaling * delta).to(self.weight.dtype)

    def lora_merge_and_unload(self):
        """W += scaling * B @ A on this rank's shard (in fp32), then become the plain base layer again."""
        self.weight.copy_(self.lora_merged_weight())
        self.lora_unload()

    def lora_unload(self):
        del self.lora_A, self.lora_B
        for attr in ('lora_rank', 'lora_alpha', 'lora_scaling', 'lora_dropout_p', 'lora_parallel', 'lora_b_layout',
                     'lora_tp_group', 'lora_dp_cp_group'):
            self.__dict__.pop(attr, None)
        self.__class__ = self._lora_base_class

    def __repr__(self):
        return f'{super().__repr__()[:-1]}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha})'


_LORA_CLASSES = {}


def _lora_class(base_cls):
    if base_cls not in _LORA_CLASSES:
        name = f'Lora{base_cls.__name__}'
        cls = type(name, (LoraParallelLinear, base_cls), {'_lora_base_class': base_cls, '__module__': __name__})
        globals()[name] = cls  # picklable by qualified name
        _LORA_CLASSES[base_cls] = cls
    return _LORA_CLASSES[base_cls]


def lora_modules(models):
    """(global module name, LoRA module, GPTModel) for every LoRA layer of ``models``."""
    for model in models:
        model = unwrap_model(model)
        offsets = layer_offsets(model)
        for name, module in model.named_modules():
            if isinstance(module, LoraParallelLinear):
                yield global_name(name, offsets), module, model


@contextlib.contextmanager
def adapters_disabled(models):
    """Run ``models`` as their base model: every LoRA layer skips its adapter inside the block (the reference
    model of preference training under LoRA, without a second copy of the weights)."""
    modules = [module for _, module, _ in lora_modules(models)]
    for module in modules:
        module.lora_enabled = False
    try:
        yield
    finally:
        for module in modules:
            del module.lora_enabled  # back to the class default


@torch.no_grad()
def _init_a(module, full_in: int, rank: int, dtype, device) -> torch.Tensor:
    """Kaiming-uniform A (PEFT's default) drawn once for the full input dim, equal on all TP ranks."""
    from megaswift.megatron.weights import shard
    full = torch.empty(rank, full_in, dtype=torch.float32, device=device)
    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5))
    group, tp = module.lora_tp_group, module.lora_tp_size
    # replicas (TP ranks, then data/context-parallel ranks) must start equal, whatever their RNG did
    for g in (group, module.lora_dp_cp_group):
        if torch.distributed.get_world_size(g) > 1:
            torch.distributed.broadcast(full, torch.distributed.get_global_rank(g, 0), group=g)
    if module.lora_parallel == 'row':
        full = shard(full, 'row', torch.distributed.get_rank(group), tp)
    return full.to(dtype).contiguous()


def add_lora(models, config: LoraConfig, *, parallel: Optional[ParallelContext] = None) -> list:
    """Turn every targeted linear of ``models`` into a LoRA layer; returns the global names wrapped.

    Call after ``build_model`` (+ ``load_hf_weights``) and before DDP / optimizer creation.
    Trainability is left to the caller (``prepare_model`` freezes everything but the adapters).
    ``parallel``: the layout the models were built at (default: ``ParallelContext.from_megatron()``).
    """
    from megatron.core import tensor_parallel
    if config.rank < 1:
        raise LoraError(f'--lora_rank must be >= 1, got {config.rank}')
    if not 0 <= config.dropout < 1:
        raise LoraError(f'--lora_dropout must be in [0, 1), got {config.dropout}')
    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    wrapped = []
    for model in models:
        model = unwrap_model(model)
        info = model.megaswift_info
        wmap, offsets = info.family.weight_map(info.hf_config), layer_offsets(model)
        for name, module in list(model.named_modules()):
            target = name.rsplit('.', 1)[-1]
            if target not in config.target_modules or isinstance(module, LoraParallelLinear):
                continue
            gname = global_name(name, offsets)
            rule, _ = wmap.match(gname + '.weight')
            if getattr(module, 'is_expert', False):
                raise LoraError(f'LoRA on MoE expert layers is not supported ({gname!r})')
            if rule is None or getattr(module, 'weight', None) is None:
                raise LoraError(f'cannot add LoRA to {gname!r} ({type(module).__name__}): no weight rule maps it')
            weight = module.weight
            module.lora_tp_group, module.lora_dp_cp_group = _layer_tp_group(module, parallel), parallel.dp_cp_group
            module.__class__ = _lora_class(type(module))
            module.lora_parallel = 'row' if target in ROW_TARGETS else 'col'
            module.lora_b_layout = rule.tp if module.lora_parallel == 'col' else None
            module.lora_rank, module.lora_alpha = config.rank, config.alpha
            module.lora_scaling, module.lora_dropout_p = config.scaling, config.dropout
            tp = module.lora_tp_size
            full_in = weight.shape[1] * (tp if module.lora_parallel == 'row' else 1)
            a = _init_a(module, full_in, config.rank, weight.dtype, weight.device)
            b = torch.zeros(weight.shape[0], config.rank, dtype=weight.dtype, device=weight.device)
            module.lora_A, module.lora_B = LoraWeight(a), LoraWeight(b)
            for key, mode in module.lora_modes().items():
                param = getattr(module, key.split('.')[0]).weight
                if mode is None:
                    tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
                else:
                    tensor_parallel.set_tensor_model_parallel_attributes(param, True, 1 if mode == 'row' else 0, 1)
            wrapped.append(gname)
        model.megaswift_lora = config
    return wrapped


def merge_lora(models) -> list:
    """Fold every adapter into its base weight (exact in fp32) and drop the adapters.

    Afterwards the models are plain megatron-core models again: ``iter_hf_weights`` /
    ``save_mcore_checkpoint`` export the merged weights. Purely local (no communication).
    """
    for _, module, _ in list(lora_modules(models)):
        module.lora_merge_and_unload()
    for model in models:
        unwrap_model(model).__dict__.pop('megaswift_lora', None)
    return models


def __getattr__(name: str):  # lora_state_dict & co. live in lora_io (which imports this module)
    if name in ('lora_state_dict', 'load_lora_state_dict', 'export_peft_adapter', 'to_peft_tensors'):
        from megaswift.tuners import lora_io
        return getattr(lora_io, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
