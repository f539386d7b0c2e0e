"""Arguments of ``megaswift deploy`` (an OpenAI-compatible server)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ArgumentError, ArgumentsBase, ModelArguments, PluginArguments, parse_json_arg


@dataclass
class DeployArguments(ArgumentsBase, ModelArguments, PluginArguments):
    infer_backend: str = 'transformers'
    host: str = '127.0.0.1'            # --host 0.0.0.0 to accept other machines
    port: int = 8000                   # 0 picks a free port (printed at start-up)
    served_model_name: str | None = None
    max_batch_size: int = 32
    api_key: str | None = None
    engine_kwargs: str | None = None

    def _check(self):
        from ..infer_engine import canonical_engine_name
        if not self.model:
            raise ArgumentError('--model is required')
        try:
            self.infer_backend = canonical_engine_name(self.infer_backend)
        except ValueError as e:
            raise ArgumentError(f'--infer_backend: {e}') from None
        self.engine_kwargs = parse_json_arg(self.engine_kwargs, 'engine_kwargs')
        if not 0 <= self.port < 65536:
            raise ArgumentError(f'--port: must be in 0..65535, got {self.port}')
