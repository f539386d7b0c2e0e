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


GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding


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
    logprobs: bool = False  # per-token log-probs of the sampled tokens (engines with ``supports_logprobs``)
    top_logprobs: int = 0   # with ``logprobs``: also the k most likely tokens at each step

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f'RequestConfig.n must be >= 1, got {self.n}')
        if self.temperature < 0:
            raise ValueError(f'RequestConfig.temperature must be >= 0, got {self.temperature}')
        if self.temperature < GREEDY_BELOW:  # dividing the logits by it would overflow float32
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise ValueError(f'RequestConfig.top_p must be in (0, 1], got {self.top_p}')
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f'RequestConfig.max_tokens must be >= 1, got {self.max_tokens}')
        if self.top_logprobs < 0 or (self.top_logprobs and not self.logprobs):
            raise ValueError(f'RequestConfig.top_logprobs must be >= 0 and needs logprobs=True, '
                             f'got {self.top_logprobs}')


@dataclass
class ChatMessage:
    role: str
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI form: {id, type: 'function', function: {name, arguments}}


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int] | None = None


@dataclass
class TokenLogprob:
    """One generated token: its log-prob under the model (before temperature / top-p) and the top alternatives."""
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class ChoiceLogprobs:
    content: list[TokenLogprob]


@dataclass
class ChatCompletionChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None = None  # 'stop' | 'length' | 'tool_calls'
    token_ids: list[int] | None = None
    logprobs: ChoiceLogprobs | None = None


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
                                    reasoning_content=msg.get('reasoning_content') or msg.get('reasoning'),
                                    tool_calls=msg.get('tool_calls') or None),
                finish_reason=c.get('finish_reason'),
                token_ids=c.get('token_ids'),
                logprobs=_logprobs_from_dict(c.get('logprobs'))))
        u = body.get('usage') or {}
        usage = UsageInfo(u.get('prompt_tokens', 0), u.get('completion_tokens', 0), u.get('total_tokens', 0))
        return cls(model=body.get('model', ''), choices=choices, usage=usage,
                   id=body.get('id') or f'chatcmpl-{uuid.uuid4().hex}')


def _logprobs_from_dict(body: dict[str, Any] | None) -> ChoiceLogprobs | None:
    if not body or body.get('content') is None:
        return None
    return ChoiceLogprobs([TokenLogprob(t['token'], t['logprob'], t.get('bytes'),
                                        [TopLogprob(x['token'], x['logprob'], x.get('bytes'))
                                         for x in t.get('top_logprobs') or []]) for t in body['content']])
