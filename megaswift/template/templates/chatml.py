"""ChatML (SmolLM2, and the base of the Qwen families): ``<|im_start|>role\\ncontent<|im_end|>\\n``."""
from __future__ import annotations

from ..base import Template
from ..segments import Segment, glue


class ChatMLTemplate(Template):
    name = 'chatml'
    begin, end = '<|im_start|>', '<|im_end|>'
    default_system = None

    def render(self, messages, tools=None, add_generation_prompt=False):
        segs: list[Segment] = []
        if self.default_system is not None and messages[0]['role'] != 'system':
            segs += self._turn('system', self.default_system, None)
        for i, m in enumerate(messages):
            segs += self._turn(m['role'], m['content'], i, m.get('loss'))
        if add_generation_prompt:
            segs.append(glue(f'{self.begin}assistant\n'))
        return segs

    def _turn(self, role: str, content: str, index: int | None, loss=None) -> list[Segment]:
        head = glue(f'{self.begin}{role}\n')
        if role == 'assistant':
            return [head, Segment(content + self.end, 'assistant', index, trainable=True, loss=loss), glue('\n')]
        return [head, Segment(content, role, index), glue(f'{self.end}\n')]


class SmolLM2Template(ChatMLTemplate):
    """SmolLM2-Instruct's own chat template: ChatML with a default system prompt."""
    name = 'smollm2'
    default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'
