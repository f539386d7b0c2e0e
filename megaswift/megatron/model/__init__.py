"""Model families (one small file each) and their registry."""
from megaswift.megatron.model import llama, mistral, qwen2, qwen3  # noqa: F401  (registers the families)
from megaswift.megatron.model.registry import (ModelFamily, UnsupportedModelError, get_model_family,
                                               model_families, register_model_family)

__all__ = ['ModelFamily', 'UnsupportedModelError', 'get_model_family', 'model_families', 'register_model_family']
