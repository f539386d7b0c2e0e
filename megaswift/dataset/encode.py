"""``encode_dataset(dataset, template)``: every row through ``template.encode``, in parallel, cached on disk.

Encoded samples are stored column-wise (one flat array of values plus per-sample lengths per key), which
is what the cache writes as ``.npy`` files and what packing needs: ``EncodedDataset.lengths`` comes
without touching the tokens. Every key of the template's output is kept: lists of numbers (per-token
columns such as ``input_ids``, or other sequences such as ``rejected_input_ids``) and single numbers per
sample (a KTO ``label``, a margin), which ``EncodedDataset.scalars`` names and ``arrays(i)`` returns 0-d.
``EncodedDataset.lengths`` counts the tokens of all of a sample's model sequences (every ``*input_ids`` column).
Rows the template rejects become ``DatasetError``s that point at ``file:line``; rows longer than ``max_length``
under truncation_strategy 'delete' are skipped and counted.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..template.errors import MaxLengthExceeded, TemplateError
from ..utils.errors import TrainDataError, UserError
from ..utils.paths import atomic_directory, atomic_write_json, cache_root
from .errors import DatasetError
from .loader import Dataset

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
CHUNK_ROWS = 512


class AllRowsSkipped(UserError, ValueError):
    """Every row was longer than max_length with truncation_strategy 'delete'."""


# ------------------------------------------------------------------------------------ column storage
_NUMBER = (bool, int, float, np.number, np.bool_)


def _columns(samples: list[dict]) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], frozenset[str]]:
    """``key -> (values, lens)`` and the keys holding one number per sample (stored as one value, ``lens[i]``
    1; their booleans stay booleans). ``lens[i]`` is -1 where sample i has no such key."""
    keys = sorted({k for s in samples for k in s})
    out, scalars = {}, set()
    for key in keys:
        lens, flat, kinds = np.full(len(samples), -1, dtype=np.int64), [], set()
        for i, s in enumerate(samples):
            v = s.get(key)
            if v is None:
                continue
            if isinstance(v, _NUMBER) or (isinstance(v, np.ndarray) and v.ndim == 0):
                kinds.add('number')
                lens[i] = 1
                flat.append(v)
            elif isinstance(v, (list, tuple, np.ndarray)):
                kinds.add('list')
                lens[i] = len(v)
                flat.extend(v)
            else:
                raise TypeError(f"template output '{key}' must be a list of numbers or a number, "
                                f"got {type(v).__name__}")
        if len(kinds) > 1:
            raise TypeError(f"template output '{key}' is a number in some samples and a list in others")
        values = np.asarray(flat)
        if kinds == {'number'}:
            scalars.add(key)
        elif values.dtype.kind == 'b':
            values = values.astype(np.int64)
        if values.dtype.kind not in 'iufb':
            raise TypeError(f"template output '{key}' must be a list of numbers, got {values.dtype}")
        if values.dtype.kind in 'iu' and (values.size == 0 or (values.min() >= -2**31 and values.max() < 2**31)):
            values = values.astype(np.int32)
        out[key] = (values, lens)
    return out, frozenset(scalars)


def _merge_columns(parts: list[tuple[int, dict]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Concatenate per-chunk columns (``(num_samples, columns)``); a chunk without a key counts as absent."""
    keys = sorted({k for _, cols in parts for k in cols})
    out = {}
    for key in keys:
        vals = [cols[key][0] for _, cols in parts if key in cols]
        lens = [cols[key][1] if key in cols else np.full(n, -1, dtype=np.int64) for n, cols in parts]
        out[key] = (np.concatenate(vals), np.concatenate(lens) if lens else np.zeros(0, dtype=np.int64))
    return out


def _merge_scalars(parts: list[tuple[dict, frozenset[str]]]) -> frozenset[str]:
    """The scalar keys of per-chunk ``(columns, scalars)``; a key may not be a number in one chunk and a list in
    another."""
    scalars = frozenset().union(*(sc for _, sc in parts))
    mixed = sorted(k for cols, sc in parts for k in cols if k in scalars and k not in sc)
    if mixed:
        raise TypeError(f"template output '{mixed[0]}' is a number in some samples and a list in others")
    return scalars


class EncodedDataset(Sequence):
    """Encoded samples. ``ds[i]`` is the template's output dict (lists, and numbers for the ``scalars`` keys);
    ``ds.lengths`` their token counts."""

    def __init__(self, columns: dict[str, tuple[np.ndarray, np.ndarray]], row_indices: np.ndarray,
                 num_rows: int, cache_path: str | None = None, from_cache: bool = False,
                 scalars: frozenset[str] = frozenset()):
        self.values = {k: v for k, (v, _) in columns.items()}
        self.scalars = frozenset(scalars)  # keys holding one number per sample
        self.lens = {k: np.asarray(n, dtype=np.int64) for k, (_, n) in columns.items()}
        self.offsets = {k: np.concatenate([[0], np.cumsum(np.maximum(n, 0))]) for k, n in self.lens.items()}
        self.row_indices = np.asarray(row_indices, dtype=np.int64)  # the dataset row of every sample
        self.num_rows = num_rows
        self.cache_path = cache_path
        self.from_cache = from_cache
        # tokens of every model sequence a sample holds (input_ids, chosen_/rejected_input_ids, kl_input_ids, ...):
        # packing keeps a sample's sequences in one row
        ids = [k for k in self.lens if k.endswith('input_ids')]
        self.lengths = sum((np.maximum(self.lens[k], 0) for k in ids), np.zeros(len(self.row_indices), np.int64))

    @classmethod
    def from_samples(cls, samples: list[dict]) -> EncodedDataset:
        """Template outputs already in memory (one sample per row)."""
        columns, scalars = _columns(samples)
        return cls(columns, np.arange(len(samples)), len(samples), scalars=scalars)

    @property
    def num_skipped(self) -> int:
        return self.num_rows - len(self)

    def __len__(self) -> int:
        return len(self.row_indices)

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as numpy arrays (views into the columns; 0-d for a scalar key): the fast path for
        collation."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        out = {k: self.values[k][self.offsets[k][i]:self.offsets[k][i + 1]]
               for k in self.values if self.lens[k][i] >= 0}
        for k in self.scalars & out.keys():
            out[k] = out[k].reshape(())
        return out

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {k: v.tolist() for k, v in self.arrays(int(i)).items()}

    def pack(self, packing_length: int, strategy: str = 'bfd') -> list[list[int]]:
        """Bins of sample indices (see ``megaswift.template.packing``)."""
        from ..template.packing import pack
        return pack(self.lengths, packing_length, strategy)


# ------------------------------------------------------------------------------------------ encoding
_worker_template = None


def _init_worker(template) -> None:
    global _worker_template
    _worker_template = template


def _encode_chunk(template, start: int, rows: list[dict], sources: list[str]) -> dict[str, Any]:
    samples, kept = [], []
    for j, row in enumerate(rows):
        try:
            out = template.encode(row)
        except MaxLengthExceeded:
            continue
        except TemplateError as e:
            message = str(e)
            prefix = f"field '{e.field}': "
            if e.field and message.startswith(prefix):
                message = message[len(prefix):]
            return {'error': (start + j, e.field, message)}
        except Exception as e:
            e.add_note(f'while encoding row {start + j} ({sources[j]})')
            raise
        samples.append(out)
        kept.append(start + j)
    columns, scalars = _columns(samples)
    return {'n': len(samples), 'columns': columns, 'scalars': scalars, 'kept': np.asarray(kept, dtype=np.int64),
            'rows': len(rows)}


def _encode_chunk_in_worker(args) -> dict[str, Any]:
    return _encode_chunk(_worker_template, *args)


def encode_dataset(dataset: Dataset, template, num_proc: int = 1, cache_dir: str | os.PathLike | None = None,
                   desc: str = 'encoding', use_cache: bool = True) -> EncodedDataset:
    """Encode every row; ``num_proc > 1`` uses a process pool (chunks, order kept, one template per worker).

    The result is cached under ``cache_dir`` (default ``cache_root()/encoded``), keyed by the rows, the
    tokenizer and the template's class and arguments; a later call with the same key loads it.
    """
    key_parts = cache_key_parts(dataset, template) if use_cache else None
    path = None
    if use_cache:
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
        path = Path(cache_dir) if cache_dir is not None else cache_root() / 'encoded'
        path = path / key
        cached = _load_cache(path, key_parts)
        if cached is not None:
            logger.info('%s: loaded %d encoded samples from %s', desc, len(cached), path)
            _report_skipped(cached, template)
            return cached
    n = len(dataset)
    sources = [str(s) for s in dataset.sources] if len(dataset.sources) == n else ['?'] * n
    size = CHUNK_ROWS if num_proc <= 1 else max(1, min(CHUNK_ROWS, -(-n // (num_proc * 4))))
    tasks = [(s, dataset.rows[s:s + size], sources[s:s + size]) for s in range(0, n, size)]
    parts = []
    from tqdm import tqdm
    with tqdm(total=n, desc=desc, unit='row', disable=None, dynamic_ncols=True) as bar:
        if num_proc <= 1:
            results = (_encode_chunk(template, *t) for t in tasks)
            parts = _collect(results, dataset, bar)
        else:
            os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')  # forked workers must not share its pool
            method = 'fork' if 'fork' in mp.get_all_start_methods() else 'spawn'
            # fork: workers inherit the template; spawn: initargs are pickled once per worker. An executor, not
            # mp.Pool: a dead worker raises BrokenProcessPool instead of hanging, and the first error cancels the rest.
            with ProcessPoolExecutor(num_proc, mp_context=mp.get_context(method), initializer=_init_worker,
                                     initargs=(template,)) as pool:
                try:
                    parts = _collect(pool.map(_encode_chunk_in_worker, tasks), dataset, bar)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    columns = _merge_columns([(p['n'], p['columns']) for p in parts])
    scalars = _merge_scalars([(p['columns'], p['scalars']) for p in parts])
    kept = np.concatenate([p['kept'] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    result = EncodedDataset(columns, kept, n, cache_path=str(path) if path else None, scalars=scalars)
    _report_skipped(result, template)
    if use_cache:
        _save_cache(path, result, key_parts)
    return result


def encode_rows(template, rows: list[dict], sources: list) -> EncodedDataset:
    """Encode a few rows in this process, uncached (``sources[i]``: where row i came from, for errors); rows over
    ``max_length`` ('delete') are left out and counted in ``num_skipped``."""
    part = _encode_chunk(template, 0, rows, [str(s) for s in sources])
    if 'error' in part:
        i, field, message = part['error']
        raise DatasetError(sources[i], message, field)
    return EncodedDataset(part['columns'], part['kept'], len(rows), scalars=part['scalars'])


def encode_on_rank0_first(dataset: Dataset, template, num_proc: int, desc: str) -> EncodedDataset:
    """Rank 0 encodes (and writes the cache); the other ranks then read the cache instead of encoding again."""
    from ..utils.dist import initialized_dist
    dist = initialized_dist()
    ready = dist is not None and dist.get_world_size() > 1
    if not ready or dist.get_rank() == 0:
        result, error = None, None
        try:
            result = encode_dataset(dataset, template, num_proc=num_proc, desc=desc)
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
    return encode_dataset(dataset, template, num_proc=num_proc, desc=desc)


def _collect(results, dataset: Dataset, bar) -> list[dict]:
    parts = []
    for part in results:
        if 'error' in part:
            i, field, message = part['error']
            raise DatasetError(dataset.sources[i] if i < len(dataset.sources) else f'row {i}', message, field)
        parts.append(part)
        bar.update(part['rows'])
    return parts


def _report_skipped(ds: EncodedDataset, template) -> None:
    max_length = getattr(template, 'max_length', None)
    if ds.num_rows and not len(ds):
        raise AllRowsSkipped(f'all {ds.num_rows} rows are longer than max_length {max_length} and were skipped '
                             f"(truncation_strategy 'delete'): raise max_length or use truncation_strategy "
                             f"'left'/'right'")
    if ds.num_skipped:
        logger.warning('skipped %d of %d rows longer than max_length %s', ds.num_skipped, ds.num_rows, max_length)


# --------------------------------------------------------------------------------------------- cache
def _hash_rows(rows: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode('utf-8'))
        h.update(b'\n')
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_md5(path: str, mtime_ns: int, size: int) -> str:
    with open(path, 'rb') as f:
        return hashlib.md5(f.read()).hexdigest()


def _code_hash(cls: type) -> str:
    """md5 over the source files of ``cls`` and its bases: a code change invalidates the cache."""
    digests = []
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            src = inspect.getsourcefile(klass)
        except (TypeError, OSError):
            src = None
        if src and os.path.isfile(src):
            st = os.stat(src)
            digests.append(_file_md5(src, st.st_mtime_ns, st.st_size))
        else:
            digests.append(f'{klass.__module__}.{klass.__qualname__}')
    return hashlib.md5('|'.join(digests).encode()).hexdigest()


def _describe(obj, depth: int = 0):
    """A JSON-able description of an object's class, code and (nested) simple attributes."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_describe(x, depth + 1) for x in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return {'code': f'{obj.__module__}.{obj.__qualname__}'}
    cls = type(obj)
    out = {'class': f'{cls.__module__}.{cls.__qualname__}', 'code': _code_hash(cls)}
    if depth < 4:
        out['attrs'] = {k: _describe(v, depth + 1) for k, v in sorted(getattr(obj, '__dict__', {}).items())
                        if k != 'tokenizer' and not k.startswith('_')}
    return out


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """name_or_path, vocab size (added tokens included), chat-template hash and the tokenizer files' hashes."""
    chat_template = getattr(tokenizer, 'chat_template', None)
    out = {'class': type(tokenizer).__qualname__, 'name_or_path': str(getattr(tokenizer, 'name_or_path', '')),
           'vocab_size': len(tokenizer) if hasattr(tokenizer, '__len__') else getattr(tokenizer, 'vocab_size', None),
           'chat_template': hashlib.md5(json.dumps(chat_template, sort_keys=True).encode()).hexdigest()}
    directory = out['name_or_path']
    if directory and os.path.isdir(directory):
        for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json',
                     'merges.txt', 'tokenizer.model'):
            p = os.path.join(directory, name)
            if os.path.isfile(p):
                st = os.stat(p)
                out[name] = _file_md5(p, st.st_mtime_ns, st.st_size)
    return out


def cache_key_parts(dataset: Dataset, template) -> dict[str, Any]:
    """Everything the encoded output depends on: format version, rows, tokenizer, template class + args."""
    return {'version': CACHE_VERSION, 'num_rows': len(dataset), 'rows': _hash_rows(dataset.rows),
            'tokenizer': tokenizer_fingerprint(template.tokenizer), 'template': _describe(template)}


def _save_cache(path: Path, ds: EncodedDataset, key_parts: dict) -> None:
    try:
        with atomic_directory(path) as tmp:
            for k in ds.values:
                np.save(tmp / f'{k}.values.npy', ds.values[k])
                np.save(tmp / f'{k}.lens.npy', ds.lens[k])
            np.save(tmp / 'row_indices.npy', ds.row_indices)
            np.save(tmp / 'lengths.npy', ds.lengths)
            atomic_write_json(tmp / 'meta.json', {'key': key_parts, 'columns': sorted(ds.values),
                                                   'scalar_columns': sorted(ds.scalars),
                                                   'num_rows': ds.num_rows, 'num_samples': len(ds)})
        logger.info('cached %d encoded samples in %s', len(ds), path)
    except OSError as e:  # a read-only or full cache directory must not fail the run
        logger.warning('could not write the encode cache %s: %s', path, e)


def _load_cache(path: Path, key_parts: dict) -> EncodedDataset | None:
    meta_path = path / 'meta.json'
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding='utf-8'))
        if meta.get('key') != json.loads(json.dumps(key_parts)):
            return None
        columns = {k: (np.load(path / f'{k}.values.npy', mmap_mode='r'), np.load(path / f'{k}.lens.npy'))
                   for k in meta['columns']}
        ds = EncodedDataset(columns, np.load(path / 'row_indices.npy'), meta['num_rows'], str(path), True,
                            scalars=frozenset(meta.get('scalar_columns', ())))
        if len(ds) != meta['num_samples']:
            raise ValueError('sample count mismatch')
        return ds
    except (OSError, ValueError, KeyError) as e:
        logger.warning('ignoring the unreadable encode cache %s (%s); encoding again', path, e)
        return None


def load_cached_lengths(path: str | os.PathLike) -> np.ndarray:
    """The sample lengths of a cache entry, without reading the tokens."""
    return np.load(Path(path) / 'lengths.npy')
