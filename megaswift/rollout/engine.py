"""The rollout server's engine: token ids in, token ids + per-token log-probs out, weights replaced in place.

Only the transformers backend is implemented: the HF model of ``TransformersEngine`` driven by its decode loop
(``infer_engine/decoding.py``) on prompt token ids. A completion's ``logprobs[i]`` is the log-prob of
``token_ids[i]`` given the prompt and ``token_ids[:i]`` under the model's own distribution (the raw logits'
log-softmax, before temperature / top-p): the same quantity a trainer computes from the logits at the position
*before* each token. A completion that ended on a stop token keeps that token (and its log-prob): the policy
chose it, so a trainer trains on it.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import torch

from ..infer_engine.decoding import decode, row_generators
from ..infer_engine.protocol import RequestConfig
from .weight_sync import WeightReceiver, WeightSyncError


@dataclass
class SamplingRequest:
    prompt_token_ids: list[int]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int | None = None


class TransformersRolloutEngine:
    """One HF model; ``lock`` keeps generation and weight copies apart.

    The weight-sync interface every rollout engine has (the server calls nothing else):
    ``world_size`` (its ranks in the weight-sync group), ``join_communicator(host, port, world_size, rank, backend,
    timeout_s)`` (its ranks start at ``rank``), ``update_weights(layout, last) -> version``,
    ``close_communicator()``, ``has_communicator``, ``weights_version``, ``reset_prefix_cache()``."""

    backend = 'transformers'
    world_size = 1

    def __init__(self, model: str, torch_dtype: str | None = 'auto', device: str | None = None,
                 max_batch_rows: int = 64):
        from ..infer_engine.transformers_engine import TransformersEngine
        engine = TransformersEngine(model, torch_dtype, device)
        self.model, self.tokenizer, self.model_name = engine.model, engine.tokenizer, model
        self.infer_engine = engine  # the same model behind the OpenAI routes (generating under ``lock``)
        self.device = engine.device
        self.stop_token_ids, self.pad_token_id = engine.stop_token_ids, engine.pad_token_id
        self.max_length = engine.max_length
        self.max_batch_rows = max_batch_rows  # sequences (prompts x n) decoded together
        self.lock = threading.Lock()
        self.weights_version = 0
        self.prefix_cache_resets = 0
        # HF names -> tensors (tied weights appear under each of their names; one copy updates both)
        self._params = dict(self.model.state_dict(keep_vars=True))
        self.receiver = WeightReceiver()

    # ---------------------------------------------------------------- prompts
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)['input_ids']

    # ---------------------------------------------------------------- infer
    def _max_new(self, request: SamplingRequest) -> int:
        if not request.prompt_token_ids:
            raise ValueError('empty prompt')
        max_new = request.max_tokens
        if self.max_length:
            max_new = min(max_new, self.max_length - len(request.prompt_token_ids))
        if max_new < 1:
            raise ValueError(f'a prompt of {len(request.prompt_token_ids)} tokens leaves no room to generate '
                             f'(model max length {self.max_length})')
        return max_new

    def generate(self, requests: list[SamplingRequest], max_new: int) -> list[list[dict]]:
        """The ``n`` completions (``{token_ids, logprobs, finish_reason}``) of each request, decoded together.
        The requests share ``n``, temperature, top-p, top-k and ``max_new``; prompts are left-padded. Each
        completion draws from its own RNG, seeded from its request's seed and prompt (``row_generators``), so a
        request's samples do not depend on the requests batched with it."""
        first = requests[0]
        cfg = RequestConfig(max_tokens=max_new, temperature=first.temperature, top_p=first.top_p,
                            top_k=first.top_k, n=first.n, logprobs=True)
        prompts = [list(r.prompt_token_ids) for r in requests]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        gens = []
        for i, (r, p) in enumerate(zip(requests, prompts)):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
            seed = r.seed if r.seed is not None else random.getrandbits(62)
            gens += row_generators([p], cfg.n, seed)
        state = None
        for state in decode(self.model, ids.to(self.device), mask.to(self.device), cfg, max_new,
                            self.stop_token_ids, self.pad_token_id, gens):
            pass
        tokens, logprobs = state.tokens.tolist(), state.logprobs.tolist()
        out = []
        for i in range(len(requests)):
            completions = []
            for row in range(i * cfg.n, (i + 1) * cfg.n):
                toks = tokens[row]
                end = next((k + 1 for k, t in enumerate(toks) if t in self.stop_token_ids), len(toks))
                completions.append({'token_ids': toks[:end], 'logprobs': logprobs[row][:end],
                                    'finish_reason': 'stop' if bool(state.hit_stop[row]) else 'length'})
            out.append(completions)
        return out

    def infer(self, requests: list[SamplingRequest]) -> tuple[list[list[dict]], int]:
        """Completions of every request (in order) and the weights version they were all generated with.
        Requests with the same sampling parameters are decoded together, at most ``max_batch_rows`` sequences at
        a time; a request whose ``max_tokens`` the context length cuts goes alone."""
        limits = [self._max_new(r) for r in requests]  # every request is checked before any is decoded
        groups: dict[tuple, list[int]] = {}
        for i, (r, max_new) in enumerate(zip(requests, limits)):
            alone = i if max_new < r.max_tokens else None
            groups.setdefault((r.n, r.temperature, r.top_p, r.top_k, max_new, alone), []).append(i)
        results: list = [None] * len(requests)
        with self.lock:
            for key, idx in groups.items():
                idx.sort(key=lambda i: len(requests[i].prompt_token_ids))  # little padding per batch
                per_batch = max(1, self.max_batch_rows // key[0])
                for start in range(0, len(idx), per_batch):
                    chunk = idx[start:start + per_batch]
                    for i, completions in zip(chunk, self.generate([requests[i] for i in chunk], key[4])):
                        results[i] = completions
            return results, self.weights_version

    # ---------------------------------------------------------------- weights
    @property
    def has_communicator(self) -> bool:
        return self.receiver.group is not None

    def join_communicator(self, host: str, port: int, world_size: int, rank: int, backend: str,
                          timeout_s: float) -> None:
        self.receiver.join(host, port, world_size, rank, backend, timeout_s)

    def close_communicator(self) -> None:
        self.receiver.close()

    def update_weights(self, layout: dict, last: bool) -> int:
        """Receive one bucket (always drained from the broadcast first, so the trainer is never left waiting),
        check it against the model, copy it in place."""
        named = self.receiver.receive(layout, self.device)
        self.check_layout(layout)
        return self.load_weights(named, last)

    def check_layout(self, layout: dict) -> None:
        """Names and shapes the model has; raised before any tensor is copied."""
        for name, shape in zip(layout['names'], layout['shapes']):
            if name not in self._params:
                raise WeightSyncError(f'the served model has no tensor {name!r}')
            if list(self._params[name].shape) != list(shape):
                raise WeightSyncError(f'{name!r}: the trainer sent shape {list(shape)}, the served model has '
                                      f'{list(self._params[name].shape)}')

    @torch.no_grad()
    def load_weights(self, named: list[tuple[str, torch.Tensor]], last: bool) -> int:
        """Copy ``named`` in place (under the lock: no generation sees half a bucket); after the last bucket
        bump the weights version and reset the prefix cache. Returns the version."""
        with self.lock:
            for name, t in named:
                dst = self._params[name]
                dst.data.copy_(t.to(device=dst.device, dtype=dst.dtype))
            if last:
                self.weights_version += 1
                self._reset_prefix_cache()
            return self.weights_version

    def reset_prefix_cache(self) -> None:
        with self.lock:
            self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        # The transformers backend keeps no KV cache between requests: nothing is stale. Counted for /info.
        self.prefix_cache_resets += 1

    def close(self) -> None:
        self.receiver.close()


def get_rollout_engine(backend: str, model: str, torch_dtype: str | None = 'auto', data_parallel_size: int = 1,
                       **kwargs):
    """The rollout engine of ``backend``; ``data_parallel_size`` > 1 runs that many replicas in worker
    processes behind one engine object (``data_parallel.py``)."""
    if data_parallel_size > 1:
        from .data_parallel import DataParallelEngine
        return DataParallelEngine(backend, model, torch_dtype, data_parallel_size, **kwargs)
    if backend in ('transformers', 'pt'):
        return TransformersRolloutEngine(model, torch_dtype, **kwargs)
    if backend == 'vllm':
        from .vllm_engine import VllmRolloutEngine
        return VllmRolloutEngine(model, torch_dtype, **kwargs)
    if backend == 'sglang':
        from .sglang_engine import SGLangRolloutEngine
        return SGLangRolloutEngine(model, torch_dtype, **kwargs)
    raise ValueError(f"unknown rollout backend {backend!r} (transformers | vllm | sglang)")
