"""megatron-core as megaswift's training engine: parallel setup, model families, HF <-> mcore weights.

Exports (imported on first use, so ``import megaswift.megatron`` does not import megatron-core)::

    from megaswift.megatron import ParallelConfig, initialize_parallel, build_model, load_hf_weights
    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=2))  # a ParallelContext
    models = build_model(AutoConfig.from_pretrained(hf_dir), parallel=ctx)  # one GPTModel per VPP stage
    load_hf_weights(models, hf_dir, parallel=ctx)
    for name, tensor in iter_hf_weights(models, parallel=ctx): ...  # full HF tensors on rank 0
"""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_LAZY = {
    'ParallelConfig': 'layout', 'ParallelLayoutError': 'layout', 'validate_layout': 'layout',
    'ParallelContext': 'parallel', 'initialize_parallel': 'parallel', 'destroy_parallel': 'parallel',
    'model_families': 'model', 'ModelFamily': 'model', 'get_model_family': 'model',
    'register_model_family': 'model', 'UnsupportedModelError': 'model',
    'layer_spec': 'spec', 'local_layer_spec': 'spec', 'SDPAttention': 'spec', 'RMSNorm': 'spec',
    'build_model': 'build', 'unwrap_model': 'build', 'ModelInfo': 'build',
    'WeightRule': 'weights', 'WeightMap': 'weights', 'padded_vocab_size': 'weights',
    'load_hf_weights': 'convert', 'iter_hf_weights': 'convert', 'hf_state_dict': 'convert',
    'WeightLoadError': 'convert',
}
__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
