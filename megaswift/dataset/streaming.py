"""Rows of ``--dataset`` read lazily, for ``--streaming true`` (datasets larger than RAM).

``RowStream`` is deterministic and restartable. Epoch ``e`` reads the specs' files in order (``path#N``: the
file's first N rows, read again from its start while it has fewer), passes the raw rows through a shuffle buffer
of ``buffer_size`` rows drawn with ``(seed, e)``, and hands them out parsed and normalised (errors name
``file:line``). Its position is ``(epoch, rows handed out)``; ``open(epoch, skip)`` replays to any position,
reading but not parsing or normalising the skipped rows. Memory: the buffer's raw rows, whatever the files' size.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..utils.errors import UserError
from .errors import RowSource
from .formats import check_text_row, normalize_row
from .loader import parse_dataset_spec
from .readers import parse_jsonl_line, read_rows

logger = logging.getLogger(__name__)
_DRAWS = 1024  # buffer positions drawn from the generator at once


class StreamError(UserError, ValueError):
    pass


def shuffle_buffer(records: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Once ``size`` records are held, each new record takes the place of a random held one, which is handed
    out; when the input ends the held ones leave in random order. ``size <= 1``: the input order."""
    if size <= 1:
        yield from records
        return
    buf: list = []
    draws: Iterator[int] = iter(())
    for rec in records:
        if len(buf) < size:
            buf.append(rec)
            continue
        j = next(draws, None)
        if j is None:
            draws = iter(rng.integers(size, size=_DRAWS).tolist())
            j = next(draws)
        buf[j], rec = rec, buf[j]
        yield rec
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


class RowStream:
    """``next()`` -> ``(row, source)`` or None at the end of the epoch; ``open(epoch, skip)`` starts an epoch."""

    def __init__(self, specs: Sequence[str], seed: int, buffer_size: int, chat: bool = True, shuffle: bool = True):
        self.specs = list(specs)
        self.seed, self.chat = int(seed), bool(chat)
        self.buffer_size = int(buffer_size) if shuffle else 1
        self.records_read = 0  # raw rows taken from the files, all epochs (replays included)
        self.epoch = 0
        self.position = 0      # rows handed out (or skipped) in this epoch
        self._records: Iterator | None = None
        for spec in self.specs:
            path = parse_dataset_spec(spec)[0]
            if Path(path).suffix.lower() == '.json':
                logger.warning('%s: a .json array is read whole into memory; convert it to .jsonl to stream it', path)

    def open(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.position = int(epoch), 0
        self._records = shuffle_buffer(self._read(), self.buffer_size,
                                       np.random.default_rng([self.seed, self.epoch]))
        for _ in range(int(skip)):
            if next(self._records, None) is None:
                raise StreamError(f'the data position (epoch {epoch}, row {skip}) is past the end of --dataset, '
                                  f'which has {self.position} rows now: the files changed since it was recorded')
            self.position += 1

    def next(self) -> tuple[dict, RowSource] | None:
        if self._records is None:
            self.open(0)
        rec = next(self._records, None)
        if rec is None:
            return None
        self.position += 1
        payload, src = rec
        row = payload if isinstance(payload, dict) else parse_jsonl_line(payload, src)
        return (normalize_row(row, src) if self.chat else check_text_row(row, src)), src

    def take(self, n: int) -> list[tuple[dict, RowSource]]:
        """Up to ``n`` rows; fewer only at the end of the epoch."""
        out = []
        while len(out) < n:
            rec = self.next()
            if rec is None:
                break
            out.append(rec)
        return out

    def _read(self) -> Iterator:
        for spec in self.specs:
            path, n = parse_dataset_spec(spec)
            yield from self._file(path, n)

    def _file(self, path: str, n: int | None) -> Iterator:
        count = 0
        while n != 0:
            before = count
            for rec in read_rows(path, raw_lines=True):
                self.records_read += 1
                count += 1
                yield rec
                if count == n:
                    return
            if count == before:
                raise StreamError(f"dataset '{path}' has no rows")
            if n is None:
                return
