"""``templates`` (name -> Template class), ``get_template`` and ``infer_template_name``."""
from __future__ import annotations

import logging

from ..utils.registry import Registry
from .base import Template
from .segments import join_text
from .templates.chatml import ChatMLTemplate, SmolLM2Template
from .templates.generic import GenericTemplate
from .templates.llama3 import Llama3_1Template, Llama3Template
from .templates.qwen import Qwen2_5Template, Qwen3Template

logger = logging.getLogger(__name__)

templates = Registry('template', {
    'chatml': ChatMLTemplate,
    'smollm2': SmolLM2Template,
    'qwen2_5': Qwen2_5Template,
    'qwen3': Qwen3Template,
    'llama3': Llama3Template,
    'llama3_1': Llama3_1Template,
    'generic': GenericTemplate,
})


def get_template(tokenizer, template: str | None = None, agent_template: str | None = None,
                 loss_scale: str = 'default', system: str | None = None, max_length: int | None = None,
                 truncation_strategy: str = 'delete', **kwargs) -> Template:
    """Build a template for ``tokenizer``; ``template=None`` picks one from the tokenizer's chat template.

    ``kwargs`` are the template's own options: ``enable_thinking`` (qwen3), ``date_string``
    (llama3_1), ``chat_template_kwargs`` (generic).
    """
    cls: type[Template] = templates.lookup(template or infer_template_name(tokenizer), '--template')
    return cls(tokenizer, agent_template=agent_template, loss_scale=loss_scale, system=system, max_length=max_length,
               truncation_strategy=truncation_strategy, **kwargs)


_PROBES = (
    [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'Q1'}, {'role': 'assistant', 'content': 'A1'},
     {'role': 'user', 'content': 'Q2'}, {'role': 'assistant', 'content': 'A2'}],
    [{'role': 'user', 'content': 'Q1'}, {'role': 'assistant', 'content': 'A1'}],
)


def _candidate(chat_template: str) -> str | None:
    if 'You are a helpful AI assistant named SmolLM' in chat_template:
        return 'smollm2'
    if '<|im_start|>' in chat_template:
        if 'enable_thinking' in chat_template and '<think>' in chat_template:
            return 'qwen3'
        if 'You are Qwen, created by Alibaba Cloud' in chat_template:
            return 'qwen2_5'
        return 'chatml'
    if '<|start_header_id|>' in chat_template:
        return 'llama3_1' if 'Cutting Knowledge Date' in chat_template else 'llama3'
    return None


def infer_template_name(tokenizer) -> str:
    """The explicit template whose rendering equals the tokenizer's chat template, else ``generic``.

    The family is guessed from markers in the Jinja string and then checked by rendering two
    small conversations both ways; a template that looks like a family but renders differently
    (a fine-tune's custom system prompt, a different date, ...) gets ``generic``, which follows
    the tokenizer's own template. A tokenizer without a chat template gets ``chatml``.
    """
    chat_template = getattr(tokenizer, 'chat_template', None) or ''
    if not chat_template:
        return 'chatml'
    name = _candidate(chat_template)
    if name is None:
        return 'generic'
    try:
        template = templates[name](tokenizer)
        for probe in _PROBES:
            for gen in (False, True):
                msgs = probe[:-1] if gen else probe
                ours = join_text(template.render(msgs, add_generation_prompt=gen))
                theirs = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                if ours != theirs:
                    logger.info("the chat template looks like '%s' but renders differently; using 'generic'", name)
                    return 'generic'
    except Exception as e:  # a template that cannot render the probe: trust the markers
        logger.debug('could not verify template %s: %s', name, e)
    return name
