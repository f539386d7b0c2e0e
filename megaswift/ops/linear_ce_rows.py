"""The two row-wise passes of the chunked linear cross entropy, in plain PyTorch (the reference and CPU path).

A chunk of logits ``z`` is ``[n, v]``: ``n`` tokens against this rank's ``v`` vocabulary columns. ``target``
holds each token's column *in this shard* (``-1`` when its label lies in another TP rank's shard or is
ignored). The CUDA kernels in ``csrc/linear_ce.cu`` implement exactly these two functions, with the same
arguments and results, so ``linear_ce.py`` drives either one.

``row_stats(z, target) -> [n, 6] float32``, per row (statistics are taken in float32 whatever ``z``'s dtype;
the PyTorch version keeps float64 logits in float64, for gradient checks):

    0 max     m   = max_j z_j                        (-inf for an empty shard)
    1 sumexp  s   = sum_j exp(z_j - m)
    2 target  z_t = z[target]                        (0 when target < 0)
    3 sum     sum_j z_j                              (label smoothing)
    4 sumexpz sum_j exp(z_j - m) * z_j               (entropy)
    5 argmax  the first j with z_j == m, as a float  (token accuracy; exact below 2**24 columns)

``logit_grad_(z, lse, target, coef) -> z`` overwrites ``z`` in place with the gradient of the row's outputs
with respect to its logits; ``coef`` is ``[n, 4] float32`` = ``(A, B, C, D)`` and with ``p_j = exp(z_j - lse)``

    z_j <- p_j * (A + B * z_j) - C * [j == target] - D

which covers every combination of a (loss-scaled, label-smoothed) cross entropy, the log-prob of the target
and the entropy of the row (see ``linear_ce.py`` for the coefficients).
"""
from __future__ import annotations

import torch

STATS = ('max', 'sumexp', 'target', 'sum', 'sumexpz', 'argmax')


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_stats(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    n, v = z.shape
    out = torch.zeros(n, len(STATS), dtype=stats_dtype(z.dtype), device=z.device)
    if v == 0:
        out[:, 0] = float('-inf')
        return out
    zf = z.to(out.dtype)
    m, idx = zf.max(dim=1)
    e = torch.exp(zf - m[:, None])
    out[:, 0] = m
    out[:, 1] = e.sum(dim=1)
    has = target >= 0
    out[:, 2] = torch.where(has, zf.gather(1, target.clamp(min=0)[:, None]).squeeze(1), 0.0)
    out[:, 3] = zf.sum(dim=1)
    out[:, 4] = (e * zf).sum(dim=1)
    out[:, 5] = idx.float()
    return out


def logit_grad_(z: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    n, v = z.shape
    if v == 0 or n == 0:
        return z
    zf = z.to(stats_dtype(z.dtype))
    a, b, c, d = (coef[:, k:k + 1] for k in range(4))
    g = torch.exp(zf - lse[:, None]) * (a + b * zf) - d
    has = target >= 0
    if bool(has.any()):
        rows = has.nonzero().squeeze(1)
        g[rows, target[rows]] -= c[rows, 0]
    z.copy_(g)
    return z
