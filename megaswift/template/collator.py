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
- ``Collator.sequences`` names the model sequences one encoded sample holds by their column prefixes:
  ``('',)`` (default: ``input_ids``...), ``('chosen_', 'rejected_')`` for preference pairs, ``('', 'kl_')`` for KTO.
  Each sequence is collated as a sample of its own (its own ``cu_seqlens`` entry, or its own padded row), the
  sequences of one encoded sample consecutively: encoded sample k's sequence j is sequence
  ``k * len(sequences) + j``. Packing bins use ``EncodedDataset.lengths`` (all of a sample's sequences), so the
  sequences of a sample always share a row. ``sequence_ids`` and ``last_token_positions`` locate the sequences of a
  collated batch.
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
    sequences: tuple[str, ...] = ('',)  # column prefixes of the model sequences of one encoded sample, in order

    def __post_init__(self):
        self.columns = tuple(self.columns)
        self.sequences = tuple(self.sequences)
        if not self.sequences or len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f'Collator.sequences must name distinct column prefixes, got {self.sequences}')
        always = sorted(set(self.columns) & set(BASE_COLUMNS))
        if always:
            raise ValueError(f'{always} are always collated; Collator.columns names only the extra columns')

    # ------------------------------------------------------------------ what a micro-batch holds
    def sample_indices(self, item_ids: list[int]) -> list[int]:
        """The encoded samples of a micro-batch, in collation order."""
        return [int(i) for item in item_ids for i in self.items[item]]

    def sequence_lengths(self, item_ids: list[int]) -> list[int]:
        """Tokens of each model sequence of a micro-batch, in collation order (sample k's sequence j is
        ``k * len(sequences) + j``)."""
        samples = self.sample_indices(item_ids)
        if self.sequences == ('',):
            return [int(self.encoded.lengths[i]) for i in samples]
        lens = []
        for p in self.sequences:
            column = self.encoded.lens.get(f'{p}input_ids')
            if column is None:
                raise TrainDataError(f"the encoded samples have no column '{p}input_ids', which the objective's "
                                     f'sequences {self.sequences} need: encode the dataset in the template mode the '
                                     f'objective uses')
            lens.append(column)
        return [int(column[i]) for i in samples for column in lens]

    def samples(self, item_ids: list[int]) -> list[dict]:
        """One dict per model sequence (``input_ids``, ``labels``[, ``loss_scale``] and ``columns``), in collation
        order; see ``extra_columns`` for how a column is read."""
        seqs, columns = self.gather(item_ids)
        per = len(self.sequences)
        for name, values in columns.items():
            for k, seq in enumerate(seqs):
                kind, value = values[k // per]
                seq[name] = value[k % per] if kind == 'sequence' else value
        return seqs

    def gather(self, item_ids: list[int]) -> tuple[list[dict], dict[str, list[tuple[str, Any]]]]:
        """The sequences' base columns, and per extra column one ``('sequence', [value per sequence])`` or
        ``('sample', value)`` entry per encoded sample."""
        seqs, columns = [], {name: [] for name in self.columns}
        for i in self.sample_indices(item_ids):
            a = self.encoded.arrays(i)
            for p in self.sequences:
                if f'{p}input_ids' not in a:
                    raise TrainDataError(f"sample {i} has no column '{p}input_ids', which the objective's sequences "
                                         f'{self.sequences} need (the encoded sample has {sorted(a)}): encode the '
                                         f'dataset in the template mode the objective uses')
                seqs.append({k: a[p + k] for k in BASE_COLUMNS if p + k in a})
            for name in self.columns:
                if all(p + name in a for p in self.sequences):
                    columns[name].append(('sequence', [a[p + name] for p in self.sequences]))
                elif name in a:
                    columns[name].append(('sample', a[name]))
                else:
                    raise TrainDataError(f"sample {i} has no column '{name}', which the objective needs "
                                         f'(the encoded sample has {sorted(a)})')
        return seqs, columns

    def num_tokens(self, item_ids: list[int]) -> int:
        return int(sum(self.sequence_lengths(item_ids)))

    def row_length(self, item_ids: list[int]) -> int:
        """Tokens of the collated row (padding-free) or of the longest sequence (padded), before rounding."""
        lens = self.sequence_lengths(item_ids)
        return sum(lens) if self.padding_free else max(lens)

    # ------------------------------------------------------------------ collation
    def __call__(self, item_ids: list[int], pad_to: int | None = None) -> dict[str, Any]:
        """One micro-batch; ``pad_to`` fixes the (padding-free row's or padded rows') length, which the
        interleaved pipeline schedule needs (all its micro-batches share one shape).

        Besides the model inputs: ``num_real_tokens``, ``num_computed_tokens``, ``num_samples`` (encoded samples),
        ``num_sequences`` (model sequences: ``num_samples * sequences_per_sample``), ``sequences_per_sample`` and
        ``sequence_lengths`` (int64 ``[num_sequences]``, each sequence's real tokens; see ``sequence_ids``)."""
        seqs, columns = self.gather(item_ids)
        if pad_to is not None and pad_to < self.row_length(item_ids):
            raise ValueError(f'pad_to {pad_to} is shorter than the row ({self.row_length(item_ids)} tokens)')
        return self.collate(seqs, columns, pad_to)

    def collate(self, seqs: list[dict], columns: dict | None = None, pad_to: int | None = None) -> dict[str, Any]:
        """The micro-batch of the model sequences ``seqs`` (dicts of ``input_ids``, ``labels``[, ``loss_scale``],
        labels not yet shifted; ``columns`` as ``gather`` reads them): what ``__call__`` returns for items, also
        for sequences made during training (completions generated by the model)."""
        columns = columns or {}
        multiple = self.pad_to_multiple_of
        if pad_to is not None:
            if pad_to % max(1, self.pad_to_multiple_of):
                raise ValueError(f'pad_to {pad_to} is not a multiple of {multiple}')
            multiple = pad_to
        if self.padding_free:
            row = padding_free_collate(seqs, multiple, self.pad_token_id)
            batch = {'input_ids': row.input_ids, 'position_ids': row.position_ids, 'labels': row.labels,
                     'loss_scale': row.loss_scale, 'packed_seq_params': row.packed_seq_params()}
        else:
            out = pad_collate(seqs, self.pad_token_id, multiple)
            batch = {'input_ids': out['input_ids'], 'position_ids': out['position_ids'], 'labels': out['labels'],
                     'loss_scale': out.get('loss_scale'), 'packed_seq_params': None}
        batch['labels'] = torch.roll(batch['labels'], -1, dims=-1)
        if batch['loss_scale'] is not None:
            batch['loss_scale'] = torch.roll(batch['loss_scale'], -1, dims=-1)
        lens = [len(s['input_ids']) for s in seqs]
        batch['num_real_tokens'] = sum(lens)
        batch['num_computed_tokens'] = int(batch['input_ids'].numel())
        batch['num_samples'] = len(seqs) // len(self.sequences)
        batch['num_sequences'] = len(seqs)
        batch['sequences_per_sample'] = len(self.sequences)
        batch['sequence_lengths'] = torch.tensor(lens, dtype=torch.int64)
        batch.update(self.extra_columns(columns, lens, int(batch['input_ids'].shape[-1])))
        return batch

    def extra_columns(self, columns: dict[str, list[tuple[str, Any]]], lens: list[int],
                      width: int) -> dict[str, torch.Tensor]:
        """``self.columns`` (as ``gather`` reads them) for sequences of ``lens`` tokens, in a row (or rows) of
        ``width`` tokens like the input ids.

        A column is read per sequence, as ``f'{prefix}{name}'`` for every prefix of ``sequences`` (with the default
        ``('',)`` that is ``name`` itself), when the sample has all of those; otherwise as ``name``, one value per
        encoded sample.

        - A per-sequence column with one value per token of every sequence is laid out like ``loss_scale``:
          concatenated in the padding-free ``[1, width]`` row, right-padded in the ``[num_sequences, width]`` rows. A
          name ending in ``labels`` or ``loss_scale`` is also shifted like them (each sequence's first value masked,
          then ``roll(-1)``); its padding and mask are ``IGNORE_INDEX`` (``*labels``) or 0 (``*loss_scale``). Any
          other per-token column is neither masked nor shifted, padded with 0.
        - A per-sequence column with one number per sequence is a ``[num_sequences]`` tensor.
        - A column read as ``name`` with several sequences (a KTO ``label``, a pair's ``margin``) holds one number
          per encoded sample: a ``[num_samples]`` tensor. (With the default ``('',)``, sequences are samples.)
        Integers become int64, floats float32, booleans stay booleans (``*labels``: int64, ``*loss_scale``:
        float32).
        """
        out = {}
        per = len(self.sequences)
        for name, entries in columns.items():
            kinds = {kind for kind, _ in entries}
            if len(kinds) > 1:
                raise TrainDataError(f"column '{name}' is per sequence ('{self.sequences[-1]}{name}') in some samples "
                                     f'of the micro-batch and per sample in others')
            if kinds == {'sample'}:
                values = [np.asarray(v) for _, v in entries]
                bad = next((k for k, v in enumerate(values) if v.size != 1), None)
                if bad is not None:
                    raise TrainDataError(f"column '{name}' of sample {bad} of the micro-batch has {values[bad].size} "
                                         f'values: with several sequences per sample a per-token column is read as '
                                         f"'{{prefix}}{name}' for each prefix of {self.sequences}")
                dtype = _column_dtype(name, values)
                out[name] = torch.from_numpy(np.stack([v.reshape(()) for v in values]).astype(dtype))
                continue
            values = [np.asarray(v) for _, vs in entries for v in vs]
            dtype = _column_dtype(name, values)
            if all(v.ndim == 1 and v.size == n for v, n in zip(values, lens)):
                out[name] = self._per_token(name, [v.astype(dtype) for v in values], width)
            elif all(v.size == 1 for v in values):
                out[name] = torch.from_numpy(np.stack([v.reshape(()) for v in values]).astype(dtype))
            else:
                k = next(k for k, v in enumerate(values) if v.size != 1 and v.size != lens[k])
                where = (f'sample {k}' if per == 1
                         else f"sequence {k} ('{self.sequences[k % per]}{name}' of sample {k // per})")
                raise TrainDataError(f"column '{name}' of {where} of the micro-batch has {values[k].size} values "
                                     f'for {lens[k]} tokens: a column holds one value per token or one per sample')
        return out

    def _per_token(self, name: str, values: list[np.ndarray], width: int) -> torch.Tensor:
        shifted = name.endswith(SHIFTED_SUFFIXES)
        fill = IGNORE_INDEX if name.endswith('labels') else 0
        if shifted:
            values = [v.copy() for v in values]
            for v in values:
                v[0] = fill  # no target across a sequence boundary (as the labels' first position)
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


def _num_sequences(batch: dict) -> int:
    if batch.get('sequence_lengths') is not None:
        return int(batch['sequence_lengths'].numel())
    if 'num_sequences' in batch:
        return int(batch['num_sequences'])
    raise ValueError("the batch has neither 'sequence_lengths' nor 'num_sequences' (collate it with Collator)")


def _like(batch: dict) -> torch.Tensor:
    return batch['input_ids'] if batch.get('input_ids') is not None else batch['labels']


def sequence_ids(batch: dict) -> torch.Tensor:
    """int64, shaped like ``batch['input_ids']`` (on its device): the index (0 .. num_sequences - 1, in collation
    order) of the sequence each position belongs to, -1 on padding.

    Padding-free: from the ``cu_seqlens`` of ``packed_seq_params`` (the trailing padding segment, and anything past
    ``num_sequences`` segments, is -1). Padded rows: row r is sequence r, real up to ``sequence_lengths[r]``. Labels
    are shifted, so position t's target (the token at t + 1) belongs to the sequence of position t; the last
    position of every sequence has no target (``IGNORE_INDEX``)."""
    like = _like(batch)
    device, width = like.device, int(like.shape[-1])
    n = _num_sequences(batch)
    pos = torch.arange(width, device=device)
    params = batch.get('packed_seq_params')
    if params is not None:
        cu = params.cu_seqlens_q.to(device=device, dtype=torch.int64).reshape(-1)
        seg = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
        return torch.where(seg < n, seg, torch.full_like(seg, -1)).reshape(like.shape)
    lens = batch['sequence_lengths'].to(device=device, dtype=torch.int64)
    if like.dim() != 2 or like.shape[0] != n:
        raise ValueError(f'padded rows {tuple(like.shape)} do not hold one sequence per row ({n} sequences)')
    rows = torch.arange(n, device=device)[:, None].expand(n, width)
    return torch.where(pos[None, :] < lens[:, None], rows, torch.full_like(rows, -1))


def last_token_positions(batch: dict) -> torch.Tensor:
    """int64 ``[num_sequences]``: the flat index (into ``input_ids.reshape(-1)``) of each sequence's last real
    token, in collation order (what a reward model's value is read at)."""
    like = _like(batch)
    n = _num_sequences(batch)
    params = batch.get('packed_seq_params')
    if params is not None:
        cu = params.cu_seqlens_q.to(device=like.device, dtype=torch.int64).reshape(-1)
        return cu[1:n + 1] - 1
    lens = batch['sequence_lengths'].to(device=like.device, dtype=torch.int64)
    return torch.arange(n, device=like.device) * int(like.shape[-1]) + lens - 1


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
        lens = collator.sequence_lengths(mb)
        if collator.padding_free:
            computed += -(-sum(lens) // mult) * mult
        else:  # one row per sequence, as long as the longest
            computed += len(lens) * (-(-max(lens) // mult) * mult)
    return real / max(computed, 1)


def collate_micro_batches(collator: Collator, micro_batches: list[list[int]], fixed_shape: bool) -> list[dict]:
    """Collate a step's micro-batches; ``fixed_shape`` pads them all to the longest one (rounded up)."""
    pad_to = None
    if fixed_shape and micro_batches:
        mult = max(1, collator.pad_to_multiple_of)
        pad_to = -(-max(collator.row_length(mb) for mb in micro_batches) // mult) * mult
    return [collator(mb, pad_to) for mb in micro_batches]
