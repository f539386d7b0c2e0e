"""Encoded samples -> model inputs: items (packed bins or samples) and the collation of a micro-batch.

- An *item* is what ``--global_batch_size`` and ``--micro_batch_size`` count: a packed row (a best-fit-decreasing
  bin of samples filling at most ``--max_length`` tokens) with ``--packing true``, otherwise one sample
  (``build_items``).
- ``Collator`` turns a micro-batch of items into model inputs: one padding-free ``[1, T]`` row with
  ``PackedSeqParams`` (``--padding_free``/``--packing``), or right-padded ``[B, L]`` rows. Labels and loss scales
  are shifted here (``roll(-1)``: position t holds the id predicted from t), which is safe because the first label
  of every sample is masked.
- ``Collator.columns`` names the encoded columns an objective needs besides input_ids/labels/loss_scale (see
  ``Collator.extra_columns``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..utils.constants import IGNORE_INDEX
from ..utils.errors import TrainDataError
from .packing import pack_best_fit_decreasing, pad_collate, padding_free_collate

BASE_COLUMNS = ('input_ids', 'labels', 'loss_scale')
SHIFTED_SUFFIXES = ('labels', 'loss_scale')  # extra per-token columns aligned with the targets, shifted like them


def build_items(encoded, packing: bool, max_length: int | None) -> list[list[int]]:
    """Packed bins (best-fit decreasing into rows of ``max_length``) or one item per sample."""
    if not packing:
        return [[i] for i in range(len(encoded))]
    return pack_best_fit_decreasing(encoded.lengths, int(max_length))


@dataclass
class Collator:
    encoded: Any                      # EncodedDataset
    items: list[list[int]]
    padding_free: bool = True
    pad_to_multiple_of: int = 1       # TP size under sequence parallelism
    pad_token_id: int = 0
    max_length: int | None = None
    columns: tuple[str, ...] = ()     # encoded columns to carry besides input_ids/labels/loss_scale

    def __post_init__(self):
        self.columns = tuple(self.columns)
        always = sorted(set(self.columns) & set(BASE_COLUMNS))
        if always:
            raise ValueError(f'{always} are always collated; Collator.columns names only the extra columns')

    def samples(self, item_ids: list[int]) -> list[dict]:
        out = []
        for item in item_ids:
            for i in self.items[item]:
                a = self.encoded.arrays(int(i))
                sample = {k: a[k] for k in BASE_COLUMNS if k in a}
                for name in self.columns:
                    if name not in a:
                        raise TrainDataError(f"sample {int(i)} has no column '{name}', which the objective needs "
                                             f'(the encoded sample has {sorted(a)})')
                    sample[name] = a[name]
                out.append(sample)
        return out

    def num_tokens(self, item_ids: list[int]) -> int:
        return int(sum(int(self.encoded.lengths[i]) for item in item_ids for i in self.items[item]))

    def row_length(self, item_ids: list[int]) -> int:
        """Tokens of the collated row (padding-free) or of the longest sample (padded), before rounding."""
        lens = [int(self.encoded.lengths[i]) for item in item_ids for i in self.items[item]]
        return sum(lens) if self.padding_free else max(lens)

    def __call__(self, item_ids: list[int], pad_to: int | None = None) -> dict[str, Any]:
        """One micro-batch; ``pad_to`` fixes the (padding-free row's or padded rows') length, which the
        interleaved pipeline schedule needs (all its micro-batches share one shape)."""
        samples = self.samples(item_ids)
        multiple = self.pad_to_multiple_of
        if pad_to is not None:
            if pad_to < self.row_length(item_ids) or pad_to % max(1, self.pad_to_multiple_of):
                raise ValueError(f'pad_to {pad_to} is shorter than the row or not a multiple of {multiple}')
            multiple = pad_to
        if self.padding_free:
            row = padding_free_collate(samples, multiple, self.pad_token_id)
            batch = {'input_ids': row.input_ids, 'position_ids': row.position_ids, 'labels': row.labels,
                     'loss_scale': row.loss_scale, 'packed_seq_params': row.packed_seq_params()}
        else:
            out = pad_collate(samples, self.pad_token_id, multiple)
            batch = {'input_ids': out['input_ids'], 'position_ids': out['position_ids'], 'labels': out['labels'],
                     'loss_scale': out.get('loss_scale'), 'packed_seq_params': None}
        batch['labels'] = torch.roll(batch['labels'], -1, dims=-1)
        if batch['loss_scale'] is not None:
            batch['loss_scale'] = torch.roll(batch['loss_scale'], -1, dims=-1)
        batch['num_real_tokens'] = sum(len(s['input_ids']) for s in samples)
        batch['num_computed_tokens'] = int(batch['input_ids'].numel())
        batch['num_samples'] = len(samples)
        batch.update(self.extra_columns(samples, int(batch['input_ids'].shape[-1])))
        return batch

    def extra_columns(self, samples: list[dict], width: int) -> dict[str, torch.Tensor]:
        """``self.columns`` of ``samples``, in a row (or rows) of ``width`` tokens like the input ids.

        - A column with one value per token of every sample is laid out like ``loss_scale``: concatenated in the
          padding-free ``[1, width]`` row, right-padded in the ``[B, width]`` rows. A name ending in ``labels`` or
          ``loss_scale`` is also shifted like them (each sample's first value masked, then ``roll(-1)``); its
          padding and mask are ``IGNORE_INDEX`` (``*labels``) or 0 (``*loss_scale``). Any other per-token column
          is neither masked nor shifted, padded with 0.
        - A column with one number per sample (a KTO label, a margin) is a ``[num_samples]`` tensor.
        Integers become int64, floats float32, booleans stay booleans (``*labels``: int64, ``*loss_scale``:
        float32).
        """
        out = {}
        lens = [len(s['input_ids']) for s in samples]
        for name in self.columns:
            values = [np.asarray(s[name]) for s in samples]
            dtype = _column_dtype(name, values)
            if all(v.ndim == 1 and v.size == n for v, n in zip(values, lens)):
                out[name] = self._per_token(name, [v.astype(dtype) for v in values], width)
            elif all(v.size == 1 for v in values):
                out[name] = torch.from_numpy(np.stack([v.reshape(()) for v in values]).astype(dtype))
            else:
                k = next(k for k, v in enumerate(values) if v.size != 1 and v.size != lens[k])
                raise TrainDataError(f"column '{name}' of sample {k} of the micro-batch has {values[k].size} values "
                                     f'for {lens[k]} tokens: a column holds one value per token or one per sample')
        return out

    def _per_token(self, name: str, values: list[np.ndarray], width: int) -> torch.Tensor:
        shifted = name.endswith(SHIFTED_SUFFIXES)
        fill = IGNORE_INDEX if name.endswith('labels') else 0
        if shifted:
            values = [v.copy() for v in values]
            for v in values:
                v[0] = fill  # no target across a sample boundary (as the labels' first position)
        if self.padding_free:
            total = sum(v.size for v in values)
            rows = np.concatenate(values + [np.full(width - total, fill, dtype=values[0].dtype)])[None]
        else:
            rows = np.full((len(values), width), fill, dtype=values[0].dtype)
            for k, v in enumerate(values):
                rows[k, :v.size] = v
        t = torch.from_numpy(rows)
        return torch.roll(t, -1, dims=-1) if shifted else t


def _column_dtype(name: str, values: list[np.ndarray]) -> type:
    if name.endswith('labels'):
        return np.int64
    if name.endswith('loss_scale'):
        return np.float32
    return {'b': np.bool_, 'f': np.float32}.get(np.result_type(*values).kind, np.int64)


def to_device(batch: dict, device) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
        elif k == 'packed_seq_params' and v is not None:
            for name in ('cu_seqlens_q', 'cu_seqlens_kv', 'cu_seqlens_q_padded', 'cu_seqlens_kv_padded'):
                t = getattr(v, name, None)
                if isinstance(t, torch.Tensor):
                    setattr(v, name, t.to(device, dtype=torch.int32))
        out[k] = v
    return out


def packing_efficiency(collator: Collator, step_items: list[int], packing: bool, max_length: int | None,
                       micro_batches_all_ranks: list[list[int]]) -> float:
    """Real tokens / tokens the model computes: bins filled against --max_length when packing, else the
    padding-free or padded rows' length. (``packing.packing_efficiency`` is the same ratio for bins alone.)"""
    real = collator.num_tokens(step_items)
    if packing and max_length:
        return real / (len(step_items) * max_length)
    computed = 0
    mult = max(1, collator.pad_to_multiple_of)
    for mb in micro_batches_all_ranks:
        lens = [int(collator.encoded.lengths[i]) for item in mb for i in collator.items[item]]
        if collator.padding_free:
            computed += -(-sum(lens) // mult) * mult
        else:
            computed += len(lens) * (-(-max(lens) // mult) * mult)
    return real / max(computed, 1)


def collate_micro_batches(collator: Collator, micro_batches: list[list[int]], fixed_shape: bool) -> list[dict]:
    """Collate a step's micro-batches; ``fixed_shape`` pads them all to the longest one (rounded up)."""
    pad_to = None
    if fixed_shape and micro_batches:
        mult = max(1, collator.pad_to_multiple_of)
        pad_to = -(-max(collator.row_length(mb) for mb in micro_batches) // mult) * mult
    return [collator(mb, pad_to) for mb in micro_batches]
