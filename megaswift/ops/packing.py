"""Packing ops: ragged samples between the padded ``[B, S, *]`` layout and the packed ``[T, *]`` layout.

A batch of ``B`` samples with lengths ``n_b`` is described by ``cu_seqlens`` (int32 ``[B + 1]``, the running
sum ``0, n_0, n_0 + n_1, ..., T``): sample ``b`` holds the packed rows ``cu_seqlens[b]:cu_seqlens[b + 1]`` and,
in the padded layout, the first ``n_b`` entries of row ``b`` (left-aligned rows). Zero-length samples are
allowed everywhere.

- ``cu_seqlens_from_lengths(lengths)``: the boundaries, int32 (what flash attention and ``PackedSeqParams`` take).
- ``position_ids_from_cu_seqlens(cu_seqlens)``: int64 ``[T]``, restarting at 0 at every boundary.
- ``pack_padded(padded, lengths)``: ``[B, S, *] -> [T, *]``.
- ``unpack_to_padded(packed, cu_seqlens, max_len, pad_value)``: ``[T, *] -> [B, max_len, *]``.

Everything is vectorised torch (no Python loop over samples) and keeps its input's device. ``pack_padded`` and
``unpack_to_padded`` are differentiable, and each is the other's adjoint (unpacking pads the gradient with 0).
On CUDA tensors the CUDA kernels of ``megaswift.ops.cuda_ext`` are used when that extension is available,
otherwise (and on every other device) the same results come from gather/scatter in plain torch.

The inputs are checked (one host sync for a handful of numbers): lengths must be >= 0, ``cu_seqlens`` must
start at 0 and never decrease, and the sizes must agree; a bad input raises ``ValueError``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

INT32_MAX = 2 ** 31 - 1


class _Layout(NamedTuple):
    cu: torch.Tensor       # int64 [B + 1]
    lengths: torch.Tensor  # int64 [B]
    total: int             # T = cu[-1]
    longest: int           # max(lengths), 0 when B == 0


def _int_vector(values, name: str, device=None) -> torch.Tensor:
    """``values`` (a tensor, array or sequence of ints) as a 1-D int64 tensor; a tensor keeps its device."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if t.ndim != 1:
        raise ValueError(f'{name} must be 1-D, got shape {tuple(t.shape)}')
    if not isinstance(values, torch.Tensor) and t.numel() == 0:
        t = t.long()  # an empty list comes back as float32
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f'{name} must hold integers, got {t.dtype}')
    return t.to(device=device if device is not None else t.device, dtype=torch.int64)


def _layout(cu: torch.Tensor, lengths: torch.Tensor, name: str) -> _Layout:
    """Checks ``cu``/``lengths`` (one host sync for four numbers) and measures them."""
    with_zero = torch.cat([lengths, lengths.new_zeros(1)])
    first, total, low, longest = torch.stack([cu[0], cu[-1], with_zero.min(), with_zero.max()]).tolist()
    if low < 0:
        i = int((lengths < 0).nonzero()[0])
        if name == 'lengths':
            raise ValueError(f'lengths must be >= 0, but lengths[{i}] = {int(lengths[i])}')
        raise ValueError(f'cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}] = {int(cu[i + 1])} < '
                         f'cu_seqlens[{i}] = {int(cu[i])}')
    if first != 0:
        raise ValueError(f'cu_seqlens must start at 0, got {first}')
    if total > INT32_MAX:
        raise ValueError(f'{total} tokens do not fit int32 cu_seqlens')
    return _Layout(cu, lengths, total, longest)


def _layout_from_lengths(lengths, device=None) -> _Layout:
    lens = _int_vector(lengths, 'lengths', device)
    return _layout(torch.cat([lens.new_zeros(1), lens.cumsum(0)]), lens, 'lengths')


def _layout_from_cu_seqlens(cu_seqlens, total: int | None, device=None) -> _Layout:
    cu = _int_vector(cu_seqlens, 'cu_seqlens', device)
    if cu.numel() == 0:
        raise ValueError('cu_seqlens needs at least one entry (the leading 0)')
    layout = _layout(cu, cu.diff(), 'cu_seqlens')
    if total is not None and int(total) != layout.total:
        raise ValueError(f'cu_seqlens ends at {layout.total} but there are {total} tokens')
    return layout


def _token_index(layout: _Layout, row_stride: int = 0) -> torch.Tensor:
    """int64 ``[T]``: for packed token ``t`` of sample ``b``, ``b * row_stride + (t - cu[b])``; that is its
    position in the sample (``row_stride`` 0) or its row in the padded layout flattened to ``[B * row_stride]``."""
    cu = layout.cu
    offsets = torch.arange(layout.lengths.numel(), device=cu.device) * row_stride - cu[:-1]
    return (torch.arange(layout.total, device=cu.device)
            + torch.repeat_interleave(offsets, layout.lengths, output_size=layout.total))


def _cuda_ext(t: torch.Tensor):
    """The loaded CUDA extension for a CUDA tensor when it is available, else None (use the torch path)."""
    if not t.is_cuda:
        return None
    try:
        from . import cuda_ext
    except ImportError:
        return None
    return cuda_ext.load() if cuda_ext.available() else None


# ------------------------------------------------------------------------------------------------ API
def cu_seqlens_from_lengths(lengths) -> torch.Tensor:
    """int32 ``[B + 1]``: ``0`` then the running sum of ``lengths`` (a tensor or a sequence of ints >= 0)."""
    return _layout_from_lengths(lengths).cu.int()


def position_ids_from_cu_seqlens(cu_seqlens, total: int | None = None) -> torch.Tensor:
    """int64 ``[T]``: each token's position in its sample (0 at every boundary). ``total``, when given, is
    checked against ``cu_seqlens[-1]``."""
    layout = _layout_from_cu_seqlens(cu_seqlens, total)
    ext = _cuda_ext(layout.cu) if layout.total else None
    if ext is not None:
        return ext.position_ids(layout.cu.int(), layout.total).long()
    return _token_index(layout)


def pack_padded(padded: torch.Tensor, lengths) -> torch.Tensor:
    """``[B, S, *] -> [T, *]``: the first ``lengths[b]`` entries of every row ``b``, concatenated."""
    if padded.ndim < 2:
        raise ValueError(f'padded must be [B, S, *], got shape {tuple(padded.shape)}')
    batch, width = padded.shape[:2]
    layout = _layout_from_lengths(lengths, padded.device)
    if layout.lengths.numel() != batch:
        raise ValueError(f'{layout.lengths.numel()} lengths for {batch} rows')
    if layout.longest > width:
        raise ValueError(f'a length of {layout.longest} exceeds the {width} columns of padded')
    return _move(padded, layout, width, 0, to_packed=True)


def unpack_to_padded(packed: torch.Tensor, cu_seqlens, max_len: int | None = None, pad_value=0) -> torch.Tensor:
    """``[T, *] -> [B, max_len, *]`` (``max_len`` defaults to the longest sample): sample ``b`` left-aligned in
    row ``b``, the rest ``pad_value``."""
    if packed.ndim < 1:
        raise ValueError('packed must be [T, *], got a scalar')
    layout = _layout_from_cu_seqlens(cu_seqlens, packed.shape[0], packed.device)
    width = layout.longest if max_len is None else int(max_len)
    if width < layout.longest:
        raise ValueError(f'max_len {width} is shorter than the longest sample ({layout.longest})')
    return _move(packed, layout, width, pad_value, to_packed=False)


# ------------------------------------------------------------------------------------ implementations
def _move(x: torch.Tensor, layout: _Layout, width: int, pad_value, to_packed: bool) -> torch.Tensor:
    """pack (``[B, width, *] -> [T, *]``) or unpack (the reverse, padding with ``pad_value``)."""
    batch = layout.lengths.numel()
    feature_shape = tuple(x.shape[2:] if to_packed else x.shape[1:])
    # the kernels move elements of 1, 2, 4 or 8 bytes; an empty move launches nothing
    ext = _cuda_ext(x) if layout.total and math.prod(feature_shape) and x.element_size() <= 8 else None
    if ext is not None:
        dims = (batch, width, layout.total, feature_shape)
        return _KernelMove.apply(x, layout.cu.int(), dims, pad_value, to_packed, ext)
    flat = _token_index(layout, width)
    if to_packed:
        return x.flatten(0, 1).index_select(0, flat)
    out = x.new_full((batch * width, *feature_shape), pad_value)
    return out.index_copy(0, flat, x).view(batch, width, *feature_shape)


def _kernel_move(ext, x: torch.Tensor, cu: torch.Tensor, dims: tuple, pad_value, to_packed: bool) -> torch.Tensor:
    batch, width, total, feature_shape = dims
    features = math.prod(feature_shape)
    if to_packed:
        out = ext.pack(x.reshape(batch, width, features).contiguous(), cu, total)  # total known: no sync
        return out.view(total, *feature_shape)
    out = ext.unpack(x.reshape(total, features).contiguous(), cu, width, pad_value)
    return out.view(batch, width, *feature_shape)


class _KernelMove(torch.autograd.Function):
    """pack or unpack through the CUDA extension; the backward of each is the other, padding with 0."""

    @staticmethod
    def forward(ctx, x, cu, dims, pad_value, to_packed, ext):
        ctx.save_for_backward(cu)
        ctx.dims, ctx.to_packed, ctx.ext = dims, to_packed, ext
        return _kernel_move(ext, x, cu, dims, pad_value, to_packed)

    @staticmethod
    def backward(ctx, grad):
        cu, = ctx.saved_tensors
        return _kernel_move(ctx.ext, grad, cu, ctx.dims, 0, not ctx.to_packed), None, None, None, None, None
