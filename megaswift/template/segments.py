"""A rendered conversation as an ordered list of text segments.

Templates render messages into segments whose texts, concatenated, are exactly the prompt
string the model sees. Each segment says which message it came from and whether it is
trainable (an assistant turn's content plus its end-of-turn token). Loss scales split and
weight segments; the tokenizer's character offsets then map every token to its segment,
so assistant spans are exact and never found by searching the string.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Segment:
    text: str
    role: str                       # 'system' | 'user' | 'assistant' | 'tool' | 'template' (headers, glue)
    message_index: int | None = None  # index into the chat messages; None for template glue
    trainable: bool = False         # assistant content and its end-of-turn text
    loss: float | None = None       # the message's own `loss` field (dataset override), if any


def glue(text: str) -> Segment:
    return Segment(text, 'template')


def join_text(segments: list[Segment]) -> str:
    return ''.join(s.text for s in segments)
