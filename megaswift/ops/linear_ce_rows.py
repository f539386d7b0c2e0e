"""The two row-wise passes of the chunked linear cross entropy, in plain PyTorch (the reference and CPU path).

A chunk of logits ``z`` is ``[n, v]``: ``n`` tokens against this rank's ``v`` vocabulary columns. ``target``
holds each token's column *in this shard* (``-1`` when its label lies in another TP rank's shard or is
ignored). The CUDA kernels in ``csrc/linear_ce.cu`` implement exactly these two functions, with the same
arguments and results, so ``linear_ce.py`` drives either one.

``row_stats(z, target, extras=True, workspace=None) -> [n, 6] float32``, per row (statistics are taken in float32 whatever ``z``'s dtype;
the PyTorch version keeps float64 logits in float64, for gradient checks):

    0 max     m   = max_j z_j                        (-inf for an empty shard)
    1 sumexp  s   = sum_j exp(z_j - m)
    2 target  z_t = z[target]                        (0 when target < 0)
    3 sum     sum_j z_j                              (label smoothing)
    4 sumexpz sum_j exp(z_j - m) * z_j               (entropy)
    5 argmax  the first j with z_j == m, as a float  (token accuracy; exact below 2**24 columns)

``logit_grad_(z, lse, target, coef, workspace=None) -> z`` overwrites ``z`` in place with the gradient of the row's outputs
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


def row_stats(z: torch.Tensor, target: torch.Tensor, extras: bool = True,
              workspace: torch.Tensor | None = None) -> torch.Tensor:
    """``extras=False`` may leave columns 3-5 (sum, sumexpz, argmax) at 0: the training loss without label
    smoothing needs only the first three, and on a CPU every pass over the block counts. ``workspace``: a
    float32 (float64 for float64 logits) buffer of at least ``n * v`` elements to reuse (a fresh CPU
    allocation of a block costs as much as a pass over it in page faults)."""
    n, v = z.shape
    acc = stats_dtype(z.dtype)
    out = torch.zeros(n, len(STATS), dtype=acc, device=z.device)
    if v == 0:
        out[:, 0] = float('-inf')
        return out
    if extras:
        m, idx = z.max(dim=1)
        out[:, 5] = idx
    else:
        m = z.amax(dim=1)
    out[:, 0] = m
    e = _float_copy(z, acc, workspace)
    zf = _float_copy(z, acc, None) if extras else None  # e is overwritten below
    e.sub_(out[:, :1]).exp_()
    out[:, 1] = e.sum(dim=1)
    has = target >= 0
    out[:, 2] = z.gather(1, target.clamp(min=0)[:, None]).squeeze(1).to(acc) * has
    if extras:
        out[:, 3] = zf.sum(dim=1)
        out[:, 4] = torch.bmm(e.unsqueeze(1), zf.unsqueeze(2)).view(n)  # a fused row dot
    return out


def logit_grad_(z: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, coef: torch.Tensor,
                workspace: torch.Tensor | None = None) -> torch.Tensor:
    n, v = z.shape
    if v == 0 or n == 0:
        return z
    acc = stats_dtype(z.dtype)
    a, b, c, d = (coef[:, k:k + 1].to(acc) for k in range(4))
    g = z if z.dtype == acc else _float_copy(z, acc, workspace)
    if not bool((b != 0).any()) and bool((a >= 0).all()):
        g.sub_(lse[:, None].to(acc) - torch.log(a)).exp_()  # p * A = exp(z - (lse - log A)); A = 0 gives 0
    else:  # an entropy term: p * (A + B z)
        p = (g - lse[:, None]).exp_()
        g.mul_(b).add_(a).mul_(p)
    if bool((d != 0).any()):
        g.sub_(d)
    if g is not z:
        z.copy_(g)
    rows = (target >= 0).nonzero().squeeze(1)
    if rows.numel():
        z[rows, target[rows]] -= c[rows, 0].to(z.dtype)
    return z


def _float_copy(z: torch.Tensor, dtype: torch.dtype, workspace: torch.Tensor | None) -> torch.Tensor:
    """A ``dtype`` copy of ``z``, in ``workspace`` when one is given."""
    if workspace is None:
        return z.to(dtype, copy=True)
    return workspace.view(-1)[:z.numel()].view(z.shape).copy_(z)
