"""The data that crosses the InferEngine boundary.

One schema serves every engine and the OpenAI-compatible server: responses follow
the shape of OpenAI's chat completion objects, so ``dataclasses.asdict`` of a
``ChatCompletionResponse`` is a valid JSON body for ``/v1/chat/completions``.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class InferRequest:
    """One conversation to continue. ``messages`` are OpenAI-style dicts."""
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass
class RequestConfig:
    """Sampling parameters shared by all engines (OpenAI names, plus top_k)."""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    n: int = 1
    seed: int | None = None
    stop: list[str] | None = None
    stream: bool = False
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f'RequestConfig.n must be >= 1, got {self.n}')
        if self.temperature < 0:
            raise ValueError(f'RequestConfig.temperature must be >= 0, got {self.temperature}')
        if not 0 < self.top_p <= 1:
            raise ValueError(f'RequestConfig.top_p must be in (0, 1], got {self.top_p}')
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f'RequestConfig.max_tokens must be >= 1, got {self.max_tokens}')


@dataclass
class ChatMessage:
    role: str
    content: str
    reasoning_content: str | None = None


@dataclass
class ChatCompletionChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None = None  # 'stop' | 'length'
    token_ids: list[int] | None = None


@dataclass
class UsageInfo:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass
class ChatCompletionResponse:
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo = field(default_factory=UsageInfo)
    id: str = field(default_factory=lambda: f'chatcmpl-{uuid.uuid4().hex}')
    object: str = 'chat.completion'
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> 'ChatCompletionResponse':
        """Parse an OpenAI-style JSON body (as returned by vLLM, SGLang or our server)."""
        choices = []
        for i, c in enumerate(body.get('choices') or []):
            msg = c.get('message') or {}
            choices.append(ChatCompletionChoice(
                index=c.get('index', i),
                message=ChatMessage(role=msg.get('role', 'assistant'), content=msg.get('content') or '',
                                    reasoning_content=msg.get('reasoning_content') or msg.get('reasoning')),
                finish_reason=c.get('finish_reason'),
                token_ids=c.get('token_ids')))
        u = body.get('usage') or {}
        usage = UsageInfo(u.get('prompt_tokens', 0), u.get('completion_tokens', 0), u.get('total_tokens', 0))
        return cls(model=body.get('model', ''), choices=choices, usage=usage,
                   id=body.get('id') or f'chatcmpl-{uuid.uuid4().hex}')
