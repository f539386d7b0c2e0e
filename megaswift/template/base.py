"""Template: dataset row -> ``input_ids``, ``labels`` (and ``loss_scale`` when not binary).

Subclasses only ``render`` chat messages into segments (see ``segments.py``); the base class
applies the agent template, the system override, the loss scale, tokenisation with character
offsets (so each token is attributed to the segment its first character belongs to), the
modes and truncation. Modes: 'train' (``input_ids``, ``labels``[, ``loss_scale``]), 'infer' (the prompt's
``input_ids``), 'rlhf' (a preference pair: ``chosen_*`` and ``rejected_*`` columns and a scalar ``margin``) and
'kto' (the row's columns, a scalar ``label`` and ``kl_*`` columns); see ``preference.py`` for the row formats.
"""
from __future__ import annotations

import bisect
import json
from typing import Any

from ..utils.constants import IGNORE_INDEX
from .agent import get_agent_template
from .errors import MaxLengthExceeded, TemplateError
from .loss_scale import get_loss_scale
from .preference import completion_messages, kl_conversation, kto_label, pair_margin, rejected_conversation, relabelled
from .segments import Segment, join_text

MODES = ('train', 'infer', 'rlhf', 'kto')
TRUNCATION_STRATEGIES = ('delete', 'left', 'right', 'error')


class Template:
    name = 'base'
    default_system: str | None = None
    default_agent_template = 'hermes'

    def __init__(self, tokenizer, agent_template: str | None = None, loss_scale: str = 'default',
                 system: str | None = None, max_length: int | None = None, truncation_strategy: str = 'delete'):
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(f"truncation_strategy must be one of {TRUNCATION_STRATEGIES}, got '{truncation_strategy}'")
        self.tokenizer = tokenizer
        self.agent_template = get_agent_template(agent_template or self.default_agent_template)
        self.loss_scale = get_loss_scale(loss_scale)
        self.system = system
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.mode = 'train'

    # ------------------------------------------------------------------ to implement
    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> list[Segment]:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared post-processing
    def render_segments(self, messages: list[dict], tools: list[dict] | None = None,
                        add_generation_prompt: bool = False) -> list[Segment]:
        """``render`` plus the rules every template shares (applied here once, not per template):

        - an assistant segment ``content + end-of-turn`` is split in two, so a loss scale keyed on the
          content never leaks its weight onto the end token;
        - character ranges an agent template marks as tool output inside an assistant turn
          (``message['tool_spans']``, e.g. a ReAct ``Observation:`` result) become untrainable
          ``tool`` segments: tool output is never trained, whatever the loss scale;
        - messages an agent template marks ``tool_response`` (rendered as e.g. a user turn) are
          ``tool`` segments, so strategies such as ``last_round`` do not take them for user queries.
        """
        out: list[Segment] = []
        for seg in self.render(messages, tools, add_generation_prompt):
            msg = messages[seg.message_index] if seg.message_index is not None else None
            if msg is not None and msg.get('tool_response'):
                seg = Segment(seg.text, 'tool', seg.message_index, False, seg.loss)
            if msg is None or not seg.trainable:
                out.append(seg)
                continue
            content = msg.get('content') or ''
            if not content or not seg.text.startswith(content):  # the template rewrote the content
                out.append(seg)
                continue
            out += _split_spans(seg, content, msg.get('tool_spans') or [])
            if len(seg.text) > len(content):
                out.append(Segment(seg.text[len(content):], seg.role, seg.message_index, True, seg.loss))
        return out

    def _open_turn(self, messages: list[dict], tools: list[dict] | None) -> list[Segment]:
        """The conversation up to the end of the last assistant content, without its end token."""
        last, content = len(messages) - 1, messages[-1]['content']
        out, consumed = [], 0
        for seg in self.render_segments(messages, tools):
            if seg.message_index == last:
                if consumed >= len(content):
                    return out
                consumed += len(seg.text)
            out.append(seg)
        raise TemplateError('cannot continue the last assistant turn: the template rewrites its content', 'messages')

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
        self.mode = mode

    # ------------------------------------------------------------------ messages
    def chat_messages(self, row: dict) -> tuple[list[dict], list[dict] | None]:
        """The row's messages after the agent template and the system override."""
        messages = row.get('messages')
        if not isinstance(messages, list) or not messages:
            raise TemplateError('must be a non-empty list of messages', 'messages')
        tools = row.get('tools') or None
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise TemplateError(f'is not valid JSON ({e.msg})', 'tools') from None
        if self.system is not None:  # before the agent template, which may add tool descriptions to the system
            if messages[0]['role'] == 'system':
                messages = [{**messages[0], 'content': self.system}] + messages[1:]
            else:
                messages = [{'role': 'system', 'content': self.system}] + messages
        return self.agent_template.to_chat(messages, tools, default_system=self.default_system), tools

    # ------------------------------------------------------------------ encoding
    def encode(self, row: dict) -> dict[str, Any]:
        if self.mode == 'infer':
            messages, tools = self.chat_messages(row)
            if row['messages'][-1]['role'] in ('tool_response', 'tool') and messages[-1]['role'] == 'assistant':
                segments = self._open_turn(messages, tools)  # ReAct / Qwen: the model continues its turn
            else:
                if messages[-1]['role'] == 'assistant':
                    messages = messages[:-1]
                segments = self.render_segments(messages, tools, add_generation_prompt=True)
            ids, _ = self._tokenize(segments, with_weights=False)
            return {'input_ids': self._truncate_prompt(ids)}
        if self.mode == 'rlhf':
            return self._encode_pair(row)
        if self.mode == 'kto':
            return self._encode_kto(row)
        return self._encode_train(row)

    def _encode_pair(self, row: dict) -> dict[str, Any]:
        """``chosen_*`` and ``rejected_*`` columns and the ``margin``; a side over max_length ('delete') skips the
        pair as a whole (``MaxLengthExceeded`` from either side)."""
        completion_messages(row)
        rejected_messages, source = rejected_conversation(row)
        margin = pair_margin(row)
        chosen = self._encode_train(row)
        rejected = self._encode_second(row, rejected_messages, source)
        return {**{f'chosen_{k}': v for k, v in chosen.items()},
                **{f'rejected_{k}': v for k, v in rejected.items()}, 'margin': margin}

    def _encode_kto(self, row: dict) -> dict[str, Any]:
        """The row's columns, its ``label`` (0/1) and ``kl_*``: the prompt answered with ``kl_response``."""
        completion_messages(row, what='the completion')
        label = kto_label(row)
        kl = self._encode_second(row, kl_conversation(row), 'kl_response')
        return {**self._encode_train(row), 'label': label, **{f'kl_{k}': v for k, v in kl.items()}}

    def _encode_second(self, row: dict, messages: list[dict], source: str) -> dict[str, Any]:
        """A second conversation of the row (built from its column ``source``); errors name that column."""
        try:
            return self._encode_train({**row, 'messages': messages})
        except TemplateError as e:
            raise relabelled(e, source, len(messages) - 1) from None

    def _encode_train(self, row: dict) -> dict[str, Any]:
        messages, tools = self.chat_messages(row)
        if not any(m['role'] == 'assistant' for m in messages) and self.loss_scale.base_strategy != 'all':
            raise TemplateError('has no assistant turn to train on', 'messages')
        segments = self.render_segments(messages, tools, add_generation_prompt=False)
        ids, weights = self._tokenize(segments, with_weights=True)
        ids, weights = self._truncate(ids, weights)
        labels = [t if w > 0 else IGNORE_INDEX for t, w in zip(ids, weights)]
        out: dict[str, Any] = {'input_ids': ids, 'labels': labels}
        if any(w not in (0.0, 1.0) for w in weights):
            out['loss_scale'] = weights
        return out

    def _tokenize(self, segments: list[Segment], with_weights: bool) -> tuple[list[int], list[float]]:
        pieces = self.loss_scale.apply(segments) if with_weights else [(join_text(segments), 0.0)]
        text = ''.join(p for p, _ in pieces)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc['input_ids'])
        if not with_weights:
            return ids, []
        starts, pos = [], 0
        for piece, _ in pieces:
            starts.append(pos)
            pos += len(piece)
        # A token's weight is the smallest weight among the pieces its characters fall in: a token that
        # straddles a boundary (' SEC' of ' SECRET' after 'Observation:') never trains a masked character.
        weights = []
        for start, end in enc['offset_mapping']:
            first = bisect.bisect_right(starts, start) - 1
            last = max(first, bisect.bisect_left(starts, max(end, start + 1)) - 1)
            weights.append(min(pieces[k][1] for k in range(first, last + 1) if pieces[k][0] or k == first))
        return ids, weights

    def _truncate(self, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, weights
        n = self.max_length
        if self.truncation_strategy == 'left':
            return ids[-n:], weights[-n:]
        if self.truncation_strategy == 'right':
            return ids[:n], weights[:n]
        if self.truncation_strategy == 'delete':
            raise MaxLengthExceeded(f'{len(ids)} tokens exceed max_length {n}', 'messages')
        raise TemplateError(f'{len(ids)} tokens exceed max_length {n} (truncation_strategy error)', 'messages')

    def _truncate_prompt(self, ids: list[int]) -> list[int]:
        return self._truncate(ids, [0.0] * len(ids))[0]

    # ------------------------------------------------------------------ debugging
    def safe_decode(self, ids: list[int]) -> str:
        """Decode, showing masked label runs as ``[-100 * N]`` instead of failing on them."""
        out, run, buf = [], 0, []
        for t in list(ids) + [None]:
            if t is not None and t < 0:
                if buf:
                    out.append(self.tokenizer.decode(buf))
                    buf = []
                run += 1
                continue
            if run:
                out.append(f'[{IGNORE_INDEX} * {run}]')
                run = 0
            if t is not None:
                buf.append(t)
        if buf:
            out.append(self.tokenizer.decode(buf))
        return ''.join(out)


def _split_spans(seg: Segment, content: str, spans: list) -> list[Segment]:
    """``content`` of a trainable segment cut at the tool-output ``spans`` ([start, end) in content)."""
    out, pos = [], 0
    for start, end in sorted(spans):
        if not 0 <= start <= end <= len(content) or start < pos:
            raise TemplateError(f'tool span {[start, end]} is outside the assistant content or overlaps another',
                                f'messages[{seg.message_index}].tool_spans')
        if start > pos:
            out.append(Segment(content[pos:start], seg.role, seg.message_index, True, seg.loss))
        out.append(Segment(content[start:end], 'tool', seg.message_index, False, seg.loss))
        pos = end
    if pos < len(content):
        out.append(Segment(content[pos:], seg.role, seg.message_index, True, seg.loss))
    return out
