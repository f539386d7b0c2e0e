"""The caps every megaswift HTTP server enforces, in one place (``megaswift deploy`` flags of the same names)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    """A request over a cap is refused with a 4xx JSON error; it never reaches the engine.

    - ``max_request_bytes``: request bodies larger than this get 413 (checked on ``Content-Length`` and
      while reading a chunked body).
    - ``max_n``: the largest ``n`` (choices per request); more is 400.
    - ``max_tokens_cap``: the largest ``max_tokens`` / ``max_completion_tokens``; more is 400.
    - ``max_concurrency``: requests in flight at once (streams until their last chunk), those waiting for the
      engine included, so it is also the cap on the queue's depth; one more gets 429 with ``Retry-After`` at once.
      ``/health`` is never counted.
    - ``request_timeout``: seconds a request may wait for and use the engine; then 503 (a request still
      queued is dropped; a running batch cannot be interrupted and finishes unread). 0 disables it.
    """
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 64
    max_tokens_cap: int = 32768
    max_concurrency: int = 64
    request_timeout: float = 600.0

    def __post_init__(self):
        for name in ('max_request_bytes', 'max_n', 'max_tokens_cap', 'max_concurrency'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.request_timeout < 0:
            raise ValueError(f'request_timeout must be >= 0 (0: no timeout), got {self.request_timeout}')

    @property
    def timeout(self) -> float | None:
        """``request_timeout`` as asyncio wants it (None: wait forever)."""
        return self.request_timeout or None
