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
    api_key: str | None = None         # clients then send "Authorization: Bearer KEY" (else 401)
    engine_kwargs: str | None = None
    agent_template: str = 'hermes'     # how `tools` and tool messages are rendered and answers parsed for calls
    # Limits (megaswift/serving/limits.py): a request over one gets a 4xx JSON error and never reaches the engine.
    max_request_bytes: int = 8 * 1024 * 1024  # larger bodies: 413
    max_n: int = 64                    # larger `n`: 400
    max_tokens_cap: int = 32768        # larger `max_tokens` / `max_completion_tokens`: 400
    max_concurrency: int = 64          # requests in flight (streams included); one more: 429 + Retry-After
    request_timeout: float = 600.0     # seconds to wait for and use the engine, then 503; 0: no timeout

    def _check(self):
        from ..infer_engine import canonical_engine_name
        from ..template.agent import agent_templates
        if not self.model:
            raise ArgumentError('--model is required')
        try:
            self.infer_backend = canonical_engine_name(self.infer_backend)
        except ValueError as e:
            raise ArgumentError(f'--infer_backend: {e}') from None
        self.engine_kwargs = parse_json_arg(self.engine_kwargs, 'engine_kwargs')
        if not 0 <= self.port < 65536:
            raise ArgumentError(f'--port: must be in 0..65535, got {self.port}')
        if self.agent_template not in agent_templates:
            raise ArgumentError(f"--agent_template: unknown '{self.agent_template}' "
                                f"(available: {', '.join(sorted(agent_templates))})")
        try:
            self.limits()
        except ValueError as e:
            raise ArgumentError(f'--{e}') from None

    def limits(self):
        from ..serving.limits import ServerLimits
        return ServerLimits(self.max_request_bytes, self.max_n, self.max_tokens_cap, self.max_concurrency,
                            self.request_timeout)
