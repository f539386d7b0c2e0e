"""Linear cross entropy without the ``N x V`` logits: the LM head and its loss, chunked over tokens and vocabulary.

``linear_cross_entropy(hidden [.., H], weight [V/tp, H], labels [..])`` equals ``cross_entropy(hidden @ weight.T,
labels)`` (optionally label-smoothed, weighted per token by ``loss_scale``) holding one ``chunk x vocab_chunk`` block:

- forward, per token chunk: logits block -> ``row_stats`` (max, sum-exp, target logit, ...) merged online across
  vocabulary blocks and, under tensor parallelism, across the TP ranks with **one** ``all_gather`` of the
  ``[n, 6]`` statistics per chunk (megatron-core's fused CE needs a max all-reduce and a sum all-reduce);
- when the reduced loss is the only differentiable output (training), the gradient is computed in the same
  pass (``logit_grad_`` turns the block into dlogits in place, then ``dX += G W`` and ``dW += G^T X``): three
  GEMMs in all, the ``6 N H V`` floor, and backward only scales the stored ``dX``/``dW`` by the incoming
  gradient (the ``1/num_tokens`` of a mean is folded in there);
- otherwise (per-token losses, log-probs or entropies that feed a further loss: DPO, GRPO) backward recomputes
  the logits block by block from the saved per-token log-sum-exp (four GEMMs, still no ``N x V`` tensor).

Under TP the hidden states are replicated and each rank holds a vocabulary shard; the gradient of ``hidden`` is the
full one, all-reduced over ``tp_group`` (a ``ColumnParallelLinear`` after ``copy_to_tensor_model_parallel_region``).
The row passes come from ``linear_ce_rows`` (PyTorch: the reference and the CPU path) or the CUDA extension
(``csrc/linear_ce.cu``); ``impl`` picks one ('chunked' or 'cuda'; None: the best available).
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from ..utils.constants import IGNORE_INDEX
from . import linear_ce_rows

logger = logging.getLogger(__name__)

REDUCTIONS = ('mean', 'sum', 'none')
IMPLS = ('chunked', 'cuda')
# the float32 size of one logits block: large enough for efficient GEMMs, small next to the N x V logits
_BLOCK_BYTES = {'cpu': 128 << 20, 'cuda': 1 << 30}


class LinearCEOutput(NamedTuple):
    loss: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    argmax: Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------------------------ backends
class _CudaRows:
    """The extension's row kernels behind the PyTorch functions' signature (GPU memory needs no workspace)."""

    def __init__(self, ext):
        self.ext = ext

    def row_stats(self, z, target, extras=True, workspace=None):
        return self.ext.row_stats(z, target)

    def logit_grad_(self, z, lse, target, coef, workspace=None):
        return self.ext.logit_grad_(z, lse, target, coef)


def row_ops(impl: str | None, device: torch.device):
    """The provider of ``row_stats`` and ``logit_grad_`` for ``impl`` on ``device``. The CUDA kernels are
    checked against the PyTorch rows once per device before first use (``verify_cuda_rows``): with ``impl=None``
    a failing check falls back to the PyTorch rows with a warning, with ``impl='cuda'`` it raises."""
    if impl not in (None,) + IMPLS:
        raise ValueError(f'impl must be one of {IMPLS} or None, got {impl!r}')
    if impl == 'chunked' or (impl is None and device.type != 'cuda'):
        return linear_ce_rows
    if impl == 'cuda' and device.type != 'cuda':
        raise ValueError(f"impl='cuda' needs CUDA tensors, got {device.type} tensors")
    from . import cuda_ext
    if impl is None and not cuda_ext.available():
        return linear_ce_rows
    rows = _CudaRows(cuda_ext.load(required=True))
    problem = verify_cuda_rows(rows, device)
    if problem is None:
        return rows
    if impl == 'cuda':
        raise RuntimeError(f'the CUDA linear cross entropy kernels disagree with the PyTorch reference: {problem}')
    logger.warning('the CUDA linear cross entropy kernels disagree with the PyTorch reference (%s); using the '
                   'PyTorch rows', problem)
    return linear_ce_rows


_VERIFIED: dict = {}


def verify_cuda_rows(rows, device: torch.device) -> str | None:
    """Compare ``rows`` with ``linear_ce_rows`` on random blocks (float32 and bfloat16, odd widths, ignored and
    tied targets) once per device; None when they agree, else what differs. A few milliseconds on a GPU."""
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _VERIFIED:
        _VERIFIED[key] = _compare_rows(rows, torch.device('cuda', key[1]))
        if _VERIFIED[key] is None:
            logger.info('CUDA linear cross entropy kernels checked against the PyTorch rows on %s', device)
    return _VERIFIED[key]


def _compare_rows(rows, device: torch.device) -> str | None:
    g = torch.Generator(device='cpu').manual_seed(1234)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for n, v in ((7, 1), (33, 1001), (64, 4099)):
            z = (torch.randn(n, v, generator=g) * 4).to(dtype)
            z[0, :] = z[0, 0]  # a row of ties
            target = torch.randint(-1, v, (n,), generator=g)
            want = linear_ce_rows.row_stats(z, target)
            got = rows.row_stats(z.to(device), target.to(device)).cpu()
            if not torch.allclose(got[:, :5], want[:, :5], rtol=tol, atol=tol) or \
                    not torch.equal(got[:, 5], want[:, 5]):
                return f'row_stats {dtype} [{n}, {v}]: max difference {float((got - want).abs().max()):.3g}'
            lse = want[:, 0] + torch.log(want[:, 1])
            coef = torch.randn(n, 4, generator=g)
            ref = linear_ce_rows.logit_grad_(z.clone(), lse, target, coef).float()
            out = rows.logit_grad_(z.to(device), lse.to(device), target.to(device), coef.to(device)).float().cpu()
            if not torch.allclose(out, ref, rtol=tol, atol=tol):
                return f'logit_grad_ {dtype} [{n}, {v}]: max difference {float((out - ref).abs().max()):.3g}'
    return None


def best_impl(device: torch.device) -> str:
    """'cuda' when the extension runs on ``device``, else 'chunked'."""
    return 'chunked' if row_ops(None, device) is linear_ce_rows else 'cuda'


def default_chunk_size(num_vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: one logits block within ``_BLOCK_BYTES`` (float32 size on CPU, where the workspace is
    float32), but at least 256 rows on CPU (thinner GEMMs lose more time than the block saves: measured at
    V = 152k, 96-row chunks were 13 % slower than 256-row ones)."""
    cpu = device.type != 'cuda'
    per_row = max(num_vocab, 1) * (4 if cpu else max(torch.finfo(dtype).bits // 8, 2))
    rows = _BLOCK_BYTES['cpu' if cpu else 'cuda'] // per_row // 16 * 16
    return max(256 if cpu else 16, rows)


# ------------------------------------------------------------------------------------------------ statistics
def merge_stats(parts: torch.Tensor) -> torch.Tensor:
    """Combine ``[K, n, 6]`` row statistics of K disjoint vocabulary parts (argmax already global) into ``[n, 6]``."""
    m = parts[..., 0].amax(dim=0)
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    rescale = torch.exp(parts[..., 0] - safe_m)  # 0 for an empty part (max -inf)
    out = torch.empty_like(parts[0])
    out[:, 0] = m
    out[:, 1] = (parts[..., 1] * rescale).sum(dim=0)
    out[:, 2] = parts[..., 2].sum(dim=0)
    out[:, 3] = parts[..., 3].sum(dim=0)
    out[:, 4] = (parts[..., 4] * rescale).sum(dim=0)
    first = (parts[..., 0] == m).float().argmax(dim=0)  # the lowest part holding the max (torch.argmax's tie rule)
    out[:, 5] = parts[..., 5].gather(0, first[None]).squeeze(0)
    return out


class _Plan(NamedTuple):
    ops: object
    chunk: int
    vocab_chunk: int
    tp_group: object
    tp_size: int
    vocab_start: int          # global id of this rank's first column
    vocab_total: int          # real vocabulary over all ranks (label smoothing's mean)
    label_smoothing: float
    extras: bool              # row statistics beyond max/sumexp/target are needed (smoothing, entropy, argmax)
    blocks: '_Blocks'


class _Blocks:
    """One logits block and one float32 workspace, allocated once per call and reused by every chunk: on a
    CPU a fresh multi-MB allocation per chunk costs as much as a pass over it (page faults)."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device, workspace: bool):
        self.size, self.dtype, self.device = rows * cols, dtype, device
        self._logits = self._workspace = None
        self.want_workspace = workspace

    def logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._logits is None:
            self._logits = torch.empty(self.size, dtype=self.dtype, device=self.device)
        z = self._logits[:x.size(0) * w.size(0)].view(x.size(0), w.size(0))
        return torch.mm(x, w.t(), out=z)

    @property
    def workspace(self) -> torch.Tensor | None:
        if self.want_workspace and self._workspace is None:
            self._workspace = torch.empty(self.size, dtype=linear_ce_rows.stats_dtype(self.dtype),
                                          device=self.device)
        return self._workspace


def _local_target(labels: torch.Tensor, plan: _Plan, start: int, width: int) -> torch.Tensor:
    """Each label's column inside ``[start, start + width)`` of this rank's shard, -1 elsewhere (or ignored)."""
    col = labels - (plan.vocab_start + start)
    return torch.where((labels >= 0) & (col >= 0) & (col < width), col, torch.full_like(col, -1))


def _chunk_stats(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, plan: _Plan):
    """Row statistics of one token chunk over the whole (TP-split) vocabulary, and the logits block when the
    local vocabulary is a single block (to be reused for the gradient)."""
    parts, block = [], None
    v_local = w.size(0)
    for start in range(0, max(v_local, 1), plan.vocab_chunk):
        wb = w[start:start + plan.vocab_chunk]
        z = plan.blocks.logits(x, wb)
        stats = plan.ops.row_stats(z, _local_target(labels, plan, start, wb.size(0)), plan.extras,
                                   plan.blocks.workspace)
        stats[:, 5] += plan.vocab_start + start
        parts.append(stats)
        if plan.vocab_chunk >= v_local:
            block = z
    stats = parts[0] if len(parts) == 1 else merge_stats(torch.stack(parts))
    if plan.tp_size > 1:
        gathered = stats.new_empty(plan.tp_size * stats.size(0), stats.size(1))
        torch.distributed.all_gather_into_tensor(gathered, stats.contiguous(), group=plan.tp_group)
        stats = merge_stats(gathered.view(plan.tp_size, *stats.shape))
    return stats, block


def _token_outputs(stats: torch.Tensor, valid: torch.Tensor, plan: _Plan):
    """Per-token (loss, log-prob, entropy, lse) from merged statistics; ``loss`` is 0 where ``valid`` is False."""
    lse = stats[:, 0] + torch.log(stats[:, 1])
    logprob = torch.where(valid, stats[:, 2] - lse, torch.zeros_like(lse))
    loss = -logprob
    if plan.label_smoothing:
        smooth = lse - stats[:, 3] / plan.vocab_total
        loss = torch.where(valid, (1.0 - plan.label_smoothing) * loss + plan.label_smoothing * smooth,
                           torch.zeros_like(lse))
    entropy = lse - stats[:, 4] / stats[:, 1]
    return loss, logprob, entropy, lse


def _grad_coefficients(w_loss, g_logprob, g_entropy, entropy, lse, plan: _Plan) -> torch.Tensor:
    """``(A, B, C, D)`` of ``logit_grad_`` for per-token upstream weights of the loss, log-prob and entropy."""
    e = plan.label_smoothing
    zero = torch.zeros_like(lse)
    g_lp = zero if g_logprob is None else g_logprob
    g_h = zero if g_entropy is None else g_entropy
    a = w_loss - g_lp - g_h * (entropy - lse)
    c = w_loss * (1.0 - e) - g_lp
    d = w_loss * (e / plan.vocab_total) if e else zero
    return torch.stack([a, -g_h, c, d], dim=1).contiguous()


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, overwrite: bool = False,
                rows: int = 8192) -> None:
    """``acc += a @ b`` (``acc = a @ b`` with ``overwrite``, which needs ``acc`` in the operands' dtype); a float32
    ``acc`` of 16-bit operands is fed ``rows`` rows at a time, so the 16-bit product never needs a temporary as
    large as ``acc`` (dW of a 150k vocabulary)."""
    if overwrite:
        torch.mm(a, b, out=acc)
    elif acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        for r in range(0, acc.size(0), rows):
            acc[r:r + rows].add_(a[r:r + rows] @ b)


def _accumulate_grads(z, x, w, labels, lse, coef, plan: _Plan, start: int, dx, dw, overwrite=(False, False)):
    """Turn logits block ``z`` (columns ``start..``) into dlogits and add its share to ``dx`` / ``dw`` (or write
    it there: ``overwrite`` = (for dx, for dw), when this block is the only contribution)."""
    g = plan.ops.logit_grad_(z, lse, _local_target(labels, plan, start, z.size(1)), coef, plan.blocks.workspace)
    if dx is not None:
        _add_matmul(dx, g, w[start:start + z.size(1)], overwrite[0])
    if dw is not None:
        _add_matmul(dw[start:start + z.size(1)], g.t(), x, overwrite[1])


def _chunk_grads(x, w, labels, lse, coef, plan: _Plan, block, dx_c, dw, overwrite=(False, False)):
    """dlogits of one token chunk -> ``dx_c`` (this chunk's rows of dX) and ``dw``; ``block``: the logits
    when the vocabulary is one block (else they are recomputed block by block)."""
    for start in range(0, w.size(0), plan.vocab_chunk):
        z = block if block is not None else plan.blocks.logits(x, w[start:start + plan.vocab_chunk])
        _accumulate_grads(z, x, w, labels, lse, coef, plan, start, dx_c, dw, overwrite)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, weights, plan: _Plan, eager: bool, want_argmax: bool):
        n = hidden.size(0)
        loss = hidden.new_empty(n, dtype=linear_ce_rows.stats_dtype(hidden.dtype))
        logprob, entropy, lse = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
        argmax = torch.empty(n if want_argmax else 0, dtype=torch.long, device=hidden.device)
        valid = labels != IGNORE_INDEX
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = eager and (need_dx or need_dw)
        # one vocabulary block: each chunk's dX rows and (with one token chunk) dW are written by a single GEMM in
        # the operands' dtype, as the unfused path does; otherwise they are accumulated in float32
        one_block = plan.vocab_chunk >= weight.size(0)
        one_chunk = one_block and n <= plan.chunk
        dx = torch.empty_like(hidden) if eager and need_dx else None
        dw = None
        if eager and need_dw:
            dw = torch.empty_like(weight) if one_chunk else \
                torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device)
        for s in range(0, n, plan.chunk):
            sl = slice(s, min(s + plan.chunk, n))
            x, lab = hidden[sl], labels[sl]
            stats, block = _chunk_stats(x, weight, lab, plan)
            loss[sl], logprob[sl], entropy[sl], lse[sl] = _token_outputs(stats, valid[sl], plan)
            if want_argmax:
                argmax[sl] = stats[:, 5].long()
            if eager:
                coef = _grad_coefficients(weights[sl], None, None, entropy[sl], lse[sl], plan)
                dx_c = None
                if dx is not None:
                    dx_c = dx[sl] if one_block else torch.zeros(x.shape, dtype=_acc_dtype(x.dtype), device=x.device)
                _chunk_grads(x, weight, lab, lse[sl], coef, plan, block, dx_c, dw, (one_block, one_chunk))
                if dx is not None and not one_block:
                    dx[sl] = dx_c
        ctx.plan, ctx.eager = plan, eager
        if eager:
            ctx.save_for_backward(dx, dw if dw is None or dw.dtype == weight.dtype else dw.to(weight.dtype))
        else:
            ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.mark_non_differentiable(argmax)
        return loss, logprob, entropy, argmax

    @staticmethod
    def backward(ctx, g_loss, g_logprob, g_entropy, _g_argmax):
        plan = ctx.plan
        if ctx.eager:
            dx, dw = ctx.saved_tensors
            # the loss's upstream gradient is one scalar times the per-token weights folded in forward
            scale = g_loss[0] if g_loss is not None else None
            dx = None if dx is None or scale is None else dx * scale.to(dx.dtype)  # not in place: backward may
            dw = None if dw is None or scale is None else dw * scale.to(dw.dtype)  # run again (retain_graph)
        else:
            dx, dw = _recompute_grads(ctx, g_loss, g_logprob, g_entropy)
        if dx is not None and plan.tp_size > 1:
            torch.distributed.all_reduce(dx, group=plan.tp_group)
        return dx, dw, None, None, None, None, None


def _recompute_grads(ctx, g_loss, g_logprob, g_entropy):
    hidden, weight, labels, lse, entropy = ctx.saved_tensors
    plan = ctx.plan
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    valid = labels != IGNORE_INDEX
    # the loss outputs were multiplied by the per-token weights outside: g_loss already carries them
    w_loss = torch.zeros_like(lse) if g_loss is None else g_loss.to(lse.dtype) * valid
    g_lp = None if g_logprob is None else g_logprob.to(lse.dtype) * valid
    g_h = None if g_entropy is None else g_entropy.to(lse.dtype)
    dx = torch.zeros(hidden.shape, dtype=_acc_dtype(hidden.dtype), device=hidden.device) if need_dx else None
    dw = torch.zeros(weight.shape, dtype=_acc_dtype(weight.dtype), device=weight.device) if need_dw else None
    for s in range(0, hidden.size(0), plan.chunk):
        sl = slice(s, min(s + plan.chunk, hidden.size(0)))
        coef = _grad_coefficients(w_loss[sl], None if g_lp is None else g_lp[sl], None if g_h is None else g_h[sl],
                                  entropy[sl], lse[sl], plan)
        _chunk_grads(hidden[sl], weight, labels[sl], lse[sl], coef, plan, None,
                     None if dx is None else dx[sl], dw)
    return (None if dx is None else dx.to(hidden.dtype)), (None if dw is None else dw.to(weight.dtype))


# ------------------------------------------------------------------------------------------------ public API
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         loss_scale: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                         reduction: str = 'mean', tp_group=None, return_logprobs: bool = False,
                         return_entropy: bool = False, label_smoothing: float = 0.0, vocab_size: int | None = None,
                         impl: str | None = None, chunk_size: int | None = None,
                         vocab_chunk_size: int | None = None, return_argmax: bool = False):
    """Cross entropy of ``hidden @ weight.T`` against ``labels``, never materialising the logits.

    hidden: ``[..., H]``; weight: ``[V_local, H]`` (this rank's vocabulary shard under ``tp_group``, rank r holding
    ids ``[r * V_local, (r + 1) * V_local)``); labels: ``[...]`` global ids, ``ignore_index`` where nothing is learnt.
    loss_scale: ``[...]`` per-token weights multiplying each token's loss. vocab_size: the real vocabulary when
    ``weight`` has padded rows past it (they are left out of the softmax). reduction: 'mean' (weighted sum over
    the number of non-ignored tokens, ``F.cross_entropy``'s convention), 'sum', or 'none' (per-token weighted
    losses, 0 where ignored, shape of ``labels``). label_smoothing: as ``F.cross_entropy``, over the real
    vocabulary (correct under TP). Returns the loss, or a ``LinearCEOutput`` when log-probs (of the labels, 0 where
    ignored), entropies (per token, of the full softmax) or argmax ids are asked for; all float32 except argmax.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f'hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree')
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f'weight must be [V, {hidden.size(-1)}], got {tuple(weight.shape)}')
    if loss_scale is not None and loss_scale.shape != labels.shape:
        raise ValueError(f'loss_scale {tuple(loss_scale.shape)} must have the shape of labels {tuple(labels.shape)}')
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
    tp_size = tp_group.size() if tp_group is not None and torch.distributed.is_initialized() else 1
    tp_rank = tp_group.rank() if tp_size > 1 else 0
    shard = weight.size(0)
    vocab_start = tp_rank * shard
    vocab_total = shard * tp_size if vocab_size is None else int(vocab_size)
    w = weight[:max(0, min(shard, vocab_total - vocab_start))]
    x = hidden.reshape(-1, hidden.size(-1))
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    lab = labels.reshape(-1).long()
    if ignore_index != IGNORE_INDEX:
        lab = torch.where(lab == ignore_index, torch.full_like(lab, IGNORE_INDEX), lab)
    bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= vocab_total))
    if bool(bad.any()):
        raise ValueError(f'label {int(lab[bad][0])} is outside the vocabulary [0, {vocab_total})')
    valid = lab != IGNORE_INDEX
    acc = linear_ce_rows.stats_dtype(x.dtype)
    weights = valid.to(acc) if loss_scale is None else loss_scale.reshape(-1).to(acc) * valid
    count = valid.sum()
    if reduction == 'mean':  # the 1/num_tokens normalisation is folded into the gradient weights
        weights = weights / count.clamp(min=1).to(acc)
    ops = row_ops(impl, x.device)
    chunk = max(1, int(chunk_size or default_chunk_size(w.size(0), x.dtype, x.device)))
    vocab_chunk = max(1, int(vocab_chunk_size or max(w.size(0), 1)))
    blocks = _Blocks(min(chunk, max(x.size(0), 1)), min(vocab_chunk, max(w.size(0), 1)), x.dtype, x.device,
                     workspace=ops is linear_ce_rows)
    plan = _Plan(ops=ops, chunk=chunk, vocab_chunk=vocab_chunk, tp_group=tp_group, tp_size=tp_size,
                 vocab_start=vocab_start, vocab_total=vocab_total, label_smoothing=float(label_smoothing),
                 extras=bool(label_smoothing) or return_entropy or return_argmax, blocks=blocks)
    eager = reduction != 'none' and not return_logprobs and not return_entropy
    token_loss, logprob, entropy, argmax = _LinearCrossEntropy.apply(x, w, lab, weights, plan, eager, return_argmax)
    if reduction == 'none':
        loss = (token_loss * weights).view(labels.shape)
    else:
        loss = _weighted_sum(token_loss, weights, eager)
    if not (return_logprobs or return_entropy or return_argmax):
        return loss
    shape = labels.shape
    return LinearCEOutput(loss, logprob.view(shape) if return_logprobs else None,
                          entropy.view(shape) if return_entropy else None,
                          argmax.view(shape) if return_argmax else None)


class _FoldedSum(torch.autograd.Function):
    """``sum(loss * weights)`` whose backward hands the scalar gradient to every token unweighted: the weights
    are already inside the gradients computed in forward, and the eager backward reads ``g[0]``."""

    @staticmethod
    def forward(ctx, token_loss, weights):
        ctx.n = token_loss.numel()
        return (token_loss * weights).sum()

    @staticmethod
    def backward(ctx, g):
        return g.expand(ctx.n), None


def _weighted_sum(token_loss: torch.Tensor, weights: torch.Tensor, eager: bool) -> torch.Tensor:
    return _FoldedSum.apply(token_loss, weights) if eager else (token_loss * weights).sum()


def linear_ce_flops(num_tokens: int, hidden: int, vocab: int) -> float:
    """The GEMM floor of forward + backward: logits, dX and dW (``6 N H V``)."""
    return 6.0 * num_tokens * hidden * vocab


__all__ = ['linear_cross_entropy', 'LinearCEOutput', 'merge_stats', 'best_impl', 'default_chunk_size',
           'linear_ce_flops', 'IMPLS']
