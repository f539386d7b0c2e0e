"""``load_dataset(['a.jsonl#100', 'b.csv'])``: normalised rows with their source locations.

``load_rows`` and ``split_rows`` are the training commands' entry points: chat rows or raw ``text`` rows, and a
seeded validation hold-out."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..utils.errors import TrainDataError
from .errors import RowSource
from .formats import check_text_row, normalize_row
from .readers import read_rows

logger = logging.getLogger(__name__)
_SPEC = re.compile(r'^(?P<path>.+?)#(?P<n>\d+)$')


@dataclass
class Dataset(Sequence):
    """Rows in the ``messages`` format, each paired with the file location it came from."""
    rows: list[dict] = field(default_factory=list)
    sources: list[RowSource] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Dataset(self.rows[i], self.sources[i])
        return self.rows[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def select(self, indices) -> 'Dataset':
        return Dataset([self.rows[i] for i in indices], [self.sources[i] for i in indices])


def parse_dataset_spec(spec: str) -> tuple[str, int | None]:
    """``'path#N'`` -> ``(path, N)``; a plain path -> ``(path, None)``."""
    m = _SPEC.match(spec)
    return (m['path'], int(m['n'])) if m else (spec, None)


def load_dataset(specs: str | Sequence[str], seed: int = 42, shuffle: bool = False) -> Dataset:
    """Load and validate every row of every spec; ``path#N`` keeps N rows chosen with ``seed``.

    N below the file's size draws N distinct rows (kept in file order); N above it repeats
    the whole file and draws the remainder, as ms-swift does.
    """
    if isinstance(specs, str):
        specs = [specs]
    out = Dataset()
    rng = np.random.default_rng(seed)
    for spec in specs:
        path, n = parse_dataset_spec(spec)
        part = _read_part(path, n, rng, normalize=True, empty_error=ValueError)
        logger.info('dataset %s: %d rows', spec, len(part))
        out.rows += part.rows
        out.sources += part.sources
    if shuffle:
        out = out.select(rng.permutation(len(out)).tolist())
    return out


def load_rows(specs: list[str], seed: int, chat: bool) -> Dataset:
    """Rows of ``specs``: normalised chat rows, or raw rows (``text`` columns) for plain-text training."""
    if chat:
        return load_dataset(specs, seed=seed)
    out, rng = Dataset(), np.random.default_rng(seed)
    for spec in specs:
        path, n = parse_dataset_spec(spec)
        part = _read_part(path, n, rng, normalize=False, empty_error=TrainDataError)
        out.rows += part.rows
        out.sources += part.sources
    return out


def split_rows(dataset: Dataset, ratio: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, val): ``ratio`` of the rows (at least one) held out, chosen with ``seed``."""
    if not ratio:
        return dataset, None
    n = len(dataset)
    k = max(1, int(round(n * ratio)))
    if k >= n:
        raise TrainDataError(f'--split_dataset_ratio {ratio} leaves no training rows out of {n}')
    perm = np.random.default_rng(seed).permutation(n)
    return dataset.select(sorted(perm[k:].tolist())), dataset.select(sorted(perm[:k].tolist()))


def _read_part(path: str, n: int | None, rng: np.random.Generator, normalize: bool,
               empty_error: type[Exception]) -> Dataset:
    """The rows of one file (normalised or raw); ``n`` rows drawn with ``rng`` when given."""
    part = Dataset()
    for row, src in read_rows(path):
        part.rows.append(normalize_row(row, src) if normalize else check_text_row(row, src))
        part.sources.append(src)
    if not part.rows:
        raise empty_error(f"dataset '{path}' has no rows")
    if n is not None:
        part = part.select(_subsample(len(part), n, rng))
    return part


def _subsample(size: int, n: int, rng: np.random.Generator) -> list[int]:
    whole, rest = divmod(n, size)
    picked = sorted(rng.choice(size, rest, replace=False).tolist()) if rest else []
    return list(range(size)) * whole + picked


def row_id(row: dict) -> str:
    """A stable id of a row's content (md5 of its canonical JSON), used to match cached samples."""
    payload = {k: v for k, v in row.items() if k not in ('id', 'rejected_response', 'choices')}
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.md5(text.encode('utf-8')).hexdigest()
