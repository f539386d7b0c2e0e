"""Model families: how an HF config becomes a megatron-core GPT model, keyed by HF ``model_type``.

A family says what differs between Llama-style decoders (QKV bias, q/k norm, its weight map,
its layer spec); everything they share (hidden sizes, GQA, head_dim, RoPE, RMSNorm eps, SwiGLU,
tied embeddings) is read here. Adding a family = one small file under ``megaswift/megatron/model/``
that calls ``register_model_family(ModelFamily(...))`` and is imported by ``model/__init__.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megaswift.megatron.weights import WeightMap, standard_rules

model_families: dict = {}


class UnsupportedModelError(ValueError):
    pass


def _default_layer_spec(config, use_te=None):
    from megaswift.megatron.spec import layer_spec
    return layer_spec(config, use_te)


def _default_weight_rules(family: 'ModelFamily', hf_config) -> tuple:
    return standard_rules(qkv_bias=family.add_qkv_bias, qk_norm=family.qk_layernorm,
                          tie_word_embeddings=tie_word_embeddings(hf_config))


@dataclass(frozen=True)
class ModelFamily:
    model_type: str
    description: str = ''
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    # (family, hf_config) -> tuple of WeightRule, in HF order
    weight_rules: Callable = _default_weight_rules
    # (TransformerConfig, use_te) -> ModuleSpec of one transformer layer
    layer_spec: Callable = _default_layer_spec
    # (hf_config) -> None; raises UnsupportedModelError for config features the family cannot map
    check_config: Optional[Callable] = None
    # (hf_config, kwargs) -> None; last-word edits of the TransformerConfig kwargs
    config_hook: Optional[Callable] = None
    aliases: tuple = field(default_factory=tuple)

    def weight_map(self, hf_config) -> WeightMap:
        return WeightMap(self.weight_rules(self, hf_config))

    def transformer_config_kwargs(self, hf_config) -> dict:
        if self.check_config is not None:
            self.check_config(hf_config)
        act = getattr(hf_config, 'hidden_act', 'silu')
        if act not in ('silu', 'swish'):
            raise UnsupportedModelError(f'{self.model_type}: hidden_act={act!r} is not supported (only silu/SwiGLU)')
        window = sliding_window(hf_config)
        kwargs = dict(
            num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
            ffn_hidden_size=hf_config.intermediate_size, num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=num_kv_heads(hf_config), kv_channels=head_dim(hf_config),
            layernorm_epsilon=float(getattr(hf_config, 'rms_norm_eps', 1e-6)), normalization='RMSNorm',
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias, qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0, attention_dropout=float(getattr(hf_config, 'attention_dropout', 0.0) or 0.0),
            init_method_std=float(getattr(hf_config, 'initializer_range', 0.02)),
            window_size=(window - 1, 0) if window else None,
            rotary_interleaved=False, bias_activation_fusion=False, masked_softmax_fusion=False,
            bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
            gradient_accumulation_fusion=False,
        )
        if self.config_hook is not None:
            self.config_hook(hf_config, kwargs)
        return kwargs


def register_model_family(family: ModelFamily) -> ModelFamily:
    for name in (family.model_type, *family.aliases):
        model_families[name] = family
    return family


def get_model_family(hf_config) -> ModelFamily:
    model_type = getattr(hf_config, 'model_type', None)
    family = model_families.get(model_type)
    if family is None:
        archs = getattr(hf_config, 'architectures', None) or []
        raise UnsupportedModelError(
            f'model_type {model_type!r} (architectures {archs}) is not supported by megaswift.megatron; '
            f'supported model_types: {", ".join(sorted(model_families))}')
    return family


# ---- HF config readers shared by all families ----------------------------------------------------

def num_kv_heads(hf_config) -> int:
    return getattr(hf_config, 'num_key_value_heads', None) or hf_config.num_attention_heads


def head_dim(hf_config) -> int:
    return getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // hf_config.num_attention_heads


def tie_word_embeddings(hf_config) -> bool:
    tied = getattr(hf_config, 'tie_word_embeddings', None)
    if tied is None and hasattr(hf_config, 'get_text_config'):
        tied = getattr(hf_config.get_text_config(), 'tie_word_embeddings', False)
    return bool(tied)


def sliding_window(hf_config) -> Optional[int]:
    """The sliding-window width when every layer uses it; None for full attention."""
    window = getattr(hf_config, 'sliding_window', None)
    if not window:
        return None
    if getattr(hf_config, 'use_sliding_window', True) is False:
        return None
    types = getattr(hf_config, 'layer_types', None)
    if types and 'sliding_attention' not in types:
        return None
    if types and any(t != 'sliding_attention' for t in types):
        raise UnsupportedModelError(f'{hf_config.model_type}: a mix of sliding-window and full-attention '
                                    f'layers is not supported (layer_types={types})')
    return int(window)


def rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, 'rope_parameters', None)  # transformers 5
    if params is None:  # transformers 4
        params = dict(getattr(hf_config, 'rope_scaling', None) or {})
        params.setdefault('rope_theta', getattr(hf_config, 'rope_theta', 10000.0))
    params = dict(params)
    params.setdefault('rope_type', params.get('type', 'default'))
    return params


def gpt_model_kwargs(hf_config) -> dict:
    """The RoPE/sequence arguments of megatron-core's GPTModel."""
    p = rope_parameters(hf_config)
    kwargs = dict(position_embedding_type='rope', rotary_base=float(p.get('rope_theta', 10000.0)),
                  rotary_percent=float(getattr(hf_config, 'partial_rotary_factor', 1.0) or 1.0),
                  max_sequence_length=int(getattr(hf_config, 'max_position_embeddings', 4096)))
    rope_type = p['rope_type']
    if rope_type == 'linear':
        kwargs['seq_len_interpolation_factor'] = float(p['factor'])
    elif rope_type == 'llama3':
        # megatron-core's llama3 scaling hard-codes these three values
        fixed = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        if any(float(p.get(k, v)) != v for k, v in fixed.items()):
            raise UnsupportedModelError(f'llama3 RoPE scaling with {p} is not supported (megatron-core fixes {fixed})')
        kwargs.update(rope_scaling=True, rope_scaling_factor=float(p['factor']))
    elif rope_type != 'default':
        raise UnsupportedModelError(f'rope_type {rope_type!r} is not supported (default, linear, llama3)')
    return kwargs


def build_transformer_config(family: ModelFamily, hf_config, *, tp: int, pp: int, vpp: Optional[int],
                             sequence_parallel: bool, dtype: torch.dtype, overrides: Optional[dict] = None):
    from megatron.core.transformer.transformer_config import TransformerConfig
    kwargs = family.transformer_config_kwargs(hf_config)
    kwargs.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel,
                  params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
                  fp16=dtype == torch.float16, use_cpu_initialization=not torch.cuda.is_available())
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)
