"""``megaswift rollout``: the routes a trainer needs, on the shared FastAPI stack (``serving/app.py``).

- ``GET /health`` (no key), ``GET /info``: model, backend, world size (the server's workers), weights version,
  the weight-sync bucket size trainers should use (``--weight_sync_bucket_mb``), how the weight-sync group is
  formed (``weight_sync_protocol``, an engine attribute: ``megaswift`` or ``named_group``, ``weight_sync.py``),
  with ``--data_parallel_size`` > 1 also ``replicas`` (each one's pid, device, rows generated, weights version,
  alive);
- ``POST /infer``: a batch of ``{prompt_token_ids | messages, n, temperature, top_p, top_k, max_tokens, seed}``
  -> per completion ``token_ids``, per-token ``logprobs``, ``finish_reason``; every reply carries the
  ``weights_version`` its completions were generated with;
- ``POST /init_communicator``, ``/update_weights``, ``/close_communicator``: the weight-sync group and its
  buckets (``weight_sync.py``); ``POST /reset_prefix_cache``.

Engine work and the broadcasts run in worker threads, so the event loop keeps answering ``/health``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator

from ..serving.app import APIError, build_app, read_json, require_api_key
from ..serving.limits import ServerLimits
from ..serving.openai_protocol import ChatMessageIn, plain_messages
from .engine import SamplingRequest
from .weight_sync import DEFAULT_BUCKET_MB, DTYPES, WeightSyncError, nbytes

logger = logging.getLogger(__name__)


class RolloutRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    prompt_token_ids: list[NonNegativeInt] | None = None
    messages: list[ChatMessageIn] | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_tokens: int = Field(256, ge=1)
    seed: int | None = None

    @model_validator(mode='after')
    def _one_prompt(self):
        if (self.prompt_token_ids is None) == (self.messages is None):
            raise ValueError('give exactly one of prompt_token_ids and messages')
        return self


class InferBody(BaseModel):
    requests: list[RolloutRequest] = Field(min_length=1)


class InitCommunicatorBody(BaseModel):
    host: str
    port: int = Field(ge=1, lt=65536)
    world_size: int = Field(ge=2)
    backend: str = 'gloo'
    timeout_s: float = Field(600.0, gt=0)


class UpdateWeightsBody(BaseModel):
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    last: bool = False
    nbytes: int | None = None  # the trainer's count of the bucket's bytes, checked against the layout

    @model_validator(mode='after')
    def _aligned(self):
        if not len(self.names) == len(self.shapes) == len(self.dtypes):
            raise ValueError('names, shapes and dtypes must have the same length')
        unknown = sorted(set(self.dtypes) - set(DTYPES))
        if unknown:
            raise ValueError(f'unknown dtypes {unknown} (known: {sorted(DTYPES)})')
        return self


class RolloutRoutes:
    def __init__(self, engine, limits: ServerLimits, bucket_mb: float = DEFAULT_BUCKET_MB):
        self.engine, self.limits, self.bucket_mb = engine, limits, bucket_mb
        self.vocab_size = _vocab_size(engine)
        self.router = APIRouter(dependencies=[Depends(require_api_key)])
        for path, fn, method in (('/info', self.info, 'GET'), ('/infer', self.infer, 'POST'),
                                 ('/init_communicator', self.init_communicator, 'POST'),
                                 ('/update_weights', self.update_weights, 'POST'),
                                 ('/reset_prefix_cache', self.reset_prefix_cache, 'POST'),
                                 ('/close_communicator', self.close_communicator, 'POST')):
            self.router.add_api_route(path, fn, methods=[method])

    async def info(self) -> dict[str, Any]:
        e = self.engine
        info = {'model': e.model_name, 'backend': e.backend, 'world_size': e.world_size,
                'weights_version': e.weights_version, 'prefix_cache_resets': e.prefix_cache_resets,
                'communicator': e.has_communicator, 'weight_sync_bucket_mb': self.bucket_mb,
                'weight_sync_protocol': getattr(e, 'weight_sync_protocol', 'megaswift')}
        if hasattr(e, 'replicas_info'):  # --data_parallel_size > 1: per replica pid, device, rows generated
            info['replicas'] = e.replicas_info()
        return info

    async def infer(self, request: Request) -> dict[str, Any]:
        body = await read_json(request, InferBody)
        reqs = []
        for i, r in enumerate(body.requests):
            if r.n > self.limits.max_n:
                raise APIError(400, f'requests[{i}].n = {r.n} is over the limit of {self.limits.max_n} (--max_n)',
                               f'requests.{i}.n')
            if r.max_tokens > self.limits.max_tokens_cap:
                raise APIError(400, f'requests[{i}].max_tokens = {r.max_tokens} is over the limit of '
                                    f'{self.limits.max_tokens_cap} (--max_tokens_cap)', f'requests.{i}.max_tokens')
            if r.prompt_token_ids is not None:
                ids = r.prompt_token_ids
                if ids and self.vocab_size is not None and max(ids) >= self.vocab_size:
                    raise APIError(400, f'requests[{i}].prompt_token_ids holds {max(ids)}, out of the model\'s '
                                        f'vocabulary of {self.vocab_size}', f'requests.{i}.prompt_token_ids')
            else:
                ids = self.engine.prompt_ids(plain_messages(r.messages, f'requests.{i}.messages'))
            reqs.append(SamplingRequest(ids, r.n, r.temperature, r.top_p, r.top_k, r.max_tokens, r.seed))
        try:
            results, version = await asyncio.wait_for(asyncio.to_thread(self.engine.infer, reqs),
                                                      self.limits.timeout)
        except TimeoutError:
            raise APIError(503, 'the request timed out (--request_timeout)', code='timeout') from None
        except ValueError as e:
            raise APIError(400, str(e), code='invalid_request') from None
        return {'weights_version': version, 'model': self.engine.model_name,
                'results': [{'prompt_token_ids': r.prompt_token_ids, 'completions': c} for r, c in zip(reqs, results)]}

    async def init_communicator(self, request: Request) -> dict[str, Any]:
        body = await read_json(request, InitCommunicatorBody)
        workers = self.engine.world_size
        if body.world_size != 1 + workers:
            raise APIError(400, f'world_size {body.world_size}: this server has {workers} worker(s), so the '
                                f'group has {1 + workers} ranks (trainer rank 0 + workers)', 'world_size')
        if body.backend not in ('gloo', 'nccl'):
            raise APIError(400, f"backend {body.backend!r}: gloo or nccl", 'backend')
        try:
            await asyncio.to_thread(self.engine.join_communicator, body.host, body.port, body.world_size, 1,
                                    body.backend, body.timeout_s)
        except Exception as e:  # noqa: BLE001
            raise APIError(500, f'could not join the weight-sync group at {body.host}:{body.port}: '
                                f'{type(e).__name__}: {e}', code='communicator_error') from None
        return {'status': 'ok', 'ranks': list(range(1, body.world_size)), 'world_size': body.world_size}

    async def update_weights(self, request: Request) -> dict[str, Any]:
        body = await read_json(request, UpdateWeightsBody)
        layout = {'names': body.names, 'shapes': body.shapes, 'dtypes': body.dtypes}
        expected = sum(nbytes(s, d) for s, d in zip(body.shapes, body.dtypes))
        if body.nbytes is not None and body.nbytes != expected:
            raise APIError(400, f'nbytes {body.nbytes} does not match the layout ({expected} bytes)', 'nbytes')
        if not self.engine.has_communicator:
            raise APIError(400, 'no communicator: call /init_communicator first', code='no_communicator')
        try:
            version = await asyncio.to_thread(self.engine.update_weights, layout, body.last)
        except WeightSyncError as e:
            raise APIError(400, str(e), code='invalid_weights') from None
        except Exception as e:  # noqa: BLE001 - e.g. the trainer died mid-broadcast
            logger.error('weight update failed', exc_info=e)
            raise APIError(500, f'weight update failed: {type(e).__name__}: {e}', code='weight_sync_error') from None
        return {'status': 'ok', 'weights_version': version, 'received': len(body.names)}

    async def reset_prefix_cache(self) -> dict[str, Any]:
        await asyncio.to_thread(self.engine.reset_prefix_cache)
        return {'status': 'ok'}

    async def close_communicator(self) -> dict[str, Any]:
        await asyncio.to_thread(self.engine.close_communicator)
        return {'status': 'ok'}


def _vocab_size(engine) -> int | None:
    """The token ids the engine's model takes (its embedding rows, or its tokenizer's ids); None: unknown."""
    config = getattr(getattr(engine, 'model', None), 'config', None)
    tokenizer = getattr(engine, 'tokenizer', None)
    sizes = [getattr(config, 'vocab_size', None), len(tokenizer) if tokenizer is not None else None]
    return max((size for size in sizes if size), default=None)


def create_rollout_app(engine, limits: ServerLimits | None = None, api_key: str | None = None,
                       bucket_mb: float = DEFAULT_BUCKET_MB, agent_template: str | None = 'hermes') -> FastAPI:
    """The rollout routes on the shared app; ``bucket_mb`` is the bucket size advertised to trainers by /info.
    An engine with an ``infer_engine`` (the transformers backend) also serves the OpenAI routes of ``megaswift
    deploy`` (``/v1/chat/completions``, ``/v1/models``) on the same weights, generating under the lock weight
    updates take, so an agent or evaluator can talk to the policy being trained."""
    limits = limits or ServerLimits()
    app = build_app(limits, api_key, title='megaswift rollout')
    routes = RolloutRoutes(engine, limits, bucket_mb)
    app.include_router(routes.router)
    app.state.rollout = routes
    if getattr(engine, 'infer_engine', None) is not None:
        from ..serving.openai_routes import add_openai_routes
        add_openai_routes(app, engine.infer_engine, engine.model_name, agent_template=agent_template,
                          lock=engine.lock)
    return app
