"""Arguments of ``megaswift rollout`` (a generation server for RL trainers, with live weight sync)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ArgumentError, ArgumentsBase, ModelArguments, PluginArguments

ROLLOUT_BACKENDS = ('transformers', 'vllm', 'sglang')


@dataclass
class RolloutArguments(ArgumentsBase, ModelArguments, PluginArguments):
    infer_backend: str = 'transformers'   # transformers (vllm / sglang: not implemented yet)
    host: str = '127.0.0.1'               # --host 0.0.0.0 to accept other machines
    port: int = 8000                      # 0 picks a free port (printed at start-up)
    api_key: str | None = None            # clients then send "Authorization: Bearer KEY" (else 401)
    data_parallel_size: int = 1           # engine replicas; only 1 for now
    weight_sync_bucket_mb: float = 512    # bucket size of the trainer's pushes (advertised by /info)
    # Limits (megaswift/serving/limits.py), as for `megaswift deploy`
    max_request_bytes: int = 8 * 1024 * 1024
    max_n: int = 64
    max_tokens_cap: int = 32768
    max_concurrency: int = 64
    request_timeout: float = 600.0

    def _check(self):
        if not self.model:
            raise ArgumentError('--model is required')
        backend = 'transformers' if self.infer_backend == 'pt' else self.infer_backend
        if backend not in ROLLOUT_BACKENDS:
            raise ArgumentError(f"--infer_backend: unknown '{self.infer_backend}' ({', '.join(ROLLOUT_BACKENDS)})")
        self.infer_backend = backend
        if backend != 'transformers':
            raise ArgumentError(f'--infer_backend {backend}: not implemented yet for rollout (use transformers)')
        if self.data_parallel_size != 1:
            raise ArgumentError(f'--data_parallel_size {self.data_parallel_size}: only 1 is supported for now')
        if not 0 <= self.port < 65536:
            raise ArgumentError(f'--port: must be in 0..65535, got {self.port}')
        if self.weight_sync_bucket_mb <= 0:
            raise ArgumentError(f'--weight_sync_bucket_mb: must be > 0, got {self.weight_sync_bucket_mb}')
        try:
            self.limits()
        except ValueError as e:
            raise ArgumentError(f'--{e}') from None

    def limits(self):
        from ..serving.limits import ServerLimits
        return ServerLimits(self.max_request_bytes, self.max_n, self.max_tokens_cap, self.max_concurrency,
                            self.request_timeout)
