"""Per-sequence quantities of a micro-batch whose samples hold several model sequences (a chosen and a rejected
response; a completion and KTO's mismatched one), packed padding-free or in padded rows.

``template.collator.sequence_ids`` says which sequence each position belongs to (-1: padding), in collation
order: sample k's sequences are ``k * per_sample + j``. A position's log-prob is that of the *next* token
(labels are shifted), so it belongs to the sequence of its position; the last position of a sequence is
masked (the next sequence's first label is ``IGNORE_INDEX``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...template.collator import last_token_positions, sequence_ids
from ...utils.constants import IGNORE_INDEX


def sequence_sums(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[num_sequences]``: the sum of ``values`` (shaped like ``input_ids``, already 0 where nothing counts)
    over each sequence's positions (differentiable)."""
    ids = sequence_ids(batch).to(values.device)
    keep = ids >= 0
    out = torch.zeros(int(batch['num_sequences']), dtype=values.dtype, device=values.device)
    return out.index_add(0, ids[keep], values[keep])


def loss_token_rank(batch: dict) -> torch.Tensor:
    """Shaped like ``input_ids``: the 0-based index of each loss token among its sequence's loss tokens."""
    mask = batch['labels'] != IGNORE_INDEX
    ids = sequence_ids(batch).to(mask.device)
    flat_mask, flat_ids = mask.reshape(-1).long(), ids.reshape(-1)
    before = torch.cumsum(flat_mask, 0) - flat_mask               # loss tokens before each position, row-major
    keep = flat_ids >= 0
    firsts = torch.full((int(batch['num_sequences']),), before.numel(), dtype=torch.long, device=mask.device)
    firsts = firsts.scatter_reduce(0, flat_ids[keep], before[keep], reduce='amin')
    return (before - firsts[flat_ids.clamp(min=0)]).reshape(mask.shape)


@dataclass
class SequenceLogps:
    """Each sequence's summed log-prob of its loss tokens, their count, and the per-token values."""
    sums: torch.Tensor      # [num_sequences]
    counts: torch.Tensor    # [num_sequences] loss tokens
    per_token: torch.Tensor  # like input_ids, 0 off the loss tokens

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1)

    def pairs(self, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` of a per-sequence tensor (default: the sums) laid out as pairs."""
        values = self.sums if values is None else values
        return values[0::2], values[1::2]


def sequence_logps(output, batch: dict, down_weight_after_shorter: float | None = None) -> SequenceLogps:
    """Log-probs of every sequence of ``batch`` from ``output`` (a ``ModelOutput``: fused head or logits).

    ``down_weight_after_shorter`` (LD-DPO's alpha, Liu et al. 2024): in each pair the tokens past the shorter
    response's length count with this weight (the verbosity the longer response adds is discounted)."""
    labels = batch['labels']
    mask = labels != IGNORE_INDEX
    per_token = output.token_logprobs(labels)
    counts = sequence_sums(mask.to(per_token.dtype), batch)
    weighted = per_token
    if down_weight_after_shorter is not None:
        chosen, rejected = counts[0::2], counts[1::2]
        shorter = torch.minimum(chosen, rejected).repeat_interleave(2)  # per sequence: its pair's shorter length
        ids = sequence_ids(batch).to(per_token.device)
        limit = shorter[ids.clamp(min=0)]
        past = loss_token_rank(batch).to(per_token.device) >= limit
        weighted = torch.where(past, per_token * down_weight_after_shorter, per_token)
    return SequenceLogps(sequence_sums(weighted, batch), counts, per_token)


def last_token_values(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[num_sequences]``: ``values`` (``[b, s]`` or ``[b, s, 1]``) at each sequence's last real token."""
    flat = values.reshape(-1)
    return flat.index_select(0, last_token_positions(batch).to(flat.device))


__all__ = ['SequenceLogps', 'last_token_values', 'loss_token_rank', 'sequence_logps', 'sequence_sums']
