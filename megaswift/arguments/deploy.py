"""Arguments of ``megaswift deploy`` (an OpenAI-compatible server)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ArgumentError, ArgumentsBase, ModelArguments, PluginArguments, parse_json_arg
from .serving import ServerArguments


@dataclass
class DeployArguments(ArgumentsBase, ServerArguments, ModelArguments, PluginArguments):
    infer_backend: str = 'transformers'
    served_model_name: str | None = None
    max_batch_size: int = 32           # sequences (prompts x n) per batch; a larger n is cut into pieces of this
    #                                    size that take turns with other requests (seeded samples depend on it)
    engine_kwargs: str | None = None
    agent_template: str = 'hermes'     # how `tools` and tool messages are rendered and answers parsed for calls

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
        if self.agent_template not in agent_templates:
            raise ArgumentError(f"--agent_template: unknown '{self.agent_template}' "
                                f"(available: {', '.join(sorted(agent_templates))})")
