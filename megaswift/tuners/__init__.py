"""Tuners (``--tuner_type full | lora | freeze``) for megaswift's megatron-core models.

    from megaswift.tuners import prepare_model, merge_lora, export_peft_adapter, lora_state_dict

Names are imported on first use, so ``import megaswift.tuners`` does not import megatron-core.
"""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_LAZY = {
    'prepare_model': 'base', 'tuners': 'base', 'TunerError': 'base', 'trainable_parameters': 'base',
    'named_parameters': 'base', 'lora_config': 'base',
    'LoraConfig': 'lora', 'LoraError': 'lora', 'add_lora': 'lora', 'merge_lora': 'lora', 'lora_modules': 'lora',
    'resolve_target_modules': 'lora', 'LoraParallelLinear': 'lora', 'adapters_disabled': 'lora',
    'lora_state_dict': 'lora_io', 'load_lora_state_dict': 'lora_io', 'export_peft_adapter': 'lora_io',
    'to_peft_tensors': 'lora_io',
}
__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
