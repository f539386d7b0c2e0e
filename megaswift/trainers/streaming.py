"""``--streaming true``: training on a dataset larger than RAM, with bounded memory and exact resume.

``StreamingSampler`` takes ``StepSampler``'s place (``TrainData.sampler``). Rows come from a ``RowStream`` (lazy
read, shuffle buffer of ``--shuffle_buffer_size`` seeded by ``--data_seed``, normalised) and are encoded a window
of ``--packing_interval`` rows at a time; with ``--packing`` the window's samples are packed best-fit-decreasing
into rows of ``--max_length`` (``build_items``) and the bins put in a seeded order, otherwise each sample is an
item. A step takes the next ``global_batch_size`` items and sets ``TrainData.collator`` to a ``Collator`` of their
samples (its item ids are ``0 .. global_batch_size - 1``), so the loop collates them and splits them across DP
ranks (``rank_micro_batches``) as it does without streaming: every rank reads the same stream, and a DP run follows
the single-process trajectory. Memory: the shuffle buffer's raw rows, one encoded window and one step.

Objectives whose samples hold several sequences (DPO pairs, KTO with its KL completion) stream the same way: a
sample's sequences stay together in one packed row; KTO's KL completion is the next row's answer within the window.

When the files end, the stream restarts (the next epoch, reshuffled with ``(seed, epoch)``). The position saved
in checkpoints is (epoch, rows of that epoch before the current window, items taken from the window); resume
reads the rows before the window without decoding them, encodes that one window again and drops the items
already taken, so the resumed run sees the same steps.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from ..dataset.encode import AllRowsSkipped, EncodedDataset, encode_rows
from ..dataset.streaming import RowStream
from ..template.collator import build_items
from ..utils.errors import TrainDataError

logger = logging.getLogger(__name__)

Item = tuple[EncodedDataset, list[int]]  # a window's samples and the indices of one item's samples in it


def encode_window(encoder, rows: list[tuple[dict, Any]], prepare_rows=None) -> EncodedDataset:
    """Encode ``(row, source)`` pairs; rows over ``max_length`` ('delete') are left out and counted.
    ``prepare_rows`` (a ``Dataset`` -> ``Dataset``, e.g. KTO's ``add_kl_responses``) sees the window first."""
    values, sources = [row for row, _ in rows], [src for _, src in rows]
    if prepare_rows is not None:
        from ..dataset import Dataset
        values = prepare_rows(Dataset(values, sources)).rows
    return encode_rows(encoder, values, sources)


def gather_samples(items: list[Item]) -> tuple[EncodedDataset, list[list[int]]]:
    """The samples of ``items`` in one ``EncodedDataset`` and each item's sample indices in it."""
    keys = sorted({k for encoded, _ in items for k in encoded.values})
    values: dict[str, list] = {k: [] for k in keys}
    lens: dict[str, list[int]] = {k: [] for k in keys}
    bins, n = [], 0
    for encoded, indices in items:
        bins.append(list(range(n, n + len(indices))))
        n += len(indices)
        for i in indices:
            arrays = encoded.arrays(int(i))
            for k in keys:
                v = arrays.get(k)
                lens[k].append(-1 if v is None else v.size)
                if v is not None:
                    values[k].append(v.reshape(-1))
    columns = {k: (np.concatenate(values[k]) if values[k] else np.zeros(0, np.int32), np.asarray(lens[k], np.int64))
               for k in keys}
    scalars = frozenset().union(*(encoded.scalars for encoded, _ in items))
    return EncodedDataset(columns, np.arange(n), n, scalars=scalars), bins


class StreamingSampler:
    """The endless, deterministic item stream of ``--streaming``: ``next_step`` sets ``data.collator`` (``data``:
    the ``TrainData``, its collator the template) to the step's samples and returns their item ids;
    ``state_dict`` / ``load_state_dict`` hold the stream position."""

    def __init__(self, stream: RowStream, encoder, data, global_batch_size: int, window: int, packing: bool,
                 max_length: int | None, seed: int, shuffle: bool = True, prepare_rows=None):
        self.stream, self.encoder, self.data, self._collator = stream, encoder, data, data.collator
        self.prepare_rows = prepare_rows
        self.global_batch_size, self.window = int(global_batch_size), int(window)
        self.packing, self.max_length = bool(packing), max_length
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.consumed = 0          # items handed out so far
        self.epoch_rows = None     # rows in an epoch, known once the first epoch ended
        self.skipped = 0           # rows longer than max_length left out (rows encoded by this process)
        self._items: list[Item] = []
        self._window_start = 0     # rows of this epoch before the current window
        self._taken = 0            # items of the current window handed out
        self._epoch_samples = 0
        stream.open(0)
        self._fill()  # the first window now: bad rows fail before the model is built

    @property
    def config(self) -> dict:
        """What the item order depends on, besides the files."""
        return {'dataset': list(self.stream.specs), 'seed': self.seed, 'shuffle': self.shuffle,
                'shuffle_buffer_size': self.stream.buffer_size, 'packing_interval': self.window,
                'packing': self.packing, 'max_length': self.max_length, 'global_batch_size': self.global_batch_size}

    # ------------------------------------------------------------------------------------------ windows
    def _fill(self) -> None:
        """Encode the next window that has samples, starting the next epoch when the files end."""
        while True:
            start = self.stream.position
            rows = self.stream.take(self.window)
            if not rows:
                self._end_epoch()
                continue
            encoded = encode_window(self.encoder, rows, self.prepare_rows)
            self.skipped += encoded.num_skipped
            self._epoch_samples += len(encoded)
            if len(encoded):
                items = build_items(encoded, self.packing, self.max_length)
                if self.packing and self.shuffle:  # best-fit-decreasing opens the bins of the longest samples first
                    order = np.random.default_rng([self.seed, self.stream.epoch, start]).permutation(len(items))
                    items = [items[i] for i in order.tolist()]
                self._items = [(encoded, bin_) for bin_ in items]
                self._window_start, self._taken = start, 0
                return

    def _end_epoch(self) -> None:
        epoch, rows = self.stream.epoch, self.stream.position
        if not self._epoch_samples:
            raise AllRowsSkipped(f'all {rows} rows of --dataset are longer than max_length {self.max_length} and '
                                 f"were skipped (truncation_strategy 'delete'): raise --max_length or use "
                                 f"--truncation_strategy left/right")
        self.epoch_rows = rows
        logger.info('streaming: epoch %d ended after %d rows (%d longer than max_length skipped so far); '
                    'restarting --dataset, reshuffled, for epoch %d', epoch, rows, self.skipped, epoch + 1)
        self._epoch_samples = 0
        self.stream.open(epoch + 1)

    # ------------------------------------------------------------------------------------------ steps
    def next_step(self) -> list[int]:
        picked = []
        for _ in range(self.global_batch_size):
            if self._taken == len(self._items):
                self._fill()
            picked.append(self._items[self._taken])
            self._taken += 1
        encoded, bins = gather_samples(picked)
        self.data.collator = dataclasses.replace(self._collator, encoded=encoded, items=bins)
        self.consumed += self.global_batch_size
        return list(range(self.global_batch_size))

    @property
    def epoch(self) -> float:
        """Epochs done; with the fraction of the current one once an epoch's length is known."""
        if not self.epoch_rows:
            return float(self.stream.epoch)
        window_rows = self.stream.position - self._window_start
        done = self._window_start + window_rows * self._taken / max(len(self._items), 1)
        return self.stream.epoch + min(done / self.epoch_rows, 1.0)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {'streaming': True, 'consumed': self.consumed, 'epoch': self.stream.epoch,
                'window_start': self._window_start, 'window_taken': self._taken, 'epoch_rows': self.epoch_rows,
                'config': self.config}

    def load_state_dict(self, state: dict) -> None:
        if not state.get('streaming'):
            raise TrainDataError('the checkpoint was trained without --streaming; resume it without --streaming')
        if state.get('config') != self.config:
            changed = sorted(k for k in self.config if (state.get('config') or {}).get(k) != self.config[k])
            logger.warning('the checkpoint streamed its data with other %s: the data order differs from the '
                           'interrupted run', ', '.join(changed))
        self.epoch_rows = state.get('epoch_rows')
        self._epoch_samples = 0
        self.stream.open(int(state['epoch']), skip=int(state['window_start']))
        self._fill()
        taken = int(state['window_taken'])
        if taken > len(self._items):
            logger.warning('the data window at the checkpoint had more items than it has now (%d > %d): the '
                           'files changed since it was saved', taken, len(self._items))
        self._taken = min(taken, len(self._items))
        self.consumed = int(state['consumed'])


def streaming_sampler(args, encoder, data, max_length: int, prepare_rows=None) -> StreamingSampler:
    """The sampler of ``--streaming``; ``max_length`` is a packed row's length (a sample's sequences share one)."""
    stream = RowStream(args.dataset, args.data_seed, args.shuffle_buffer_size, chat=args.use_chat_template,
                       shuffle=args.train_dataloader_shuffle)
    sampler = StreamingSampler(stream, encoder, data, args.global_batch_size, args.packing_interval,
                               args.packing, max_length, args.data_seed, args.train_dataloader_shuffle, prepare_rows)
    if args.dataset_num_proc > 1:
        logger.warning('--dataset_num_proc %d is not used with --streaming: each window is encoded in this process',
                       args.dataset_num_proc)
    logger.info('train set: streaming %s (shuffle buffer %d rows, windows of %d rows%s)', ', '.join(args.dataset),
                stream.buffer_size, args.packing_interval, ' packed' if args.packing else '')
    return sampler


def check_resume_streaming(state: dict, args, path) -> None:
    """Fail before the model is built when --streaming differs from the run that saved ``state``."""
    from ..utils.errors import ArgumentError
    saved = bool((state.get('sampler') or {}).get('streaming'))
    if saved != bool(args.streaming):
        raise ArgumentError(f"--resume_from_checkpoint '{path}': that run was saved with --streaming "
                            f"{str(saved).lower()}; resume it with the same --streaming (the data position is "
                            f"recorded differently)")
