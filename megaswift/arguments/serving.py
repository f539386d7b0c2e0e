"""The argument group of every megaswift HTTP server: where it listens, its API key and its caps."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ..serving.limits import ServerLimits
from .base import ArgumentError


API_KEY_ENV = 'MEGASWIFT_API_KEY'


@dataclass
class ServerArguments:
    """Compose it into a server command's arguments; ``limits()`` gives the ``ServerLimits`` to build the app with."""
    host: str = '127.0.0.1'            # --host 0.0.0.0 to accept other machines
    port: int = 8000                   # 0 picks a free port (printed at start-up)
    api_key: str | None = None         # clients then send "Authorization: Bearer KEY" (else 401); default:
    #                                    $MEGASWIFT_API_KEY (kept out of `ps`); the flag wins when both are set
    # Limits (megaswift/serving/limits.py): a request over one gets a 4xx JSON error and never reaches the engine.
    max_request_bytes: int = ServerLimits.max_request_bytes  # larger bodies: 413
    max_n: int = ServerLimits.max_n                           # larger `n`: 400
    max_tokens_cap: int = ServerLimits.max_tokens_cap         # larger `max_tokens` / `max_completion_tokens`: 400
    max_concurrency: int = ServerLimits.max_concurrency       # requests in flight (streams included); more: 429
    request_timeout: float = ServerLimits.request_timeout     # seconds to wait for and use the engine, then 503; 0: none

    def _check(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if not 0 <= self.port < 65536:
            raise ArgumentError(f'--port: must be in 0..65535, got {self.port}')
        try:
            self.limits()
        except ValueError as e:
            raise ArgumentError(f'--{e}') from None

    def limits(self) -> ServerLimits:
        return ServerLimits(**{f.name: getattr(self, f.name) for f in fields(ServerLimits)})
