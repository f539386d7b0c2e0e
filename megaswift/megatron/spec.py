"""megaswift's transformer-layer spec: megatron-core's local layer, no Transformer Engine needed.

The structure (and so every parameter name) is megatron-core's local GPT layer:
``input_layernorm``, ``self_attention.linear_qkv`` / ``linear_proj`` / ``q_layernorm`` /
``k_layernorm``, ``pre_mlp_layernorm``, ``mlp.linear_fc1`` / ``linear_fc2``. Two modules differ:

- ``SDPAttention``: the core attention, on ``torch.nn.functional.scaled_dot_product_attention``.
  Causal, optional sliding window (``config.window_size``), GQA, and packed sequences
  (``PackedSeqParams(qkv_format='thd', cu_seqlens_q=...)``): each packed sequence attends only to
  itself (one SDPA call per sequence).
- ``RMSNorm``: HF-identical RMSNorm (computed in fp32) whose weight carries
  ``sequence_parallel=config.sequence_parallel``, so megatron-core all-reduces its gradient across
  TP under sequence parallelism (its ``WrappedTorchNorm`` refuses sequence parallelism).

With Transformer Engine installed, ``layer_spec`` returns megatron-core's TE spec instead. Its
names differ in two places: the input and pre-MLP norms are fused into the following linear
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``;
``input_layernorm`` / ``pre_mlp_layernorm`` are identities), and TE modules add ``_extra_state``
buffers. ``weights.py`` maps both spellings. Distributed checkpoints use the TE spelling in both
cases (``sharded_state_dict_keys_map`` below), so they load into either spec.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

# local name -> TE name, for the norms TE fuses into the following linear layer.
TE_FUSED_NORMS = {
    'input_layernorm.weight': 'self_attention.linear_qkv.layer_norm_weight',
    'pre_mlp_layernorm.weight': 'mlp.linear_fc1.layer_norm_weight',
}


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


class RMSNorm(torch.nn.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)``, computed in fp32 and cast back (as HF does)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        if getattr(config, 'normalization', 'RMSNorm') != 'RMSNorm':
            raise ValueError(f'megaswift.megatron.spec.RMSNorm got normalization={config.normalization!r}')
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # megatron-core's finalize_model_grads sums the grads of params tagged like this across TP.
        setattr(self.weight, 'sequence_parallel', bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _cu_seqlens(packed_seq_params) -> torch.Tensor:
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise ValueError("PackedSeqParams(qkv_format='thd') needs cu_seqlens_q")
    return cu


class SDPAttention(MegatronModule):
    """Core attention (after QKV projection and RoPE) on torch's scaled_dot_product_attention.

    Inputs are megatron-core's: ``[s, b, heads, head_dim]`` (key/value with the KV-group count as
    heads), or ``[t, heads, head_dim]`` for packed ``thd`` input. Returns ``[s, b, heads*head_dim]``
    (``[t, heads*head_dim]`` for ``thd``).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = 'self', attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError('SDPAttention does not support context parallelism; use the Transformer Engine spec')
        if config.apply_query_key_layer_scaling:
            raise ValueError('SDPAttention does not support apply_query_key_layer_scaling')
        if attention_type != 'self':
            raise ValueError(f'SDPAttention supports self-attention only, got {attention_type!r}')
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or config.softmax_scale or 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window_left = config.window_size[0] if config.window_size else None

    def _mask(self, sq: int, sk: int, device, attention_mask: Optional[torch.Tensor]):
        """Boolean mask (True = attend), or None when plain causal suffices."""
        if attention_mask is None and self.window_left is None and sq == sk:
            return None  # SDPA's is_causal aligns top-left, which equals bottom-right only when sq == sk
        q_pos = torch.arange(sk - sq, sk, device=device).unsqueeze(1)  # bottom-right aligned
        k_pos = torch.arange(sk, device=device).unsqueeze(0)
        mask = k_pos <= q_pos
        if self.window_left is not None and self.window_left >= 0:
            mask = mask & (k_pos >= q_pos - self.window_left)
        if attention_mask is not None:  # megatron-core convention: True = masked out
            mask = mask & ~attention_mask.bool()
        return mask

    def _sdpa(self, q, k, v, attention_mask=None):
        """q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d]."""
        if k.size(1) != q.size(1):
            rep = q.size(1) // k.size(1)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = self._mask(q.size(2), k.size(2), q.device, attention_mask)
        dropout_p = self.dropout_p if self.training else 0.0
        kwargs = dict(dropout_p=dropout_p, scale=self.softmax_scale)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if attention_bias is not None:
            raise ValueError('SDPAttention does not support attention_bias')
        mask_type = attn_mask_type or self.attn_mask_type
        if mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f'SDPAttention is causal-only, got attn_mask_type={mask_type}')
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if self.training and self.dropout_p > 0 and not self.config.sequence_parallel else None)
        with rng if rng is not None else contextlib.nullcontext():
            if packed_seq_params is not None and packed_seq_params.qkv_format == 'thd':
                return self._forward_thd(query, key, value, packed_seq_params)
            # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            out = self._sdpa(q, k, v, attention_mask)
            out = out.permute(2, 0, 1, 3)  # [s, b, h, d]
            return out.reshape(out.size(0), out.size(1), -1)

    def _forward_thd(self, query, key, value, packed_seq_params):
        cu = _cu_seqlens(packed_seq_params).tolist()
        out = query.new_zeros(query.shape)
        for start, end in zip(cu[:-1], cu[1:]):
            if end <= start:
                continue
            # [t, h, d] -> [1, h, t, d]
            q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
            out[start:end] = self._sdpa(q, k, v)[0].transpose(0, 1)
        return out.reshape(out.size(0), -1)


def local_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """megaswift's TE-free GPT layer (megatron-core's local structure and parameter names)."""
    if config.normalization != 'RMSNorm':
        raise ValueError(f'megaswift layer spec supports RMSNorm models, got {config.normalization!r}')
    if config.num_moe_experts:
        raise ValueError('megaswift layer spec does not support MoE yet')
    qk_norm = RMSNorm if config.qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={'attn_mask_type': AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=SDPAttention,
                    linear_proj=RowParallelLinear, q_layernorm=qk_norm, k_layernorm=qk_norm),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                               linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            # dist-checkpoint keys use the TE spelling, so checkpoints load into either spec
            sharded_state_dict_keys_map={'input_layernorm.': 'self_attention.linear_qkv.layer_norm_',
                                         'pre_mlp_layernorm.': 'mlp.linear_fc1.layer_norm_'},
        ),
    )


def layer_spec(config: TransformerConfig, use_te: Optional[bool] = None) -> ModuleSpec:
    """The TE spec when Transformer Engine is importable and ``use_te`` is not False, else ours."""
    if use_te is None:
        use_te = te_available()
    elif use_te and not te_available():
        raise ImportError('use_te=True but transformer_engine cannot be imported')
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return local_layer_spec(config)


def final_norm_spec(config: TransformerConfig, use_te: Optional[bool] = None):
    """The final layer norm module (the TE spec uses TENorm; ours the SP-capable RMSNorm)."""
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        return TENorm
    return RMSNorm
