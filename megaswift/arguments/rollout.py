"""Arguments of ``megaswift rollout`` (a generation server for RL trainers, with live weight sync)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ArgumentError, ArgumentsBase, ModelArguments, PluginArguments
from .serving import ServerArguments

ROLLOUT_BACKENDS = ('transformers', 'vllm', 'sglang')


@dataclass
class RolloutArguments(ArgumentsBase, ServerArguments, ModelArguments, PluginArguments):
    """Where it listens, its API key and caps: ``ServerArguments`` (the same group as ``megaswift deploy``)."""
    infer_backend: str = 'transformers'   # transformers | vllm | sglang
    data_parallel_size: int = 1           # engine replicas behind the one server; each batch is split across them
    weight_sync_bucket_mb: float = 512    # bucket size of the trainer's pushes (advertised by /info)

    def _check(self):
        if not self.model:
            raise ArgumentError('--model is required')
        backend = 'transformers' if self.infer_backend == 'pt' else self.infer_backend
        if backend not in ROLLOUT_BACKENDS:
            raise ArgumentError(f"--infer_backend: unknown '{self.infer_backend}' ({', '.join(ROLLOUT_BACKENDS)})")
        self.infer_backend = backend
        if self.data_parallel_size < 1:
            raise ArgumentError(f'--data_parallel_size: must be >= 1, got {self.data_parallel_size}')
        if self.weight_sync_bucket_mb <= 0:
            raise ArgumentError(f'--weight_sync_bucket_mb: must be > 0, got {self.weight_sync_bucket_mb}')
