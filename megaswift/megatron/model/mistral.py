"""Mistral: Llama-style; ``sliding_window`` becomes megatron-core's ``window_size`` (SDPA masks it)."""
from __future__ import annotations

from megaswift.megatron.model.registry import ModelFamily, register_model_family

mistral = register_model_family(ModelFamily('mistral', 'Llama-style decoder with sliding-window attention'))
