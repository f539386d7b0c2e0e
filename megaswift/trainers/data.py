"""Training data: dataset -> template encode (cached) -> items (packed bins or samples) -> per-step micro-batches.

- An *item* is what ``--global_batch_size`` and ``--micro_batch_size`` count: a packed row (a best-fit-decreasing
  bin of samples filling at most ``--max_length`` tokens) with ``--packing true``, otherwise one sample.
- ``StepSampler`` is a deterministic endless stream of items: epoch ``e`` is the permutation drawn from
  ``(seed, e)``; an optimizer step takes the next ``global_batch_size`` items (a step may straddle two epochs).
  Its only state is the number of items consumed, saved in checkpoints, so a resumed run sees the same items.
- Every rank derives the same step items; DP rank ``r`` takes micro-batch ``k`` =
  ``items[(k * dp + r) * mbs : (k * dp + r + 1) * mbs]``.
- ``Collator`` turns a micro-batch into model inputs: one padding-free ``[1, T]`` row with ``PackedSeqParams``
  (``--padding_free``/``--packing``), or right-padded ``[B, L]`` rows. Labels and loss scales are shifted here
  (``roll(-1)``: position t holds the id predicted from t), which is safe because the first label of every
  sample is masked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..template.base import MaxLengthExceeded, TemplateError
from ..utils.errors import UserError

logger = logging.getLogger(__name__)


class TrainDataError(UserError, ValueError):
    pass


# ------------------------------------------------------------------------------------- plain text (pt)
class PlainTextEncoder:
    """``pt`` without a chat template: the row's ``text`` (or its messages' contents joined by newlines),
    tokenised with the tokenizer's own special tokens plus a final EOS; every token is trained."""

    name = 'plain_text'

    def __init__(self, tokenizer, max_length: int | None = None, truncation_strategy: str = 'delete'):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy

    def text_of(self, row: dict) -> str:
        if isinstance(row.get('text'), str):
            return row['text']
        if isinstance(row.get('messages'), list):
            parts = [m.get('content') for m in row['messages'] if isinstance(m, dict)]
            if parts and all(isinstance(p, str) for p in parts):
                return '\n'.join(parts)
        if isinstance(row.get('query'), str) or isinstance(row.get('response'), str):
            return '\n'.join(str(row[k]) for k in ('query', 'response') if row.get(k) is not None)
        raise TemplateError(f"pt needs a 'text' column (or 'messages'); the row has {sorted(row)}", 'text')

    def encode(self, row: dict) -> dict[str, Any]:
        text = self.text_of(row)
        if not text:
            raise TemplateError('is empty', 'text')
        ids = list(self.tokenizer(text, add_special_tokens=True)['input_ids'])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        n = self.max_length
        if n is not None and len(ids) > n:
            if self.truncation_strategy == 'delete':
                raise MaxLengthExceeded(f'{len(ids)} tokens exceed max_length {n}', 'text')
            if self.truncation_strategy == 'error':
                raise TemplateError(f'{len(ids)} tokens exceed max_length {n} (truncation_strategy error)', 'text')
            ids = ids[-n:] if self.truncation_strategy == 'left' else ids[:n]
        return {'input_ids': ids, 'labels': list(ids)}


def load_rows(specs: list[str], seed: int, chat: bool):
    """Rows of ``specs``: normalised chat rows, or raw rows (``text`` columns) for plain-text training."""
    from ..dataset import Dataset, load_dataset, parse_dataset_spec
    if chat:
        return load_dataset(specs, seed=seed)
    from ..dataset.loader import _subsample
    from ..dataset.readers import read_rows
    out, rng = Dataset(), np.random.default_rng(seed)
    for spec in specs:
        path, n = parse_dataset_spec(spec)
        part = Dataset()
        for row, src in read_rows(path):
            part.rows.append(row)
            part.sources.append(src)
        if not part.rows:
            raise TrainDataError(f"dataset '{path}' has no rows")
        if n is not None:
            part = part.select(_subsample(len(part), n, rng))
        out.rows += part.rows
        out.sources += part.sources
    return out


def split_rows(dataset, ratio: float, seed: int):
    """(train, val): ``ratio`` of the rows (at least one) held out, chosen with ``seed``."""
    if not ratio:
        return dataset, None
    n = len(dataset)
    k = max(1, int(round(n * ratio)))
    if k >= n:
        raise TrainDataError(f'--split_dataset_ratio {ratio} leaves no training rows out of {n}')
    perm = np.random.default_rng(seed).permutation(n)
    return dataset.select(sorted(perm[k:].tolist())), dataset.select(sorted(perm[:k].tolist()))


def encode_on_rank0_first(dataset, encoder, num_proc: int, desc: str):
    """Rank 0 encodes (and writes the cache); the other ranks then read the cache instead of encoding again."""
    from ..dataset.encode import encode_dataset
    dist = torch.distributed
    ready = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not ready or dist.get_rank() == 0:
        result, error = None, None
        try:
            result = encode_dataset(dataset, encoder, num_proc=num_proc, desc=desc)
        except Exception as e:  # noqa: BLE001 - re-raised after the others heard of it
            error = e
        if ready:
            dist.broadcast_object_list([None if error is None else f'{type(error).__name__}: {error}'], src=0)
        if error is not None:
            raise error
        return result
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise TrainDataError(f'encoding the dataset failed on rank 0: {box[0]}')
    return encode_dataset(dataset, encoder, num_proc=num_proc, desc=desc)


# ------------------------------------------------------------------------------------------ items
def build_items(encoded, packing: bool, max_length: int | None) -> list[list[int]]:
    """Packed bins (best-fit decreasing into rows of ``max_length``) or one item per sample."""
    if not packing:
        return [[i] for i in range(len(encoded))]
    from ..template.packing import pack_best_fit_decreasing
    return pack_best_fit_decreasing(encoded.lengths, int(max_length))


class StepSampler:
    """Deterministic endless item stream; a step takes the next ``global_batch_size`` items."""

    def __init__(self, num_items: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise TrainDataError('the training set is empty')
        self.num_items, self.global_batch_size = int(num_items), int(global_batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.consumed = 0  # items handed out so far: the resumable position
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                     else np.arange(self.num_items))
            self._cached = (epoch, order)
        return self._cached[1]

    def items_at(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, idx = divmod(pos, self.num_items)
            out.append(int(self.epoch_order(epoch)[idx]))
        return out

    def next_step(self) -> list[int]:
        items = self.items_at(self.consumed, self.global_batch_size)
        self.consumed += self.global_batch_size
        return items

    @property
    def epoch(self) -> float:
        return self.consumed / self.num_items

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, int(np.ceil(epochs * self.num_items / self.global_batch_size)))

    def state_dict(self) -> dict:
        return {'consumed': self.consumed, 'num_items': self.num_items, 'global_batch_size': self.global_batch_size,
                'seed': self.seed, 'shuffle': self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if int(state['num_items']) != self.num_items:
            logger.warning('the checkpoint was trained on %s items, this dataset has %d: the data order differs '
                           'from the interrupted run', state['num_items'], self.num_items)
        self.consumed = int(state['consumed'])


def rank_micro_batches(step_items: list[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    per_pass = dp_size * micro_batch_size
    out = []
    for k in range(len(step_items) // per_pass):
        start = (k * dp_size + dp_rank) * micro_batch_size
        out.append(step_items[start:start + micro_batch_size])
    return out


def eval_micro_batches(num_items: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """This DP rank's share of every evaluation item, in micro-batches (the last one may be smaller)."""
    mine = list(range(dp_rank, num_items, dp_size))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


# ------------------------------------------------------------------------------------------ collation
@dataclass
class Collator:
    encoded: Any                      # EncodedDataset
    items: list[list[int]]
    padding_free: bool = True
    pad_to_multiple_of: int = 1       # TP size under sequence parallelism
    pad_token_id: int = 0
    max_length: int | None = None

    def samples(self, item_ids: list[int]) -> list[dict]:
        out = []
        for item in item_ids:
            for i in self.items[item]:
                a = self.encoded.arrays(int(i))
                out.append({k: a[k] for k in ('input_ids', 'labels', 'loss_scale') if k in a})
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
        from ..template.packing import pad_collate, padding_free_collate
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
        return batch


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
    padding-free or padded rows' length."""
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
