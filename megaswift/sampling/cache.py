"""Samples from earlier runs (``--cache_files``), grouped by row id."""
from __future__ import annotations

import json
from collections import OrderedDict

from ..dataset import DatasetError, RowSource, normalize_row


def load_cached_samples(paths: list[str]) -> 'OrderedDict[str, dict]':
    """``id -> {'row': first line's row, 'responses': [...], 'source': 'file:line'}`` in file order.

    Each line is one sample (the output of ``megaswift sample``): its last assistant turn is the
    sampled response. A line without an ``id`` or without a final assistant turn is an error.
    """
    groups: OrderedDict[str, dict] = OrderedDict()
    for path in paths:
        try:
            f = open(path, encoding='utf-8')
        except FileNotFoundError:
            raise FileNotFoundError(f"--cache_files: '{path}' does not exist") from None
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                src = RowSource(path, lineno)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(src, f'invalid JSON: {e.msg}') from None
                if not isinstance(obj, dict):
                    raise DatasetError(src, 'a cached sample must be a JSON object')
                if not obj.get('id'):
                    raise DatasetError(src, 'missing; cached samples are matched to prompts by id', 'id')
                row = normalize_row(obj, src)
                if row['messages'][-1]['role'] != 'assistant':
                    raise DatasetError(src, 'the last message must be the sampled assistant response', 'messages')
                group = groups.setdefault(str(obj['id']), {'row': row, 'responses': [], 'source': str(src)})
                group['responses'].append(row['messages'][-1]['content'])
    return groups
