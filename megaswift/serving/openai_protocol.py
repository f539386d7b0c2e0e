"""OpenAI chat-completions requests as pydantic models, and their translation for the engines.

Unknown fields are ignored (as before and as vLLM does), so clients that send extras keep working;
``top_k`` and ``repetition_penalty`` are the usual vLLM / SGLang extensions. Tool calling goes through
megaswift's agent templates: ``tools`` and the OpenAI tool messages (assistant ``tool_calls``, ``tool``
replies) are rendered in the template's format (``--agent_template``, default hermes), and the answer is
parsed back into ``tool_calls`` with the same template.
"""
from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..infer_engine import ChatCompletionChoice, ChatMessage, InferRequest, RequestConfig
from ..template.agent import AgentTemplate
from ..template.agent.base import dump_arguments
from ..template.errors import TemplateError
from .app import APIError
from .limits import ServerLimits


class ContentPart(BaseModel):
    model_config = ConfigDict(extra='allow')
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = '{}'


class ToolCall(BaseModel):
    model_config = ConfigDict(extra='allow')
    id: str | None = None
    type: Literal['function'] = 'function'
    function: FunctionCall


# OpenAI's roles, ``developer`` read as ``system``, and megaswift's agent roles.
Role = Literal['system', 'developer', 'user', 'assistant', 'tool', 'tool_call', 'tool_response']


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra='allow')
    role: Role
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra='allow')
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal['function'] = 'function'
    function: FunctionDef


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra='ignore', allow_inf_nan=False)
    model: str | None = None
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # beyond these the float32 logits overflow
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal['none', 'auto', 'required'] | dict[str, Any] | None = None


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ''
    parts = []
    for i, part in enumerate(content):
        if part.type != 'text' or part.text is None:
            raise APIError(400, f"only text content is supported by this model: content part {i} is of type "
                                f"'{part.type}' (send {{\"type\": \"text\", \"text\": ...}} parts or a string)",
                           f'{where}.content.{i}.type', 'unsupported_content')
        parts.append(part.text)
    return ''.join(parts)


def plain_messages(messages: list[ChatMessageIn], where: str = 'messages') -> list[dict[str, Any]]:
    """Plain dicts, content as one string (text parts joined), ``developer`` read as ``system``; ``where``: the
    messages' place in the body, named by the 400 of a non-text part."""
    out = []
    for i, m in enumerate(messages):
        msg = m.model_dump(exclude_none=True)
        msg['content'] = _text(m.content, f'{where}.{i}')
        if msg['role'] == 'developer':
            msg['role'] = 'system'
        out.append(msg)
    return out


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether the answer is parsed for tool calls: tools were given and ``tool_choice`` is not 'none'."""
    return bool(body.tools) and body.tool_choice != 'none'


def to_engine(body: ChatCompletionRequest, limits: ServerLimits,
              agent_template: AgentTemplate | None) -> tuple[InferRequest, RequestConfig]:
    """Check ``body`` against the limits and turn it into the engine's request and sampling parameters."""
    n = body.n or 1
    if n > limits.max_n:
        raise APIError(400, f"'n' is {n}, more than this server allows ({limits.max_n}, --max_n)", 'n',
                       'n_too_large')
    max_tokens = body.max_tokens or body.max_completion_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise APIError(400, f"'max_tokens' is {max_tokens}, more than this server allows "
                            f'({limits.max_tokens_cap}, --max_tokens_cap)', 'max_tokens', 'max_tokens_too_large')
    if isinstance(body.tool_choice, dict) or body.tool_choice == 'required':
        raise APIError(400, "only tool_choice 'auto' and 'none' are supported", 'tool_choice', 'unsupported_value')
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", 'top_logprobs', 'invalid_value')
    messages = plain_messages(body.messages)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if uses_tools(body) else None
    agent_roles = any(m['role'] in ('tool', 'tool_call', 'tool_response') or m.get('tool_calls') for m in messages)
    if agent_template is not None and (tools or agent_roles):
        try:
            messages = agent_template.to_chat(messages, tools)
        except TemplateError as e:
            raise APIError(400, str(e), 'messages', 'invalid_value') from None
        tools = None
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    try:
        cfg = RequestConfig(max_tokens=max_tokens, temperature=_or(body.temperature, 1.0),
                            top_p=_or(body.top_p, 1.0),
                            top_k=_or(body.top_k, -1), n=n, seed=body.seed, stop=stop or None,
                            stream=bool(body.stream), repetition_penalty=_or(body.repetition_penalty, 1.0),
                            logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return InferRequest(messages=messages, tools=tools), cfg


def _or(value, default):
    return default if value is None else value


def with_tool_calls(choice: ChatCompletionChoice, agent_template: AgentTemplate) -> ChatCompletionChoice:
    """The choice with the tool calls of its text as OpenAI ``tool_calls`` (content then None) and
    ``finish_reason`` 'tool_calls'; unchanged when the text calls no tool."""
    calls = agent_template.get_toolcall(choice.message.content or '')
    if not calls:
        return choice
    tool_calls = [{'id': f'call_{uuid.uuid4().hex[:24]}', 'type': 'function',
                   'function': {'name': c.name, 'arguments': dump_arguments(c.arguments)}} for c in calls]
    message = ChatMessage('assistant', None, choice.message.reasoning_content, tool_calls)
    return ChatCompletionChoice(choice.index, message, 'tool_calls', choice.token_ids, choice.logprobs)
