"""Llama (Llama 2/3/3.x, SmolLM2, TinyLlama, ...): the plain Llama-style decoder."""
from __future__ import annotations

from megaswift.megatron.model.registry import ModelFamily, UnsupportedModelError, register_model_family


def _check(hf_config) -> None:
    for flag in ('attention_bias', 'mlp_bias'):
        if getattr(hf_config, flag, False):
            raise UnsupportedModelError(f'llama with {flag}=True is not supported')


llama = register_model_family(ModelFamily('llama', 'Llama-style decoder, no biases', check_config=_check))
