"""Qwen2 / Qwen2.5: Llama-style with a bias on the q/k/v projections."""
from __future__ import annotations

from megaswift.megatron.model.registry import ModelFamily, register_model_family

qwen2 = register_model_family(ModelFamily('qwen2', 'Llama-style decoder with QKV bias', add_qkv_bias=True))
