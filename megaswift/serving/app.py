"""The one HTTP stack of megaswift's servers: a FastAPI app with shared limits, errors and API-key check,
run by uvicorn.

Every server (``megaswift deploy`` today) is ``build_app(limits, api_key)`` plus its routers, served by
``serve(app, bind(host, port))``. What they share:

- errors are OpenAI-style JSON, ``{"error": {"message", "type", "param", "code"}}``, for every status:
  400 (bad JSON, a bad or missing field: FastAPI's 422 validation errors are answered 400, as OpenAI does),
  401 (API key), 404 (route or model), 405, 413 (body over ``max_request_bytes``), 429 (``max_concurrency``
  requests already in flight), 500 (an engine failure), 503 (``request_timeout`` passed);
- a failed request fails alone: the error goes to its client and the server keeps serving;
- ``GET /health`` answers ``{"status": "ok"}`` without a key and is never counted against the limits;
- ``bind`` takes 127.0.0.1 unless told otherwise, and port 0 picks a free port; ``serve`` runs uvicorn on it.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from ..utils.errors import UserError
from .limits import ServerLimits

ModelT = TypeVar('ModelT', bound=BaseModel)
logger = logging.getLogger(__name__)


ERROR_TYPES = {400: 'invalid_request_error', 401: 'authentication_error', 404: 'not_found_error',
               405: 'invalid_request_error', 413: 'invalid_request_error', 429: 'rate_limit_error',
               503: 'timeout_error'}
UNCOUNTED_PATHS = ('/health',)  # liveness probes pass even when the server is full
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body up to this size is read and dropped, so its client sees the 413


class APIError(Exception):
    """Raise anywhere in a route to answer ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class BodyTooLarge(HTTPException):
    """Raised while a body is read past the limit; FastAPI passes HTTPExceptions from the body read through."""

    def __init__(self, limit: int):
        super().__init__(413, f'the request body is larger than the limit of {limit} bytes (--max_request_bytes)')


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, 'server_error' if status >= 500 else 'invalid_request_error')
    return JSONResponse({'error': {'message': message, 'type': kind, 'param': param, 'code': code}},
                        status_code=status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None, str]:
    """The first validation error (pydantic's form) as (message, param, code); the rest are counted."""
    first = errors[0] if errors else {'msg': 'invalid request', 'loc': (), 'type': ''}
    if first.get('type') == 'json_invalid':
        detail = (first.get('ctx') or {}).get('error', first.get('msg'))
        return f'the body is not valid JSON: {detail}', None, 'invalid_json'
    loc = [str(p) for p in first.get('loc', ()) if p != 'body']
    param = '.'.join(loc) or None
    if first.get('type') == 'missing':
        message = f"'{param}' is required"
    elif param is None:
        message = f"the body must be a JSON object: {first.get('msg')}"
    else:
        message = f"'{param}': {first.get('msg')}"
    if len(errors) > 1:
        message += f' (and {len(errors) - 1} more error{"s" if len(errors) > 2 else ""})'
    return message, param, 'invalid_value' if param else 'invalid_body'


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return error_response(400, *_validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f'no route {request.method} {request.url.path}',
                   405: f'method {request.method} not allowed on {request.url.path}'}.get(exc.status_code, exc.detail)
        code = 'request_too_large' if exc.status_code == 413 else None
        return error_response(exc.status_code, str(message), code=code, headers=getattr(exc, 'headers', None))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception):  # starlette logs it with its traceback too
        return error_response(500, f'{type(exc).__name__}: {exc}')


class LimitsMiddleware:
    """Body size and concurrency caps as plain ASGI, in front of everything else."""

    def __init__(self, app, limits: ServerLimits):
        self.app, self.limits, self.in_flight = app, limits, 0

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['path'] in UNCOUNTED_PATHS:
            return await self.app(scope, receive, send)
        limit = self.limits.max_request_bytes
        declared = dict(scope['headers']).get(b'content-length')
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if int(declared) <= DRAIN_BYTES:
                await _drain(receive)
            return await error_response(413, str(BodyTooLarge(limit).detail), code='request_too_large',
                                        headers={'Connection': 'close'})(scope, receive, send)
        if self.in_flight >= self.limits.max_concurrency:
            return await error_response(
                429, f'the server is busy: {self.in_flight} requests in flight (--max_concurrency '
                     f'{self.limits.max_concurrency}); retry later', code='too_many_requests',
                headers={'Retry-After': '1'})(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get('body', b''))
            if received > limit:  # a chunked body without Content-Length
                raise BodyTooLarge(limit)
            return message

        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, counted_receive, send)
        finally:
            self.in_flight -= 1


async def read_json(request: Request, model: type[ModelT]) -> ModelT:
    """The body parsed as JSON (whatever its Content-Type) and validated as ``model``; errors are 400s."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, not UTF-8, an integer of over 4300 digits
        detail = (e.msg if isinstance(e, json.JSONDecodeError) else 'not UTF-8' if isinstance(e, UnicodeDecodeError)
                  else 'nested too deeply' if isinstance(e, RecursionError) else str(e))
        raise APIError(400, f'the body is not valid JSON: {detail}', code='invalid_json') from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(400, *_validation_message(e.errors())) from None


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message['type'] != 'http.request' or not message.get('more_body'):
            return


def require_api_key(request: Request) -> None:
    """Router dependency: ``Authorization: Bearer <key>`` must match the app's key (when it has one)."""
    key = request.app.state.api_key
    if not key:
        return
    given = request.headers.get('authorization', '')
    if not (given.startswith('Bearer ') and secrets.compare_digest(given[7:].encode(), key.encode())):
        raise APIError(401, 'invalid or missing API key (send "Authorization: Bearer <key>")',
                       code='invalid_api_key')


def build_app(limits: ServerLimits | None = None, api_key: str | None = None, title: str = 'megaswift') -> FastAPI:
    """A FastAPI app with the shared limits, error handlers and ``/health``; add routers to it."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits = limits or ServerLimits()
    app.state.api_key = api_key or None
    _install_error_handlers(app)
    app.add_middleware(LimitsMiddleware, limits=app.state.limits)

    @app.get('/health')
    async def health() -> dict[str, Any]:
        return {'status': 'ok'}

    return app


class ServeError(UserError, OSError):
    pass


def is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:  # a host name: whatever it resolves to, it is not known to be this machine only
        return False


def bind(host: str = '127.0.0.1', port: int = 8000, api_key: str | None = None) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port), not yet listening: bind before loading a model, so a
    port in use fails at once, and clients are refused rather than left waiting while the model loads. A
    server that other machines can reach and that has no ``api_key`` is logged as a warning."""
    if not api_key and not is_loopback(host):
        logger.warning('listening on %s without an API key: anyone who can reach this address can use the server '
                       '(set --api_key or $MEGASWIFT_API_KEY, or --host 127.0.0.1)', host)
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f'cannot listen on {host}:{port}: {e.strerror or e} (--host / --port; 0 picks a free port)'
                         ) from None
    return sock


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def serve(app: FastAPI, sock: socket.socket, on_listen: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` on the bound ``sock`` until SIGINT / SIGTERM (in-flight requests get 5 s to finish). The
    socket listens before ``on_listen(url)`` is called, so a client told the URL can connect at once."""
    import uvicorn
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    url = f'http://[{host}]:{port}' if sock.family == socket.AF_INET6 else f'http://{host}:{port}'
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5))
    # After a graceful shutdown uvicorn re-raises the SIGTERM it caught; its default action would kill the process
    # before the caller's ``finally`` closes the engine (vLLM's engine-core processes would outlive the server).
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_signal)
    if on_listen is not None:
        on_listen(url)
    server.run(sockets=[sock])
