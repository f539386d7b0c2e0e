"""Token sampling and the decode loop of the transformers engine.

The prompt batch is prefilled once; for ``n`` samples per prompt the KV cache (and the
last logits) are then repeated ``n`` times, so the N samples share one prefill instead of
re-encoding the prompt N times as ``generate(num_return_sequences=N)`` does.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import struct
import zlib

import torch

from .protocol import RequestConfig


@dataclass
class DecodeState:
    """What the decode loop has produced so far (rows = prompts x n, prompt-major)."""
    tokens: torch.Tensor          # [rows, steps] generated ids (pad after a row finished)
    finished: torch.Tensor        # [rows] bool
    hit_stop: torch.Tensor        # [rows] bool: finished by a stop token (vs length)
    logprobs: torch.Tensor | None = None     # [rows, steps] log-prob of each generated id (cfg.logprobs)
    top_ids: torch.Tensor | None = None      # [rows, steps, cfg.top_logprobs] the most likely ids at each step
    top_logprobs: torch.Tensor | None = None  # [rows, steps, cfg.top_logprobs] their log-probs


def row_generators(prompts: list[list[int]], n: int, seed: int) -> list[torch.Generator]:
    """One RNG per sampled sequence, seeded from (seed, prompt tokens, sample index, duplicate index).

    A sequence's randomness then depends only on its own request, never on the other requests
    sharing the batch, so results do not change with batch size, sharding or server batching.
    """
    gens, seen = [], {}
    for prompt in prompts:
        digest = zlib.crc32(struct.pack(f'{len(prompt)}q', *prompt))
        dup = seen[digest] = seen.get(digest, -1) + 1
        for k in range(n):
            g = torch.Generator()
            g.manual_seed(hash((seed, digest, dup, k)) & 0x7FFF_FFFF_FFFF_FFFF)
            gens.append(g)
    return gens


def sample_next(logits: torch.Tensor, cfg: RequestConfig, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Greedy when temperature == 0, else temperature / top-k / top-p sampling. ``logits``: [rows, vocab].

    With ``generators`` (one per row) each row draws its own uniform number (inverse-CDF sampling).
    """
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k and 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float('-inf'))
        logits = torch.full_like(logits, float('-inf')).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return picked.clamp_(max=probs.shape[-1] - 1)


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    score = logits.gather(-1, seen)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(-1, seen, score)


def _worth_compacting(live: int, batch: int) -> bool:
    """Drop finished rows from the batch (copying the KV cache) once they are an eighth of it."""
    return live < batch and (batch - live) * 8 >= batch


class _LogprobRecorder:
    """Log-probs of the sampled ids (and the top-k alternatives) under the model's own distribution: the raw
    logits' log-softmax, before repetition penalty, temperature, top-k and top-p."""

    def __init__(self, rows: int, steps: int, k: int, device):
        self.k = k
        self.chosen = torch.zeros(rows, steps, device=device)
        self.top_ids = torch.zeros(rows, steps, k, dtype=torch.long, device=device)
        self.top_values = torch.zeros(rows, steps, k, device=device)

    def record(self, logits: torch.Tensor, token: torch.Tensor, active: torch.Tensor, step: int) -> None:
        logp = logits.float().log_softmax(-1)
        self.chosen[active, step] = logp.gather(-1, token[:, None]).squeeze(-1)
        if self.k:
            top = logp.topk(self.k, dim=-1)
            self.top_ids[active, step], self.top_values[active, step] = top.indices, top.values

    def upto(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.chosen[:, :steps], self.top_ids[:, :steps], self.top_values[:, :steps]


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: RequestConfig, max_new_tokens: int,
           stop_token_ids: list[int], pad_token_id: int,
           generators: list[torch.Generator] | None) -> Iterator[DecodeState]:
    """Yield the state after every step. ``input_ids`` are left-padded prompts [B, L]."""
    from transformers import DynamicCache
    n = cfg.n
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1, :]
    next_pos = position_ids[:, -1] + 1
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        attention_mask = attention_mask.repeat_interleave(n, 0)
        next_pos = next_pos.repeat_interleave(n, 0)
        input_ids = input_ids.repeat_interleave(n, 0)
    rows, device = logits.shape[0], input_ids.device
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    hit_stop = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # original row of each row still in the batch
    seen = input_ids.masked_fill(attention_mask == 0, pad_token_id) if cfg.repetition_penalty != 1.0 else None
    lp = _LogprobRecorder(rows, max_new_tokens, cfg.top_logprobs, device) if cfg.logprobs else None
    for step in range(max_new_tokens):
        raw_logits = logits
        if seen is not None:
            logits = _apply_repetition_penalty(logits.float(), seen, cfg.repetition_penalty)
        token = sample_next(logits, cfg, None if generators is None else [generators[i] for i in active.tolist()])
        token = token.to(torch.long)
        done_before = finished[active]  # rows that finished earlier but are still in the batch
        token = torch.where(done_before, torch.full_like(token, pad_token_id), token)
        tokens[active, step] = token
        if lp is not None:
            lp.record(raw_logits, token, active, step)
        is_stop = torch.isin(token, stops) & ~done_before
        finished[active[is_stop]] = True
        hit_stop[active[is_stop]] = True
        yield DecodeState(tokens[:, :step + 1], finished.clone(), hit_stop.clone(),
                          *(lp.upto(step + 1) if lp is not None else ()))
        if bool(finished.all()) or step + 1 == max_new_tokens:
            return
        if seen is not None:
            seen = torch.cat([seen, token[:, None]], dim=1)
        keep = ~finished[active]
        if _worth_compacting(int(keep.sum()), len(active)):
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            attention_mask, next_pos, token, active = attention_mask[idx], next_pos[idx], token[idx], active[idx]
            seen = seen[idx] if seen is not None else None
        else:  # finished rows stay in the batch until enough of them are gone; their output is ignored
            token = torch.where(keep, token, torch.full_like(token, pad_token_id))
        attention_mask = torch.cat([attention_mask, torch.ones(len(active), 1, dtype=attention_mask.dtype,
                                                               device=device)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
