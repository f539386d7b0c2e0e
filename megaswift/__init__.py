"""megaswift: Megatron-style LLM post-training.

Top-level helpers, imported on first use (``import megaswift`` stays cheap)::

    from megaswift import get_processor, get_template
    tokenizer = get_processor('HuggingFaceTB/SmolLM2-135M-Instruct')
    template = get_template(tokenizer, agent_template='hermes', loss_scale='hermes')
    template.set_mode('train')
    encoded = template.encode({'messages': [...]})
    print(template.safe_decode(encoded['input_ids']), template.safe_decode(encoded['labels']))

- ``get_processor(model)``: ``megaswift.model.load_tokenizer``;
- ``get_template(tokenizer, template=None, agent_template=None, loss_scale='default', system=None,
  max_length=None, truncation_strategy='delete', **template_options)``: ``megaswift.template.get_template``.
"""
from __future__ import annotations

import importlib

__version__ = '0.1.0'
_LAZY = {'get_processor': ('megaswift.model', 'load_tokenizer'),
         'get_template': ('megaswift.template', 'get_template')}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megaswift' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
