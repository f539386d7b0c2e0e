"""Any OpenAI-compatible server (vLLM, SGLang, LMDeploy, `megaswift deploy`, a hosted API) as an engine."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..utils.http import request_json, stream_sse
from .base import InferEngine
from .protocol import (ChatCompletionChoice, ChatCompletionResponse, ChatMessage, InferRequest, RequestConfig,
                       UsageInfo)

logger = logging.getLogger(__name__)


class ClientEngine(InferEngine):
    """``base_url`` is the API root (``http://host:port/v1``). ``model`` defaults to the server's first model.

    Requests run concurrently (``max_workers``); each asks for ``n`` choices in one call.
    With ``stream=True`` in the request config the reply is read as Server-Sent Events.
    """

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str = 'EMPTY',
                 timeout: float = 600, max_workers: int = 16, max_retries: int = 3, retry_backoff: float = 1.0,
                 extra_body: dict | None = None, torch_dtype: Any = None):
        if not base_url:
            raise ValueError('the client engine needs a server: --engine_kwargs \'{"base_url": "http://host:port/v1"}\'')
        self.base_url = base_url.rstrip('/')
        self.api_key, self.timeout, self.max_workers = api_key, timeout, max(1, max_workers)
        self.retry = dict(max_retries=max_retries, retry_backoff=retry_backoff)
        self.extra_body = dict(extra_body or {})
        self.model_name = model or self._first_model()

    def _first_model(self) -> str:
        reply = request_json(f'{self.base_url}/models', None, self.api_key, self.timeout, **self.retry)
        models = [m.get('id') for m in reply.get('data', [])]
        if not models:
            raise ValueError(f'{self.base_url}/models lists no model; pass --model')
        return models[0]

    def _payload(self, request: InferRequest, cfg: RequestConfig) -> dict:
        body = dict(self.extra_body, model=self.model_name, messages=request.messages, n=cfg.n,
                    temperature=cfg.temperature, top_p=cfg.top_p, stream=cfg.stream)
        if request.tools:
            body['tools'] = request.tools
        if cfg.max_tokens is not None:
            body['max_tokens'] = cfg.max_tokens
        if cfg.top_k and cfg.top_k > 0:
            body['top_k'] = cfg.top_k  # vLLM / SGLang / megaswift extension of the OpenAI schema
        if cfg.seed is not None:
            body['seed'] = cfg.seed
        if cfg.stop:
            body['stop'] = cfg.stop
        if cfg.repetition_penalty != 1.0:
            body['repetition_penalty'] = cfg.repetition_penalty
        return body

    def _one(self, request: InferRequest, cfg: RequestConfig) -> ChatCompletionResponse:
        url = f'{self.base_url}/chat/completions'
        payload = self._payload(request, cfg)
        if not cfg.stream:
            response = ChatCompletionResponse.from_dict(
                request_json(url, payload, self.api_key, self.timeout, **self.retry))
        else:
            response = self._collect_stream(url, payload)
        if len(response.choices) != cfg.n:
            raise ValueError(f'{url} returned {len(response.choices)} choices, {cfg.n} were asked for')
        return response

    def _collect_stream(self, url: str, payload: dict) -> ChatCompletionResponse:
        content: dict[int, list[str]] = {}
        reasoning: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage = UsageInfo()
        model = self.model_name
        for event in stream_sse(url, payload, self.api_key, self.timeout, **self.retry):
            model = event.get('model', model)
            if event.get('usage'):
                u = event['usage']
                usage = UsageInfo(u.get('prompt_tokens', 0), u.get('completion_tokens', 0), u.get('total_tokens', 0))
            for c in event.get('choices') or []:
                i = c.get('index', 0)
                delta = c.get('delta') or {}
                content.setdefault(i, []).append(delta.get('content') or '')
                reasoning.setdefault(i, []).append(delta.get('reasoning_content') or delta.get('reasoning') or '')
                if c.get('finish_reason'):
                    finish[i] = c['finish_reason']
        choices = [ChatCompletionChoice(index=i, message=ChatMessage('assistant', ''.join(content[i]),
                                                                     ''.join(reasoning[i]) or None),
                                        finish_reason=finish.get(i)) for i in sorted(content)]
        return ChatCompletionResponse(model=model, choices=choices, usage=usage)

    def infer(self, requests: list[InferRequest], request_config: RequestConfig) -> list[ChatCompletionResponse]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(requests))) as pool:
            return list(pool.map(lambda r: self._one(r, request_config), requests))
