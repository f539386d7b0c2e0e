"""``templates`` (name -> Template class) and ``get_template``."""
from __future__ import annotations

import difflib

from .base import Template
from .templates.chatml import ChatMLTemplate, SmolLM2Template

templates: dict[str, type[Template]] = {
    'chatml': ChatMLTemplate,
    'smollm2': SmolLM2Template,
}


def get_template(tokenizer, template: str | None = None, **kwargs) -> Template:
    """Build a template for ``tokenizer``; ``template=None`` picks one from the tokenizer's chat template."""
    name = template or infer_template_name(tokenizer)
    if name not in templates:
        hint = difflib.get_close_matches(name, list(templates), n=1)
        raise ValueError(f"unknown template '{name}' (available: {', '.join(sorted(templates))})"
                         + (f"; did you mean '{hint[0]}'?" if hint else ''))
    return templates[name](tokenizer, **kwargs)


def infer_template_name(tokenizer) -> str:
    chat_template = getattr(tokenizer, 'chat_template', None) or ''
    if 'You are a helpful AI assistant named SmolLM' in chat_template:
        return 'smollm2'
    if '<|im_start|>' in chat_template:
        return 'chatml'
    return 'generic' if chat_template else 'chatml'
