"""``generic``: any model, driven by the tokenizer's own ``chat_template`` (Jinja).

The prompt text is exactly ``tokenizer.apply_chat_template(messages)``. To find what to train
on, each assistant message ``i`` is located by incremental rendering:

- ``P`` = render(messages[:i], add_generation_prompt=True), the prompt the model answers;
- ``Q`` = render(messages[:i+1]), the same conversation with the answer;
- ``Q`` must start with ``P`` and continue with the message's content (exact, or with the
  surrounding whitespace trimmed, as templates like Llama 3's do), and the full rendering must
  agree with ``Q`` there (later messages must not change how earlier ones are rendered).

Trainable text: that content, plus the end-of-turn text right after it when that is one of the
tokenizer's special tokens (``<|im_end|>``, ``<|eot_id|>``, the eos token, ...). The content of
other messages is found the same way (its last occurrence in the rendering of the conversation up
to it) so loss scales know the user turns; everything else is glue. A template that is not
prefix-stable this way (e.g. one that strips reasoning from earlier turns) raises
``TemplateError``: pick an explicit ``--template`` for it.

Tools are not passed to the chat template: the agent template has already written the tool
descriptions and calls into the messages. Extra template variables (``enable_thinking``, a date,
...) can be given as ``chat_template_kwargs``.
"""
from __future__ import annotations

from ..base import Template
from ..errors import TemplateError
from ..segments import Segment, glue

_HINT = 'pick an explicit --template for this model (see megaswift.template.templates)'


def assistant_segments(body: str, end: str, message: dict, index: int) -> list[Segment]:
    """Trainable segments of an assistant turn rendered as ``body`` + ``end`` (the end-of-turn text).

    When ``body`` ends with the message's content unchanged, that content and ``end`` form one
    segment, which ``Template.render_segments`` splits (content | end token) and cuts at the agent's
    tool-output spans; text the template put before it (e.g. Qwen3's think block) is a segment of its
    own. When the template rewrote the content (stripped reasoning, trimmed whitespace), ``body`` and
    ``end`` are two segments, so the end token still never shares a loss-scale split with the body.
    """
    content, loss = message['content'], message.get('loss')
    if content and body.endswith(content):
        parts = [body[:len(body) - len(content)], content + end]
    else:
        parts = [body, end]
    return [Segment(p, 'assistant', index, trainable=True, loss=loss) for p in parts if p]


class GenericTemplate(Template):
    name = 'generic'

    def __init__(self, tokenizer, *args, chat_template_kwargs: dict | None = None, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        if not getattr(tokenizer, 'chat_template', None):
            raise ValueError("the 'generic' template needs a tokenizer with a chat_template; " + _HINT)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        special = set(tokenizer.all_special_tokens)
        special |= {t.content for t in getattr(tokenizer, 'added_tokens_decoder', {}).values() if t.special}
        self.end_tokens = sorted((t for t in special if t), key=len, reverse=True)

    def apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        msgs = [{k: v for k, v in m.items() if k != 'loss'} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **self.chat_template_kwargs)
        except Exception as e:  # jinja errors, raise_exception(...) in the template
            raise TemplateError(f"the tokenizer's chat template failed on {len(msgs)} message(s): "
                                f'{type(e).__name__}: {e}', 'messages') from None
        if not isinstance(text, str):
            raise TemplateError(f'apply_chat_template returned {type(text).__name__}, expected str', 'messages')
        return text

    def render(self, messages, tools=None, add_generation_prompt=False):
        full = self.apply(messages, add_generation_prompt)
        segs: list[Segment] = []
        pos = 0
        for i, m in enumerate(messages):
            if m['role'] != 'assistant':
                span = self._find_message(messages, i, full, pos)
                if span is not None:  # attribute it (e.g. for --loss_scale last_round); else it stays glue
                    segs += [glue(full[pos:span[0]]), Segment(full[span[0]:span[1]], m['role'], i, loss=m.get('loss'))]
                    pos = span[1]
                continue
            start, body_stop, stop = self._locate(messages, i, full)
            if start < pos:
                raise TemplateError(f'the chat template renders assistant message {i} before the end of the '
                                    f'previous one; {_HINT}', f'messages[{i}]')
            segs.append(glue(full[pos:start]))
            segs += assistant_segments(full[start:body_stop], full[body_stop:stop], m, i)
            pos = stop
        segs.append(glue(full[pos:]))
        return [s for s in segs if s.text]

    def _find_message(self, messages: list[dict], i: int, full: str, pos: int) -> tuple[int, int] | None:
        """Span of a non-assistant message's content in ``full``: its last occurrence in the rendering
        of ``messages[:i+1]``, where that rendering agrees with ``full``; None when not found."""
        try:
            upto = self.apply(messages[:i + 1], False)
        except TemplateError:  # e.g. a template that refuses a conversation ending with a system message
            return None
        content = messages[i]['content']
        for text in dict.fromkeys((content, content.strip())):
            k = upto.rfind(text) if text else -1
            if k >= pos and full.startswith(upto[:k + len(text)]):
                return k, k + len(text)
        return None

    def _empty_prompt(self) -> str:
        try:
            return self.apply([], True)
        except TemplateError:  # many templates index messages[0]
            return ''

    def _locate(self, messages: list[dict], i: int, full: str) -> tuple[int, int, int]:
        """Where assistant message ``i`` starts, its content ends and its end token ends in ``full``."""
        prompt = self.apply(messages[:i], True) if i else self._empty_prompt()
        answered = self.apply(messages[:i + 1], False)
        if not answered.startswith(prompt):
            raise TemplateError(f'the chat template is not prefix-stable: the conversation up to assistant message '
                                f'{i} does not start with its own generation prompt; {_HINT}', f'messages[{i}]')
        content = messages[i]['content']
        rest = answered[len(prompt):]
        for text in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if rest.startswith(text):
                break
        else:
            raise TemplateError(f'the chat template does not render assistant message {i} as its content right '
                                f'after the generation prompt (it rewrites or decorates it); {_HINT}',
                                f'messages[{i}].content')
        start = len(prompt)
        stop = start + len(text)
        if not full.startswith(answered[:stop]):
            raise TemplateError(f'the chat template is not prefix-stable: later messages change how assistant '
                                f'message {i} is rendered; {_HINT}', f'messages[{i}]')
        end = next((t for t in self.end_tokens if answered.startswith(t, stop) and full.startswith(t, stop)), '')
        return start, stop, stop + len(end)
