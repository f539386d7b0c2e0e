"""An OpenAI-compatible HTTP server over any InferEngine (standard library only).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (``n``,
``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``seed``, ``stop``, ``stream``).
Concurrent requests with the same sampling parameters are batched into one ``engine.infer``
call (dynamic batching), so many clients share decode steps.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..infer_engine import InferEngine, InferRequest, RequestConfig

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


def parse_chat_request(body: Any) -> tuple[str | None, InferRequest, RequestConfig]:
    """Validate an OpenAI chat-completions body; errors name the field."""
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object')
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and 'role' in m for m in messages):
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    stop = body.get('stop')
    if isinstance(stop, str):
        stop = [stop]
    try:
        cfg = RequestConfig(max_tokens=body.get('max_tokens', body.get('max_completion_tokens')),
                            temperature=float(body.get('temperature', 1.0)), top_p=float(body.get('top_p', 1.0)),
                            top_k=int(body.get('top_k', -1)), n=int(body.get('n', 1)), seed=body.get('seed'),
                            stop=stop, stream=bool(body.get('stream', False)),
                            repetition_penalty=float(body.get('repetition_penalty', 1.0)))
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None
    messages = [{**m, 'content': m.get('content') or ''} for m in messages]
    return body.get('model'), InferRequest(messages=messages, tools=body.get('tools')), cfg


class DynamicBatcher:
    """One worker thread owns the engine; requests queue up and leave in batches."""

    def __init__(self, engine: InferEngine, max_batch_size: int = 32, wait_ms: float = 5.0):
        self.engine, self.max_batch_size, self.wait = engine, max_batch_size, wait_ms / 1000
        self.lock = threading.Lock()  # held while the engine runs (batches and streams)
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name='megaswift-batcher').start()

    def submit(self, request: InferRequest, cfg: RequestConfig) -> Future:
        fut: Future = Future()
        self.queue.put((request, cfg, fut))
        return fut

    def _work(self) -> None:
        while True:
            items = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(items) < self.max_batch_size:
                try:
                    items.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[str, list] = {}
            for item in items:
                groups.setdefault(json.dumps(asdict(item[1]), sort_keys=True), []).append(item)
            for group in groups.values():
                try:
                    with self.lock:
                        results = self.engine.infer([g[0] for g in group], group[0][1])
                    for (_, _, fut), res in zip(group, results):
                        fut.set_result(res)
                except Exception as e:  # every waiting client gets the error, none hangs
                    for _, _, fut in group:
                        fut.set_exception(e)


def make_handler(batcher: DynamicBatcher, model_name: str, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, fmt, *args):  # route access logs through logging
            logger.debug('%s %s', self.address_string(), fmt % args)

        def _send_json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj, ensure_ascii=False).encode('utf-8')
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send_json(status, {'error': {'message': message, 'type': 'invalid_request_error'
                                               if status < 500 else 'server_error', 'code': status}})

        def _authorized(self) -> bool:
            if api_key and self.headers.get('Authorization') != f'Bearer {api_key}':
                self._error(401, 'invalid or missing API key')
                return False
            return True

        def do_GET(self):
            if self.path.rstrip('/') == '/health':
                return self._send_json(200, {'status': 'ok'})
            if not self._authorized():
                return
            if self.path.rstrip('/') == '/v1/models':
                return self._send_json(200, {'object': 'list', 'data': [
                    {'id': model_name, 'object': 'model', 'owned_by': 'megaswift'}]})
            self._error(404, f'no route GET {self.path}')

        def do_POST(self):
            if not self._authorized():
                return
            if self.path.rstrip('/') != '/v1/chat/completions':
                return self._error(404, f'no route POST {self.path}')
            try:
                length = int(self.headers.get('Content-Length', 0))
                body = json.loads(self.rfile.read(length) or b'null')
                model, request, cfg = parse_chat_request(body)
                if model not in (None, model_name):
                    raise RequestError(f"model '{model}' does not exist; this server serves '{model_name}'", 404)
            except json.JSONDecodeError as e:
                return self._error(400, f'the body is not valid JSON: {e.msg}')
            except RequestError as e:
                return self._error(e.status, str(e))
            try:
                if cfg.stream:
                    return self._stream(request, cfg)
                response = batcher.submit(request, cfg).result()
                response.model = model_name
                self._send_json(200, asdict(response))
            except ValueError as e:  # e.g. a prompt longer than the model's context
                self._error(400, str(e))
            except Exception as e:  # pragma: no cover - reported to the client, logged here
                logger.exception('request failed')
                self._error(500, f'{type(e).__name__}: {e}')

        def _stream(self, request: InferRequest, cfg: RequestConfig) -> None:
            self.send_response(200)
            self.send_header('Content-Type', 'text/event-stream')
            self.send_header('Cache-Control', 'no-cache')
            self.send_header('Connection', 'close')
            self.end_headers()
            rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())

            def emit(choices):
                chunk = {'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model_name,
                         'choices': choices}
                self.wfile.write(f'data: {json.dumps(chunk, ensure_ascii=False)}\n\n'.encode('utf-8'))
                self.wfile.flush()

            engine = batcher.engine
            with batcher.lock:
                if hasattr(engine, 'infer_stream'):
                    for deltas, finish in engine.infer_stream(request, cfg):
                        emit([{'index': k, 'delta': {'role': 'assistant', 'content': d},
                               'finish_reason': finish[k] if finish else None} for k, d in enumerate(deltas)])
                else:  # engines without token streaming send the whole answer as one chunk
                    response = engine.infer([request], cfg)[0]
                    emit([{'index': c.index, 'delta': {'role': 'assistant', 'content': c.message.content},
                           'finish_reason': c.finish_reason} for c in response.choices])
            self.wfile.write(b'data: [DONE]\n\n')
            self.wfile.flush()
            self.close_connection = True

    return Handler


class OpenAIServer:
    def __init__(self, engine: InferEngine, host: str = '127.0.0.1', port: int = 8000, model_name: str | None = None,
                 max_batch_size: int = 32, api_key: str | None = None):
        self.model_name = model_name or engine.model_name
        self.batcher = DynamicBatcher(engine, max_batch_size)
        self.httpd = ThreadingHTTPServer((host, port), make_handler(self.batcher, self.model_name, api_key))
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f'http://{host}:{port}/v1'

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True, name='megaswift-http')
        thread.start()
        return thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
