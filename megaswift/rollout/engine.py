"""The rollout server's engine: token ids in, token ids + per-token log-probs out, weights replaced in place.

Only the transformers backend is implemented: the HF model of ``TransformersEngine`` driven by its decode loop
(``infer_engine/decoding.py``) on prompt token ids. A completion's ``logprobs[i]`` is the log-prob of
``token_ids[i]`` given the prompt and ``token_ids[:i]`` under the model's own distribution (the raw logits'
log-softmax, before temperature / top-p): the same quantity a trainer computes from the logits at the position
*before* each token. A completion that ended on a stop token keeps that token (and its log-prob): the policy
chose it, so a trainer trains on it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..infer_engine.decoding import decode, row_generators
from ..infer_engine.protocol import RequestConfig
from .weight_sync import WeightSyncError


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
    """One HF model; ``lock`` keeps generation and weight copies apart."""

    backend = 'transformers'

    def __init__(self, model: str, torch_dtype: str | None = 'auto', device: str | None = None):
        from ..infer_engine.transformers_engine import TransformersEngine
        engine = TransformersEngine(model, torch_dtype, device)
        self.model, self.tokenizer, self.model_name = engine.model, engine.tokenizer, model
        self.device = engine.device
        self.stop_token_ids, self.pad_token_id = engine.stop_token_ids, engine.pad_token_id
        self.max_length = engine.max_length
        self.lock = threading.Lock()
        self.weights_version = 0
        self.prefix_cache_resets = 0
        # HF names -> tensors (tied weights appear under each of their names; one copy updates both)
        self._params = dict(self.model.state_dict(keep_vars=True))

    # ---------------------------------------------------------------- prompts
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)['input_ids']

    # ---------------------------------------------------------------- infer
    def generate(self, request: SamplingRequest) -> list[dict]:
        """``n`` completions of one prompt: ``{token_ids, logprobs, finish_reason}`` each."""
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise ValueError('empty prompt')
        max_new = request.max_tokens
        if self.max_length:
            max_new = min(max_new, self.max_length - len(prompt))
        if max_new < 1:
            raise ValueError(f'a prompt of {len(prompt)} tokens leaves no room to generate '
                             f'(model max length {self.max_length})')
        cfg = RequestConfig(max_tokens=max_new, temperature=request.temperature, top_p=request.top_p,
                            top_k=request.top_k, n=request.n, seed=request.seed, logprobs=True)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        gens = row_generators([prompt], cfg.n, cfg.seed) if cfg.seed is not None else None
        state = None
        for state in decode(self.model, ids, mask, cfg, max_new, self.stop_token_ids, self.pad_token_id, gens):
            pass
        out = []
        for row in range(cfg.n):
            toks = state.tokens[row].tolist()
            lps = state.logprobs[row].tolist()
            end = next((i + 1 for i, t in enumerate(toks) if t in self.stop_token_ids), len(toks))
            out.append({'token_ids': toks[:end], 'logprobs': lps[:end],
                        'finish_reason': 'stop' if bool(state.hit_stop[row]) else 'length'})
        return out

    def infer(self, requests: list[SamplingRequest]) -> tuple[list[list[dict]], int]:
        """Completions of every request and the weights version they were all generated with."""
        with self.lock:
            return [self.generate(r) for r in requests], self.weights_version

    # ---------------------------------------------------------------- weights
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
        pass


def get_rollout_engine(backend: str, model: str, torch_dtype: str | None = 'auto', **kwargs):
    if backend in ('transformers', 'pt'):
        return TransformersRolloutEngine(model, torch_dtype, **kwargs)
    raise NotImplementedError(f"megaswift rollout: --infer_backend {backend} is not implemented yet "
                              f"(available: transformers)")
