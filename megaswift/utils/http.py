"""JSON over HTTP with retries, and Server-Sent Events, on the standard library alone.

Used by every client of an OpenAI-compatible server (the client engine, the client PRM).
"""
from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)


class HTTPStatusError(UserError, RuntimeError):
    def __init__(self, url: str, status: int, detail: str):
        self.status = status
        super().__init__(f'{url} answered HTTP {status}: {detail}')


def _open(url: str, payload: dict | None, api_key: str | None, timeout: float):
    headers = {'Content-Type': 'application/json'}
    if api_key:
        headers['Authorization'] = f'Bearer {api_key}'
    data = None if payload is None else json.dumps(payload).encode('utf-8')
    request = urllib.request.Request(url, data=data, headers=headers, method='GET' if data is None else 'POST')
    return urllib.request.urlopen(request, timeout=timeout)


def with_retries(url: str, call, max_retries: int = 3, retry_backoff: float = 1.0):
    """Run ``call()``; retry connection errors, 429 (server busy) and 5xx replies, sleeping ``backoff * 2**attempt``.

    Other 4xx replies raise ``HTTPStatusError`` at once; exhausted retries raise ``ConnectionError`` (or
    ``HTTPStatusError`` for the last reply).
    """
    for attempt in range(max_retries + 1):
        try:
            return call()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode('utf-8', 'replace')
            if (e.code < 500 and e.code != 429) or attempt == max_retries:
                raise HTTPStatusError(url, e.code, detail) from None
            error: Exception = e
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            error = e
            if attempt == max_retries:
                raise ConnectionError(f'{url} unreachable after {attempt + 1} attempts: '
                                      f'{getattr(e, "reason", e)}') from e
        delay = retry_backoff * 2 ** attempt
        logger.warning('%s: %s; retrying in %.2fs', url, error, delay)
        time.sleep(delay)
    raise AssertionError('unreachable')  # pragma: no cover


def request_json(url: str, payload: dict | None = None, api_key: str | None = None, timeout: float = 600,
                 max_retries: int = 3, retry_backoff: float = 1.0) -> Any:
    """POST ``payload`` (or GET when None) and return the decoded JSON reply."""
    def call():
        with _open(url, payload, api_key, timeout) as response:
            raw = response.read()
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f'{url} did not answer JSON: {raw[:300]!r}') from None
    return with_retries(url, call, max_retries, retry_backoff)


def stream_sse(url: str, payload: dict, api_key: str | None = None, timeout: float = 600,
               max_retries: int = 3, retry_backoff: float = 1.0) -> Iterator[dict]:
    """POST and yield each ``data:`` event of a Server-Sent-Events reply as JSON, until ``[DONE]``.

    Only opening the connection is retried: a stream broken midway raises, so no partial
    answer is ever mistaken for a whole one.
    """
    response = with_retries(url, lambda: _open(url, payload, api_key, timeout), max_retries, retry_backoff)
    with response:
        for raw in response:
            line = raw.decode('utf-8').strip()
            if not line.startswith('data:'):
                continue
            data = line[5:].strip()
            if data == '[DONE]':
                return
            yield json.loads(data)
    raise ConnectionError(f'{url}: the event stream ended without [DONE]')
