"""Argument groups shared by commands. A command's arguments class composes the groups it needs.

Each group validates its own fields in ``_check``; ``ArgumentsBase.__post_init__`` runs
every group's check once, in MRO order, so validation lives next to the fields it checks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..megatron.layout import ParallelConfig, validate_layout
from ..utils.errors import ArgumentError
from ..utils.plugins import import_external_plugins


class ArgumentsBase:
    def __post_init__(self):
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get('_check')
            if check is not None:
                check(self)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)


def parse_json_arg(value: Any, flag: str) -> dict:
    """``--engine_kwargs '{"a": 1}'`` (string) or a dict from YAML/Python -> dict."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise ArgumentError(f'--{flag}: not valid JSON ({e.msg}): {value!r}') from None
    if not isinstance(parsed, dict):
        raise ArgumentError(f'--{flag}: expected a JSON object, got {type(parsed).__name__}')
    return parsed


@dataclass
class ModelArguments:
    model: str | None = None
    torch_dtype: str = 'auto'  # auto | bfloat16 | float16 | float32

    def _check(self):
        if self.torch_dtype not in ('auto', 'bfloat16', 'bf16', 'float16', 'fp16', 'float32', 'fp32'):
            raise ArgumentError(f"--torch_dtype: unknown dtype '{self.torch_dtype}' (auto, bfloat16, float16, float32)")


@dataclass
class DataArguments:
    dataset: list[str] = field(default_factory=list)
    data_seed: int = 42
    dataset_shuffle: bool = False


@dataclass
class GenerationArguments:
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop_words: list[str] = field(default_factory=list)
    seed: int = 42
    stream: bool = False

    def _check(self):
        if self.max_new_tokens < 1:
            raise ArgumentError(f'--max_new_tokens: must be >= 1, got {self.max_new_tokens}')
        if self.temperature < 0:
            raise ArgumentError(f'--temperature: must be >= 0, got {self.temperature}')
        if not 0 < self.top_p <= 1:
            raise ArgumentError(f'--top_p: must be in (0, 1], got {self.top_p}')


@dataclass
class TemplateArguments:
    system: str | None = None


@dataclass
class PluginArguments:
    external_plugins: list[str] = field(default_factory=list)

    def _check(self):
        # Plugins register into the registries before anything is built from them.
        import_external_plugins(self.external_plugins)


@dataclass
class ParallelArguments:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None

    def _check(self):
        self.parallel_config()

    def parallel_config(self, world_size: int | None = None, hf_config=None) -> ParallelConfig:
        """The layout of these flags, validated by ``megatron/layout.py`` (its ``ParallelLayoutError`` is an
        ``ArgumentError`` naming the flags); with ``world_size`` / ``hf_config`` also against the launch / model."""
        return validate_layout(self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                               self.virtual_pipeline_model_parallel_size, getattr(self, 'sequence_parallel', False),
                               world_size=world_size, hf_config=hf_config)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size
