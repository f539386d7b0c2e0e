"""Arguments of ``megaswift sample`` (ms-swift's ``swift sample`` flags, plus a few of our own)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .base import (ArgumentError, ArgumentsBase, DataArguments, GenerationArguments, ModelArguments, PluginArguments,
                   TemplateArguments, parse_json_arg)


@dataclass
class SamplingArguments(ArgumentsBase, ModelArguments, DataArguments, GenerationArguments, TemplateArguments,
                        PluginArguments):
    sampler_type: Literal['sample', 'distill'] = 'sample'
    # transformers (alias pt) | vllm | sglang | lmdeploy | client | no, or a plugin's engine name
    sampler_engine: str = 'transformers'
    engine_kwargs: str | None = None           # JSON object passed to the engine's constructor
    num_return_sequences: int = 64
    n_best_to_keep: int = 5
    orm_model: str | None = None               # registry name (math, accuracy, ...) or a reward-model path
    orm_kwargs: str | None = None
    orm_threshold: float = 0.0                 # a sample passes the ORM when its reward is above this
    prm_model: str | None = None               # registry name (client, plugins) or a reward-model path
    prm_kwargs: str | None = None
    prm_threshold: float = 0.0
    easy_query_threshold: float | None = None  # skip prompts whose share of ORM-passing samples is at least this
    cache_files: list[str] = field(default_factory=list)
    output_dir: str = 'sample_output'
    output_file: str | None = None             # default: a timestamp name (with a shard suffix)
    override_exist_file: bool = False
    resume: bool = False
    data_range: list[int] = field(default_factory=list)   # [shard_index, num_shards]
    # prompts per batch (one engine call, one resume commit); default: as many as fill --max_batch_size
    num_sampling_batch_size: int | None = None
    num_sampling_batches: int | None = None    # stop after this many batches
    max_batch_size: int = 64                   # transformers engine: sequences decoded together

    def _check(self):
        from ..infer_engine import canonical_engine_name
        if self.sampler_engine != 'no':
            try:
                self.sampler_engine = canonical_engine_name(self.sampler_engine)
            except ValueError as e:
                raise ArgumentError(f'--sampler_engine: {e}') from None
        self.engine_kwargs = parse_json_arg(self.engine_kwargs, 'engine_kwargs')
        self.orm_kwargs = parse_json_arg(self.orm_kwargs, 'orm_kwargs')
        self.prm_kwargs = parse_json_arg(self.prm_kwargs, 'prm_kwargs')
        for key in ('torch_dtype', 'dtype'):
            if key in self.engine_kwargs:
                raise ArgumentError(f'--engine_kwargs: set the dtype with --torch_dtype, not "{key}" in engine_kwargs')
        if self.sampler_engine == 'no':
            if not self.cache_files:
                raise ArgumentError('--sampler_engine no scores cached samples: pass --cache_files')
        else:
            if not self.model and self.sampler_engine != 'client':
                raise ArgumentError('--model is required')
            if not self.dataset:
                raise ArgumentError('--dataset is required')
        if self.num_sampling_batch_size is None:
            self.num_sampling_batch_size = max(1, self.max_batch_size // max(1, self.num_return_sequences))
        for name in ('num_return_sequences', 'n_best_to_keep', 'num_sampling_batch_size', 'max_batch_size'):
            if getattr(self, name) < 1:
                raise ArgumentError(f'--{name}: must be >= 1, got {getattr(self, name)}')
        if self.num_sampling_batches is not None and self.num_sampling_batches < 1:
            raise ArgumentError(f'--num_sampling_batches: must be >= 1, got {self.num_sampling_batches}')
        if self.data_range and (len(self.data_range) != 2 or not 0 <= self.data_range[0] < self.data_range[1]):
            raise ArgumentError(f'--data_range: expected "INDEX NUM_SHARDS" with 0 <= INDEX < NUM_SHARDS, '
                                f'got {self.data_range}')
        if self.output_file and ('/' in self.output_file or '\\' in self.output_file):
            raise ArgumentError(f'--output_file: a file name inside --output_dir, not a path: {self.output_file!r}')
        if self.easy_query_threshold is not None and not self.orm_model:
            raise ArgumentError('--easy_query_threshold needs an --orm_model to tell solved prompts apart')
        if self.resume and self.override_exist_file:
            raise ArgumentError('--resume and --override_exist_file exclude each other')

    def fingerprint(self) -> dict:
        """The arguments that shape the output; a resumed run must match them."""
        keys = ('model', 'dataset', 'data_seed', 'dataset_shuffle', 'system', 'sampler_type', 'sampler_engine',
                'num_return_sequences', 'n_best_to_keep', 'orm_model', 'orm_kwargs', 'orm_threshold', 'prm_model',
                'prm_kwargs', 'prm_threshold', 'easy_query_threshold', 'cache_files', 'data_range',
                'num_sampling_batch_size', 'num_sampling_batches', 'max_new_tokens', 'temperature', 'top_p',
                'top_k', 'repetition_penalty', 'stop_words', 'seed')
        return {k: getattr(self, k) for k in keys}
