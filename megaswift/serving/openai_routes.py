"""OpenAI-compatible routes over any InferEngine: ``GET /v1/models`` and ``POST /v1/chat/completions``
(``n``, ``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``seed``, ``stop``, ``stream``, ``logprobs``,
``top_logprobs``, ``tools``), streamed as Server-Sent Events with ``stream``.

Requests go through the app's limits (``app.py``) and are batched by ``DynamicBatcher``.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..infer_engine import ChatCompletionChoice, ChatMessage, InferEngine, InferRequest, RequestConfig
from ..template.agent import AgentTemplate, get_agent_template
from .app import APIError, build_app, read_json, require_api_key
from .batcher import DynamicBatcher, EngineStream
from .limits import ServerLimits
from .openai_protocol import ChatCompletionRequest, to_engine, uses_tools, with_tool_calls

logger = logging.getLogger(__name__)


def _engine_error(e: Exception) -> APIError:
    """A request the engine refused (e.g. a prompt longer than the context) is the client's error; anything
    else is the server's."""
    if isinstance(e, TimeoutError):
        return APIError(503, 'the request timed out (--request_timeout); the server may be overloaded', code='timeout')
    if isinstance(e, ValueError):
        return APIError(400, str(e), code='invalid_request')
    logger.error('the engine failed', exc_info=e)
    return APIError(500, f'{type(e).__name__}: {e}', code='engine_error')


class OpenAIRoutes:
    """The routes' state: the engine's batcher, the served name and the agent template for tool calls."""

    def __init__(self, batcher: DynamicBatcher, model_name: str, agent_template: AgentTemplate | None):
        self.batcher, self.model_name, self.agent_template = batcher, model_name, agent_template
        self.router = APIRouter(prefix='/v1', dependencies=[Depends(require_api_key)])
        self.router.add_api_route('/models', self.models, methods=['GET'])
        self.router.add_api_route('/chat/completions', self.chat_completions, methods=['POST'])

    async def models(self) -> dict[str, Any]:
        return {'object': 'list', 'data': [{'id': self.model_name, 'object': 'model', 'created': 0,
                                            'owned_by': 'megaswift'}]}

    async def chat_completions(self, http_request: Request):
        body = await read_json(http_request, ChatCompletionRequest)
        if body.model not in (None, self.model_name):
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           'model', 'model_not_found')
        limits: ServerLimits = http_request.app.state.limits
        request, cfg = to_engine(body, limits, self.agent_template)
        if cfg.logprobs and not self.batcher.engine.supports_logprobs:
            raise APIError(400, f'the {type(self.batcher.engine).__name__} does not return logprobs', 'logprobs',
                           'unsupported_value')
        tools = self.agent_template if uses_tools(body) and self.agent_template is not None else None
        if cfg.stream:
            return await self._stream(request, cfg, limits, tools)
        try:
            response = await self.batcher.infer(request, cfg, limits.timeout)
        except Exception as e:
            raise _engine_error(e) from None
        response.model = self.model_name
        if tools is not None:
            response.choices = [with_tool_calls(c, tools) for c in response.choices]
        return JSONResponse(asdict(response))

    async def _stream(self, request: InferRequest, cfg: RequestConfig, limits: ServerLimits,
                      tools: AgentTemplate | None):
        stream = self.batcher.stream(request, cfg, limits.timeout)
        try:  # errors before the first step (a prompt too long, a timeout waiting) get a proper status
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            stream.close()
            raise _engine_error(e) from None
        events = self._events(stream, first, cfg, tools)
        return StreamingResponse(events, media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})

    async def _events(self, stream: EngineStream, first, cfg: RequestConfig,
                      tools: AgentTemplate | None) -> AsyncIterator[str]:
        """SSE chunks: the role in each choice's first delta, then text deltas (and logprobs), the finish
        reason on the last. With tools the text is held back and sent whole at the end, parsed for calls."""
        rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
        started, held = [False] * cfg.n, [''] * cfg.n
        held_logprobs: list[list] = [[] for _ in range(cfg.n)]

        def chunk(choices: list[dict]) -> str:
            body = {'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': self.model_name,
                    'choices': choices}
            return f'data: {json.dumps(body, ensure_ascii=False)}\n\n'

        def delta(k: int, fields: dict) -> dict:
            if not started[k]:
                started[k], fields = True, {'role': 'assistant', **fields}
            return fields

        try:
            step = first
            while step is not None:
                offset, deltas, finish, logprobs = step  # the choices offset, offset + 1, ... of one piece
                choices = []
                for i, text in enumerate(deltas):
                    k = offset + i
                    new_logprobs = [asdict(x) for x in logprobs[i]] if logprobs is not None else None
                    if tools is not None:  # held back until the end
                        held[k] += text
                        held_logprobs[k] += new_logprobs or []
                        continue
                    if text or new_logprobs or finish or not started[k]:
                        choices.append({'index': k, 'delta': delta(k, {'content': text}),
                                        'logprobs': {'content': new_logprobs} if new_logprobs is not None else None,
                                        'finish_reason': finish[i] if finish else None})
                if tools is not None and finish:
                    choices = [self._whole_choice(k, held[k], finish[k - offset],
                                                  held_logprobs[k] if cfg.logprobs else None, tools, delta)
                               for k in range(offset, offset + len(deltas))]
                if choices:
                    yield chunk(choices)
                step = await anext(stream, None)
            yield 'data: [DONE]\n\n'
        except Exception as e:  # after the 200 status: an error event, which OpenAI clients raise
            err = _engine_error(e)
            body = {'error': {'message': err.message, 'type': 'server_error', 'param': None, 'code': err.code}}
            yield f'data: {json.dumps(body, ensure_ascii=False)}\n\n'
        finally:
            stream.close()

    def _whole_choice(self, k: int, text: str, finish: str, logprobs: list | None, tools: AgentTemplate,
                      delta) -> dict:
        choice = with_tool_calls(ChatCompletionChoice(k, ChatMessage('assistant', text), finish), tools)
        fields: dict[str, Any] = {'content': choice.message.content}
        if choice.message.tool_calls:
            fields['tool_calls'] = [{'index': i, **call} for i, call in enumerate(choice.message.tool_calls)]
        return {'index': k, 'delta': delta(k, fields), 'finish_reason': choice.finish_reason,
                'logprobs': {'content': logprobs} if logprobs is not None else None}


def add_openai_routes(app: FastAPI, engine: InferEngine, model_name: str | None = None, max_batch_size: int = 32,
                      agent_template: str | None = 'hermes', lock=None) -> OpenAIRoutes:
    """The OpenAI routes over ``engine`` on ``app`` (``lock``: held while the engine generates; default its own)."""
    routes = OpenAIRoutes(DynamicBatcher(engine, max_batch_size, lock=lock), model_name or engine.model_name,
                          get_agent_template(agent_template) if agent_template else None)
    app.include_router(routes.router)
    app.state.openai_routes = routes
    return routes


def create_openai_app(engine: InferEngine, model_name: str | None = None, limits: ServerLimits | None = None,
                      api_key: str | None = None, max_batch_size: int = 32,
                      agent_template: str | None = 'hermes') -> FastAPI:
    """The ``megaswift deploy`` app: the shared stack (``build_app``) with the OpenAI routes over ``engine``."""
    app = build_app(limits, api_key, title='megaswift deploy')
    add_openai_routes(app, engine, model_name, max_batch_size, agent_template)
    return app

