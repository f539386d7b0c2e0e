"""Read raw rows, each with its source location, from .jsonl / .json / .csv files and HF dataset dirs."""
from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import DatasetError, RowSource

Raw = tuple[dict, RowSource]


def read_rows(path: str, raw_lines: bool = False) -> Iterator[Raw]:
    """``(row, source)`` pairs, read lazily; ``raw_lines``: a .jsonl file yields each line's text unparsed
    (``parse_jsonl_line`` makes it a row), so that skipping rows costs no JSON decoding."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset '{path}' does not exist (local files only: .jsonl, .json, .csv or an HF "
                                f"datasets directory saved with save_to_disk)")
    if p.is_dir():
        yield from _read_hf_dir(p)
        return
    suffix = p.suffix.lower()
    readers = {'.jsonl': _jsonl_lines if raw_lines else _read_jsonl, '.json': _read_json, '.csv': _read_csv}
    if suffix not in readers:
        raise DatasetError(RowSource(str(p), 1), f"unsupported file type '{suffix}' (use .jsonl, .json or .csv)")
    try:
        yield from readers[suffix](p)
    except OSError as e:  # permissions, a file that vanished or an I/O error while reading
        raise DatasetError(str(p), f'cannot be read ({e.strerror or e})') from None


def _decode(data: bytes, p: Path, first_line: int = 1) -> str:
    """``data`` as UTF-8 text (a byte-order mark at the start of the file dropped); bytes that are not UTF-8 are a
    ``DatasetError`` at their line and column."""
    try:
        return data.decode('utf-8-sig' if first_line == 1 else 'utf-8')
    except UnicodeDecodeError as e:
        line_start = data.rfind(b'\n', 0, e.start) + 1
        src = RowSource(str(p), first_line + data.count(b'\n', 0, e.start))
        raise DatasetError(src, f'is not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start - line_start + 1}); '
                                f'save the file as UTF-8') from None


def _jsonl_lines(p: Path) -> Iterator[tuple[str, RowSource]]:
    with p.open('rb') as f:
        for lineno, data in enumerate(f, 1):
            line = _decode(data, p, lineno)
            if line.strip():
                yield line, RowSource(str(p), lineno)


def parse_jsonl_line(line: str, src: RowSource) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(src, f'invalid JSON: {e.msg} (column {e.colno})') from None
    if not isinstance(obj, dict):
        raise DatasetError(src, f'a row must be a JSON object, got {type(obj).__name__}')
    return obj


def _read_jsonl(p: Path) -> Iterator[Raw]:
    for line, src in _jsonl_lines(p):
        yield parse_jsonl_line(line, src), src


def _read_json(p: Path) -> Iterator[Raw]:
    """A JSON array of objects (or one object). Line numbers are those where each object starts."""
    text = _decode(p.read_bytes(), p)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos < len(text) and text[pos] == '{':
        obj, _ = _decode_at(decoder, text, pos, p)
        yield obj, RowSource(str(p), text.count('\n', 0, pos) + 1)
        return
    if pos >= len(text) or text[pos] != '[':
        raise DatasetError(RowSource(str(p), text.count('\n', 0, pos) + 1), 'a .json dataset must be an array of objects')
    pos = _skip_ws(text, pos + 1)
    line, counted = 1, 0
    while pos < len(text) and text[pos] != ']':
        line += text.count('\n', counted, pos)
        counted = pos
        src = RowSource(str(p), line)
        obj, pos = _decode_at(decoder, text, pos, p)
        if not isinstance(obj, dict):
            raise DatasetError(src, f'a row must be a JSON object, got {type(obj).__name__}')
        yield obj, src
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ',':
            pos = _skip_ws(text, pos + 1)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in ' \t\r\n':
        pos += 1
    return pos


def _decode_at(decoder: json.JSONDecoder, text: str, pos: int, p: Path):
    try:
        return decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
        raise DatasetError(RowSource(str(p), e.lineno), f'invalid JSON: {e.msg} (column {e.colno})') from None


def _read_csv(p: Path) -> Iterator[Raw]:
    """Rows read as the file is (bounded memory, as ``--streaming`` needs); a byte that is not UTF-8 is located
    by decoding the whole file only then."""
    try:
        with p.open(encoding='utf-8-sig', newline='') as f:
            reader = csv.DictReader(f)
            for row in reader:
                src = RowSource(str(p), reader.line_num)
                if None in row:
                    raise DatasetError(src, f'row has more cells than the header ({len(reader.fieldnames)} columns)')
                yield {k: v for k, v in row.items() if v not in (None, '')}, src
    except UnicodeDecodeError:
        _decode(p.read_bytes(), p)  # raises the DatasetError naming the line and column
        raise


def _read_hf_dir(p: Path) -> Iterator[Raw]:
    import datasets
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DatasetError(RowSource(str(p), index=0), f'not an HF datasets directory saved with save_to_disk ({e})') from None
    if isinstance(ds, datasets.DatasetDict):
        if 'train' not in ds:
            raise DatasetError(RowSource(str(p), index=0), f"DatasetDict has no 'train' split (splits: {list(ds)})")
        ds = ds['train']
    for i, row in enumerate(ds):
        yield dict(row), RowSource(os.fspath(p), index=i)
