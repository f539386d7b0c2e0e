"""The GRPO family's policy loss, written as the papers write it, on flat per-token tensors.

Inputs are the completion tokens of one micro-batch, flattened: ``logps`` (the policy's log-probs, with gradient),
``old_logps`` (the policy that generated the completions, or the policy before this generation's first update),
``advantages`` (one per token: its completion's), ``seq_index`` (the completion each token belongs to, ``0 ..
num_seqs - 1``) and optionally ``ref_logps`` (the frozen reference, for the KL penalty).

Per token ``t`` of completion ``i`` with ratio ``r = pi / pi_old``:

- clipped surrogate (GRPO, DAPO's clip-higher): ``l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``;
- CISPO (MiniMax-M1): ``l = -sg(min(r, 1 + eps_high)) A log pi`` (the importance weight is clipped and
  detached; no token's gradient is dropped);
- GSPO (``importance_sampling_level='sequence'``): ``r`` is the sequence's ``exp(mean_t log(pi / pi_old))`` for
  every token of the sequence;
- the KL penalty adds ``beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's estimator).

``aggregate`` sums the per-token losses with the normaliser of each ``loss_type`` (step-level counts come from the
training loop, summed over the step's micro-batches and data-parallel ranks, so every layout gives the same loss):

- ``grpo``: the mean over completions of each completion's token mean;
- ``bnpo``: the mean over micro-batches of each micro-batch's token mean;
- ``dr_grpo``: the token sum over ``completions x max_completion_length`` (Dr. GRPO: no length bias);
- ``dapo`` and ``cispo``: the token sum over the step's tokens (global token mean).
"""
from __future__ import annotations

import torch

LOSS_TYPES = ('grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo')
IMPORTANCE_SAMPLING_LEVELS = ('token', 'sequence')


def segment_sum(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """``out[i] = sum of values[t] for seq_index[t] == i`` (differentiable)."""
    return values.new_zeros(num_seqs).index_add(0, seq_index, values)


def segment_mean(values: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-segment mean; an empty segment's mean is 0."""
    counts = segment_sum(torch.ones_like(values), seq_index, num_seqs)
    return segment_sum(values, seq_index, num_seqs) / counts.clamp(min=1)


def log_importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                           level: str = 'token') -> torch.Tensor:
    """``log(pi / pi_old)`` per token (``token``) or the sequence's mean of it on each of its tokens (``sequence``,
    GSPO)."""
    log_ratio = logps - old_logps
    if level == 'token':
        return log_ratio
    if level == 'sequence':
        return segment_mean(log_ratio, seq_index, num_seqs)[seq_index]
    raise ValueError(f"importance_sampling_level: unknown '{level}' ({', '.join(IMPORTANCE_SAMPLING_LEVELS)})")


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, seq_index: torch.Tensor,
                   num_seqs: int, *, loss_type: str = 'grpo', epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                   importance_sampling_level: str = 'token', beta: float = 0.0,
                   ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss (before aggregation) and per-token diagnostics: ``ratio``, ``kl`` (if ``beta``) and the
    clipping masks ``clipped_low`` (``r < 1 - eps_low`` with ``A < 0``) and ``clipped_high`` (``r > 1 + eps_high``
    with ``A > 0``): the tokens whose gradient the clip removes (for CISPO: whose weight it caps)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: unknown '{loss_type}' ({', '.join(LOSS_TYPES)})")
    ratio = torch.exp(log_importance_weights(logps, old_logps, seq_index, num_seqs, importance_sampling_level))
    if loss_type == 'cispo':
        loss = -torch.clamp(ratio, max=1 + epsilon_high).detach() * advantages * logps
    else:
        loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages)
    info = {'ratio': ratio.detach(),
            'clipped_low': (ratio < 1 - epsilon_low) & (advantages < 0),
            'clipped_high': (ratio > 1 + epsilon_high) & (advantages > 0)}
    if beta:
        if ref_logps is None:
            raise ValueError('beta > 0 needs the reference log-probs')
        kl = k3_kl(logps, ref_logps)
        loss = loss + beta * kl
        info['kl'] = kl.detach()
    return loss, info


def aggregate(loss: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, loss_type: str,
              denominators: dict[str, torch.Tensor], max_completion_length: int) -> torch.Tensor:
    """This micro-batch's share of the step loss: its per-token losses summed with ``loss_type``'s normaliser.
    ``denominators``: the step's ``sequences``, ``tokens`` and ``micro_batches`` (over all micro-batches and
    data-parallel ranks); the micro-batch's own token count comes from ``loss``."""
    d = {k: v.clamp(min=1) if torch.is_tensor(v) else max(v, 1) for k, v in denominators.items()}
    if loss_type == 'grpo':
        return segment_mean(loss, seq_index, num_seqs).sum() / d['sequences']
    if loss_type == 'bnpo':
        return loss.sum() / max(loss.numel(), 1) / d['micro_batches']
    if loss_type == 'dr_grpo':
        return loss.sum() / (d['sequences'] * max_completion_length)
    if loss_type in ('dapo', 'cispo'):
        return loss.sum() / d['tokens']
    raise ValueError(f"loss_type: unknown '{loss_type}' ({', '.join(LOSS_TYPES)})")


__all__ = ['LOSS_TYPES', 'IMPORTANCE_SAMPLING_LEVELS', 'aggregate', 'k3_kl', 'log_importance_weights',
           'per_token_loss', 'segment_mean', 'segment_sum']
