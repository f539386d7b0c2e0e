"""Fused operations with a pure-PyTorch reference and an optional CUDA extension (``csrc/``):

- ``linear_cross_entropy``: the LM head and its (loss-scaled, label-smoothed, vocab-parallel) cross entropy,
  log-probs and entropy without the ``N x V`` logits (``linear_ce.py``; row passes in ``linear_ce_rows.py``);
- packing: ``cu_seqlens`` / ``position_ids`` from sample lengths, pack/unpack between padded ``[B, S]`` and
  packed ``[T]`` tensors (``packing.py``);
- ``cuda_ext``: the loader of the compiled kernels (prebuilt by ``setup.py`` or JIT-built on first use).

Importing this package builds nothing and imports no extension.
"""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_LAZY = {'linear_cross_entropy': 'linear_ce', 'LinearCEOutput': 'linear_ce', 'best_impl': 'linear_ce',
         'linear_ce_flops': 'linear_ce',
         'cu_seqlens_from_lengths': 'packing', 'position_ids_from_cu_seqlens': 'packing', 'pack_padded': 'packing',
         'unpack_to_padded': 'packing'}
__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
