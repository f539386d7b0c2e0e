"""Checkpoint conversion (layer 3): HF <-> megatron-core, with a precision check.

- ``hf_to_mcore(args)``: HF safetensors -> mcore ``torch_dist`` checkpoint at any TP/PP;
- ``mcore_to_hf(args)``: mcore checkpoint (saved at any layout) -> HF safetensors shards + index,
  config, tokenizer and generation config;
- ``test_convert_precision(models, hf_dir)``: max/mean logit difference and loss difference.
"""
from .convert import ExportError, hf_to_mcore, mcore_to_hf
from .precision import test_convert_precision

__all__ = ['ExportError', 'hf_to_mcore', 'mcore_to_hf', 'test_convert_precision']
