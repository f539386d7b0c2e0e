"""Packing encoded samples into rows, and padding-free collation for Megatron's ``thd`` attention.

Bin packing works on lengths only:
- ``pack_best_fit_decreasing``: longest sample first, each into the fullest bin that still has room
  (as ms-swift's ``binpack``); reorders samples, fewest rows.
- ``pack_in_order``: order-keeping next-fit (ms-swift's ``sequential``).

Collation turns the samples of one row (a bin, or a whole micro-batch when padding-free) into a single
``[1, T]`` row whose ``cu_seqlens`` keep attention inside each sample. Labels stay unshifted (HF
convention: ``labels[t]`` is the target of the logit at ``t - 1``); the first label of every sample is
-100 so the last token of one sample never predicts the first token of the next, and Megatron's
``roll(labels, -1)`` never wraps a target around the row.
"""
from __future__ import annotations

import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utils.errors import UserError
from .base import IGNORE_INDEX


class PackingError(UserError, ValueError):
    """A sample that cannot be packed (longer than ``packing_length``, empty, ...)."""


# ---------------------------------------------------------------------------------------------- bins
def _check_lengths(lengths, packing_length: int) -> np.ndarray:
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if int(packing_length) < 1:
        raise PackingError(f'packing_length must be >= 1, got {packing_length}')
    bad = np.flatnonzero((lens > packing_length) | (lens < 1))
    if bad.size:
        shown = ', '.join(f'sample {i} has {lens[i]} tokens' for i in bad[:5].tolist())
        more = f' (and {bad.size - 5} more)' if bad.size > 5 else ''
        raise PackingError(f'{bad.size} sample(s) cannot be packed into rows of packing_length {packing_length}: '
                           f'{shown}{more}; every sample needs 1..packing_length tokens (set max_length <= '
                           f'packing_length, or raise packing_length)')
    return lens


def pack_best_fit_decreasing(lengths: Sequence[int], packing_length: int) -> list[list[int]]:
    """Best-fit decreasing: indices per bin, each bin's indices ascending; bins in opening order.

    Samples go longest first (equal lengths by index); each goes into the bin with the least free room that
    still fits it (equal room: the lowest bin number), else opens a new bin. Free room is an integer in
    ``1..packing_length``, so the bins are kept in buckets by free room: a heap of bin numbers per bucket
    and a Python-int bitmask of non-empty buckets. "Smallest room >= n" is then the lowest set bit of
    ``mask >> n``: O(packing_length / 64) machine words per sample in C, about 1 s per million samples.
    """
    lens = _check_lengths(lengths, packing_length)
    order = np.argsort(-lens, kind='stable')
    bins: list[list[int]] = []
    buckets: dict[int, list[int]] = {}  # free room -> heap of bin numbers with exactly that room
    mask = 0                            # bit r set <=> buckets[r] is non-empty
    for i, n in zip(order.tolist(), lens[order].tolist()):
        fits = mask >> n
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            heap = buckets[room]
            b = heapq.heappop(heap)
            if not heap:
                del buckets[room]
                mask ^= 1 << room
            bins[b].append(i)
        else:
            room, b = packing_length, len(bins)
            bins.append([i])
        left = room - n
        if left:
            heap = buckets.get(left)
            if heap is None:
                buckets[left] = heap = []
                mask |= 1 << left
            heapq.heappush(heap, b)
    return [sorted(b) for b in bins]


def pack_in_order(lengths: Sequence[int], packing_length: int) -> list[list[int]]:
    """Order-keeping greedy (next-fit): the next sample joins the current bin if it fits, else opens a new one."""
    lens = _check_lengths(lengths, packing_length)
    bins: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lens.tolist()):
        if used + n > packing_length:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        bins.append(cur)
    return bins


PACKING_STRATEGIES = {'bfd': pack_best_fit_decreasing, 'in_order': pack_in_order}


def pack(lengths: Sequence[int], packing_length: int, strategy: str = 'bfd') -> list[list[int]]:
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"unknown packing strategy '{strategy}' (choose from {', '.join(PACKING_STRATEGIES)})")
    return PACKING_STRATEGIES[strategy](lengths, packing_length)


def packing_efficiency(bins_lengths: Sequence[Sequence[int]], packing_length: int) -> float:
    """Real tokens / (rows * packing_length); 1.0 means no padding at all."""
    if not bins_lengths:
        return 0.0
    return sum(int(sum(b)) for b in bins_lengths) / (len(bins_lengths) * packing_length)


# ------------------------------------------------------------------------------------------ padding
def padding_multiple(tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> int:
    """The multiple a packed row's length must be padded to, for tensor/sequence/context parallelism.

    - Context parallelism splits every sequence into ``2 * cp`` chunks (rank r keeps chunks r and
      2cp-1-r, the load-balanced "zigzag" split of causal attention), so the length must divide by 2*cp;
      each CP shard is then scattered over the TP ranks when sequence parallelism is on. ``tp * cp * 2``
      covers both and is what Megatron-Bridge/NeMo pad to (tp is included even without SP: it costs at
      most a few tokens and keeps the shape valid if SP gets switched on).
    - Without CP, sequence parallelism scatters the sequence dimension over the TP ranks: a multiple of tp.
    - Otherwise no constraint (1).
    Low-precision GEMMs add their own factors (x16 fp8) on top; multiply the result when using them.
    """
    if tp < 1 or cp < 1:
        raise ValueError(f'tp and cp must be >= 1, got tp={tp}, cp={cp}')
    if cp > 1:
        return tp * cp * 2
    return tp if sequence_parallel else 1


@dataclass
class PackedSeqParamsFallback:
    """Stand-in for ``megatron.core.packed_seq_params.PackedSeqParams`` while megatron-core is absent."""
    qkv_format: str | None = None
    cu_seqlens_q: Any = None
    cu_seqlens_kv: Any = None
    cu_seqlens_q_padded: Any = None
    cu_seqlens_kv_padded: Any = None
    max_seqlen_q: int | None = None
    max_seqlen_kv: int | None = None


@functools.lru_cache(maxsize=1)
def packed_seq_params_class() -> type:
    """megatron-core's ``PackedSeqParams`` when importable, else ``PackedSeqParamsFallback``."""
    try:
        from megatron.core.packed_seq_params import PackedSeqParams
    except ImportError:
        return PackedSeqParamsFallback
    return PackedSeqParams


def packed_seq_params(cu_seqlens, max_seqlen: int):
    """``PackedSeqParams(qkv_format='thd', ...)`` for one packed row (q and kv share the boundaries)."""
    # max_seqlen is a Python int: flash-attn 4 keys its compile cache on it and a tensor would force a sync.
    return packed_seq_params_class()(qkv_format='thd', cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                     max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


def cu_seqlens_from_position_ids(position_ids) -> np.ndarray:
    """Segment boundaries of a packed row: every index where the position restarts at 0, plus the total."""
    pos = np.asarray(position_ids).reshape(-1)
    return np.concatenate([np.flatnonzero(pos == 0), [pos.size]]).astype(np.int32)


# ---------------------------------------------------------------------------------------- collation
@dataclass
class PackedBatch:
    """One packed row. Tensors are ``[1, T]`` (``cu_seqlens``: ``[segments + 1]``, int32)."""
    input_ids: Any
    labels: Any
    position_ids: Any
    cu_seqlens: Any
    max_seqlen: int
    seq_lens: list[int] = field(default_factory=list)  # the real samples' lengths (no padding segment)
    loss_scale: Any = None                               # float32 [1, T], only when a sample carries one
    num_pad: int = 0                                     # tokens of the trailing padding segment

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    def packed_seq_params(self):
        return packed_seq_params(self.cu_seqlens, self.max_seqlen)

    def to_dict(self) -> dict[str, Any]:
        out = {'input_ids': self.input_ids, 'labels': self.labels, 'position_ids': self.position_ids,
               'cu_seqlens': self.cu_seqlens, 'max_seqlen': self.max_seqlen}
        if self.loss_scale is not None:
            out['loss_scale'] = self.loss_scale
        return out


def _sample_arrays(samples: Sequence[dict]) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    if not samples:
        raise PackingError('cannot collate an empty list of samples')
    ids, labels, lens = [], [], []
    for k, s in enumerate(samples):
        a = np.asarray(s['input_ids'], dtype=np.int64)
        lab = np.asarray(s['labels'], dtype=np.int64) if 'labels' in s else np.full(a.size, IGNORE_INDEX)
        if a.ndim != 1 or a.size == 0 or lab.shape != a.shape:
            raise PackingError(f'sample {k}: input_ids must be a non-empty 1-D sequence and labels the same length '
                               f'(got {a.shape} and {lab.shape})')
        ids.append(a)
        labels.append(lab)
        lens.append(a.size)
    return ids, labels, lens


def _sample_loss_scales(samples: Sequence[dict], labels: list[np.ndarray]) -> list[np.ndarray] | None:
    """Each sample's loss scale; binary samples get 1.0/0.0 from their labels. None when no sample has one."""
    if not any(s.get('loss_scale') is not None for s in samples):
        return None
    out = []
    for k, (s, lab) in enumerate(zip(samples, labels)):
        if s.get('loss_scale') is None:
            out.append((lab != IGNORE_INDEX).astype(np.float32))
            continue
        ls = np.asarray(s['loss_scale'], dtype=np.float32)
        if ls.shape != lab.shape:
            raise PackingError(f'sample {k}: loss_scale has {ls.size} values for {lab.size} tokens')
        out.append(ls)
    return out


def padding_free_collate(samples: Sequence[dict], pad_to_multiple_of: int = 1, pad_token_id: int = 0) -> PackedBatch:
    """Concatenate ``samples`` into one row (no length limit: a padding-free micro-batch).

    The row is right-padded to a multiple of ``pad_to_multiple_of`` (see ``padding_multiple``); the padding
    is its own pseudo-sequence in ``cu_seqlens`` (positions restart at 0, labels -100, loss scale 0) so
    attention never mixes it with real tokens.
    """
    import torch

    from ..ops.packing import cu_seqlens_from_lengths, position_ids_from_cu_seqlens
    ids, labels, lens = _sample_arrays(samples)
    scales = _sample_loss_scales(samples, labels)
    total = sum(lens)
    multiple = max(int(pad_to_multiple_of or 1), 1)
    num_pad = -total % multiple
    seg_lens = lens + ([num_pad] if num_pad else [])
    cu_seqlens = cu_seqlens_from_lengths(seg_lens)
    starts = cu_seqlens[:-1].numpy()
    input_ids = np.concatenate(ids + [np.full(num_pad, pad_token_id, dtype=np.int64)])
    label_row = np.concatenate(labels + [np.full(num_pad, IGNORE_INDEX, dtype=np.int64)])
    label_row[starts] = IGNORE_INDEX  # no target across a boundary (and none on the padding)
    position_ids = position_ids_from_cu_seqlens(cu_seqlens, input_ids.size)
    loss_scale = None
    if scales is not None:
        ls = np.concatenate(scales + [np.zeros(num_pad, dtype=np.float32)])
        ls[starts] = 0.0
        loss_scale = torch.from_numpy(ls)[None]
    return PackedBatch(input_ids=torch.from_numpy(input_ids)[None], labels=torch.from_numpy(label_row)[None],
                       position_ids=position_ids[None], cu_seqlens=cu_seqlens,
                       max_seqlen=int(max(seg_lens)), seq_lens=list(lens), loss_scale=loss_scale, num_pad=num_pad)


def collate_packed(samples: Sequence[dict], packing_length: int, pad_to_multiple_of: int = 1,
                   pad_token_id: int = 0, pad_to_packing_length: bool = False) -> PackedBatch:
    """One bin -> one row; checks the bin fits. ``pad_to_packing_length`` gives every row the same shape."""
    total = sum(len(s['input_ids']) for s in samples)
    if total > packing_length:
        raise PackingError(f'a bin of {len(samples)} samples has {total} tokens > packing_length {packing_length}')
    if pad_to_packing_length:
        multiple = max(int(pad_to_multiple_of or 1), 1)
        target = -(-packing_length // multiple) * multiple
        pad_to_multiple_of = target if total < target else multiple
    return padding_free_collate(samples, pad_to_multiple_of, pad_token_id)


def pad_collate(samples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, Any]:
    """Plain right padding to the longest sample (rounded up to a multiple): ``[B, L]`` tensors + attention_mask."""
    import torch

    from ..ops.packing import cu_seqlens_from_lengths, unpack_to_padded
    ids, labels, lens = _sample_arrays(samples)
    scales = _sample_loss_scales(samples, labels)
    multiple = max(int(pad_to_multiple_of or 1), 1)
    width = -(-max(lens) // multiple) * multiple
    n = len(samples)
    cu_seqlens = cu_seqlens_from_lengths(lens)

    def rows(arrays: list[np.ndarray], pad_value) -> torch.Tensor:  # the samples, left-aligned in [n, width]
        return unpack_to_padded(torch.from_numpy(np.concatenate(arrays)), cu_seqlens, width, pad_value)

    label_rows = rows(labels, IGNORE_INDEX)
    label_rows[:, 0] = IGNORE_INDEX  # the same invariant as packed rows (a rolled label never wraps around)
    out = {'input_ids': rows(ids, pad_token_id), 'labels': label_rows,
           'attention_mask': rows([np.ones(sum(lens), dtype=np.int64)], 0),
           'position_ids': torch.arange(width, dtype=torch.int64).expand(n, width).clone()}
    if scales is not None:
        out['loss_scale'] = rows(scales, 0.0)
        out['loss_scale'][:, 0] = 0.0
    return out
