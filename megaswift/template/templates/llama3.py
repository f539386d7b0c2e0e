"""Llama 3 chat templates.

``llama3``: Meta-Llama-3-*-Instruct's template::

    <|begin_of_text|>  then per message  <|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>

``llama3_1``: the Llama 3.1 / 3.3 Instruct template (Llama 3.2 text models use it too, with
today's date): the same turns, but a system turn always comes first::

    <|start_header_id|>system<|end_header_id|>\\n\\n[Environment: ipython\\n]Cutting Knowledge Date: December 2023\\n
    Today Date: {date_string}\\n\\n{system|trim}<|eot_id|>

(``Environment: ipython`` only when the row has tools) and ``tool`` messages are rendered as
``ipython`` turns whose content is JSON-quoted (the official template applies ``tojson`` to it).
``date_string`` is a constructor argument (default "26 Jul 2024", the template's own default).
The tool descriptions and ``tool_calls`` are written by the agent template
(``--agent_template llama3`` where registered), not here.

Trainable text: the trimmed assistant content and its ``<|eot_id|>``.
"""
from __future__ import annotations

import json

from ..agent import agent_templates
from ..base import Template
from ..segments import Segment, glue
from .generic import assistant_segments


class Llama3Template(Template):
    name = 'llama3'
    bos, eot = '<|begin_of_text|>', '<|eot_id|>'
    default_system = None

    def __init__(self, tokenizer, agent_template: str | None = None, *args, **kwargs):
        if agent_template is None:
            agent_template = 'llama3' if 'llama3' in agent_templates else None
        super().__init__(tokenizer, agent_template, *args, **kwargs)

    @staticmethod
    def header(role: str) -> Segment:
        return glue(f'<|start_header_id|>{role}<|end_header_id|>\n\n')

    def turn(self, message: dict, content: str, index: int, header_role: str | None = None) -> list[Segment]:
        """One turn; ``content`` is the message's content as the template writes it (trimmed, quoted)."""
        role = message['role']
        head = self.header(header_role or role)
        if role == 'assistant':
            return [head] + assistant_segments(content, self.eot, message, index)
        return [head, Segment(content, 'tool' if header_role == 'ipython' else role, index), glue(self.eot)]

    def render(self, messages, tools=None, add_generation_prompt=False):
        segs: list[Segment] = [glue(self.bos)]
        for i, m in enumerate(messages):
            segs += self.turn(m, m['content'].strip(), i)
        if add_generation_prompt:
            segs.append(self.header('assistant'))
        return segs


class Llama3_1Template(Llama3Template):
    name = 'llama3_1'

    def __init__(self, tokenizer, *args, date_string: str = '26 Jul 2024', **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self.date_string = date_string

    def render(self, messages, tools=None, add_generation_prompt=False):
        segs: list[Segment] = [glue(self.bos)]
        has_system = messages[0]['role'] == 'system'
        env = 'Environment: ipython\n' if tools else ''
        segs += [self.header('system'),
                 glue(f'{env}Cutting Knowledge Date: December 2023\nToday Date: {self.date_string}\n\n')]
        if has_system:
            segs.append(Segment(messages[0]['content'].strip(), 'system', 0))
        segs.append(glue(self.eot))
        for i, m in enumerate(messages):
            if i == 0 and has_system:
                continue
            if m['role'] in ('tool', 'ipython'):
                # the official template tests ``content is iterable``, which strings pass: they are JSON-quoted
                segs += self.turn(m, json.dumps(m['content'], ensure_ascii=False), i, header_role='ipython')
            else:
                segs += self.turn(m, m['content'].strip(), i)
        if add_generation_prompt:
            segs.append(self.header('assistant'))
        return segs
