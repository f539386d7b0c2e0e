"""Qwen2.5 and Qwen3 chat templates (ChatML with Qwen's own rules).

Reproduced from the official ``chat_template`` strings shipped with Qwen2.5-*-Instruct and
Qwen3-* (hybrid thinking) tokenizers; the tests check the rendered token ids against
``tokenizer.apply_chat_template`` with those strings.

Both families:
- ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` for system/user turns and for a system message
  that is not the first one;
- consecutive ``tool`` messages become ONE user turn, each wrapped as
  ``\\n<tool_response>\\n{content}\\n</tool_response>`` (Qwen's own layout for tool results);
- trainable text: the rendered assistant body and its ``<|im_end|>`` (the ``\\n`` after it is glue).

Not reproduced here, because the agent template (``--agent_template``, default ``hermes``)
does it before rendering: the ``# Tools`` system block built from ``tools``, and an assistant
message's OpenAI ``tool_calls`` field (the agent template writes the calls into ``content``).
Messages with other roles raise ``TemplateError`` (the official templates silently drop them).
"""
from __future__ import annotations

from ..errors import TemplateError
from ..segments import Segment, glue
from .chatml import ChatMLTemplate
from .generic import assistant_segments

_ROLES = ('system', 'user', 'assistant', 'tool')


class _QwenBase(ChatMLTemplate):
    def _check_role(self, m: dict, i: int) -> None:
        if m['role'] not in _ROLES:
            raise TemplateError(f"role {m['role']!r} cannot be rendered by the {self.name} template "
                                f"(expected one of {', '.join(_ROLES)})", f'messages[{i}].role')

    def _tool(self, messages: list[dict], i: int) -> list[Segment]:
        """One ``tool`` message; the first/last of a run opens/closes the shared user turn."""
        segs: list[Segment] = []
        if i == 0 or messages[i - 1]['role'] != 'tool':
            segs.append(glue(f'{self.begin}user'))
        segs += [glue('\n<tool_response>\n'), Segment(messages[i]['content'], 'tool', i), glue('\n</tool_response>')]
        if i == len(messages) - 1 or messages[i + 1]['role'] != 'tool':
            segs.append(glue(f'{self.end}\n'))
        return segs


class Qwen2_5Template(_QwenBase):
    """Qwen2.5-Instruct: ChatML, default system "You are Qwen, created by Alibaba Cloud. ..."."""
    name = 'qwen2_5'
    default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'

    def render(self, messages, tools=None, add_generation_prompt=False):
        segs: list[Segment] = []
        if messages[0]['role'] != 'system':
            segs += self._turn('system', self.default_system, None)
        for i, m in enumerate(messages):
            self._check_role(m, i)
            if m['role'] == 'tool':
                segs += self._tool(messages, i)
            else:
                segs += self._turn(m['role'], m['content'], i, m.get('loss'))
        if add_generation_prompt:
            segs.append(glue(f'{self.begin}assistant\n'))
        return segs


def split_reasoning(message: dict) -> tuple[str, str]:
    """``(reasoning, content)`` the way Qwen3's template reads an assistant message.

    A ``reasoning_content`` field wins (content used as is); otherwise, when the content holds
    ``</think>``, the text before it (after any ``<think>``) is the reasoning and the text after
    it, without leading newlines, is the answer.
    """
    content = message['content']
    if message.get('reasoning_content') is not None:
        return message['reasoning_content'], content
    if '</think>' in content:
        before, _, _ = content.partition('</think>')
        answer = content.split('</think>')[-1].lstrip('\n')
        return before.rstrip('\n').split('<think>')[-1].lstrip('\n'), answer
    return '', content


class Qwen3Template(_QwenBase):
    """Qwen3 (hybrid thinking), reproducing these rules of its official template:

    1. no default system prompt;
    2. the *last query* is the last user message that is not a tool result (content wrapped in
       ``<tool_response>...</tool_response>``); assistant turns up to it ("history") are rendered
       with their reasoning removed (answer only);
    3. an assistant turn after the last query is rendered as
       ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` when it is the last message or has
       reasoning; otherwise answer only (intermediate tool-calling turns without reasoning);
    4. ``enable_thinking=False`` appends ``<think>\\n\\n</think>\\n\\n`` to the generation prompt.

    Our one addition (same text, different labels): with ``enable_thinking=False`` a final
    assistant turn without reasoning starts with that same empty think block, which is then
    part of the prompt (not trained) since at inference the template writes it, not the model.
    """
    name = 'qwen3'
    default_system = None

    def __init__(self, tokenizer, *args, enable_thinking: bool = True, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        self.enable_thinking = enable_thinking

    @staticmethod
    def last_query_index(messages: list[dict]) -> int:
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if m['role'] == 'user' and not (m['content'].startswith('<tool_response>')
                                            and m['content'].endswith('</tool_response>')):
                return i
        return len(messages) - 1

    def render(self, messages, tools=None, add_generation_prompt=False):
        segs: list[Segment] = []
        last_query = self.last_query_index(messages)
        for i, m in enumerate(messages):
            self._check_role(m, i)
            if m['role'] == 'tool':
                segs += self._tool(messages, i)
            elif m['role'] == 'assistant':
                segs += self._assistant(m, i, i > last_query, i == len(messages) - 1)
            else:
                segs += self._turn(m['role'], m['content'], i, m.get('loss'))
        if add_generation_prompt:
            segs.append(glue(f'{self.begin}assistant\n'))
            if not self.enable_thinking:
                segs.append(glue('<think>\n\n</think>\n\n'))
        return segs

    def _assistant(self, m: dict, i: int, after_last_query: bool, is_last: bool) -> list[Segment]:
        reasoning, answer = split_reasoning(m)
        segs = [glue(f'{self.begin}assistant\n')]
        if after_last_query and (is_last or reasoning):
            think = f'<think>\n{reasoning.strip(chr(10))}\n</think>\n\n'
            if is_last and not self.enable_thinking and think == '<think>\n\n</think>\n\n':
                segs.append(glue(think))  # written by the template at inference: prompt, not target
                body = answer.lstrip('\n')
            else:
                body = think + answer.lstrip('\n')
        else:
            body = answer
        return segs + assistant_segments(body, self.end, m, i) + [glue('\n')]
