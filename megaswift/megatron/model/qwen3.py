"""Qwen3 (dense): Llama-style with per-head RMSNorm on queries and keys, explicit head_dim."""
from __future__ import annotations

from megaswift.megatron.model.registry import ModelFamily, UnsupportedModelError, register_model_family


def _check(hf_config) -> None:
    if getattr(hf_config, 'attention_bias', False):
        raise UnsupportedModelError('qwen3 with attention_bias=True is not supported')


qwen3 = register_model_family(ModelFamily('qwen3', 'Llama-style decoder with q/k RMSNorm', qk_layernorm=True,
                                          check_config=_check))
