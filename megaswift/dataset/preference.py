"""Dataset preparation for preference training: KTO's mismatched completions.

KTO's KL reference point is estimated from completions that do not answer their prompt. ``add_kl_responses``
gives every row the completion of another row as ``kl_response``, which the template's 'kto' mode encodes as a
second sequence (``kl_input_ids``, ...) with the row's own prompt.
"""
from __future__ import annotations

import bisect

from .loader import Dataset


def last_assistant_content(row) -> str | None:
    """The content of the row's last assistant message, or None (no messages, no assistant turn)."""
    messages = row.get('messages') if isinstance(row, dict) else None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get('role') == 'assistant':
            content = message.get('content')
            return content if isinstance(content, str) else None
    return None


def add_kl_responses(dataset: Dataset) -> Dataset:
    """A new ``Dataset`` (the same sources) whose row i has ``kl_response`` = the last assistant message of row
    ``(i + 1) % n`` (row 0 of a one-row dataset uses its own).

    Deterministic, so every data-parallel rank and the encode cache see the same rows. A row without an assistant
    turn gives no completion: the next row that has one is used instead (and a dataset with none is returned
    without ``kl_response``); the bad row itself is left as it is for the template to report with its
    ``file:line``. Rows that are not objects are left as they are for the same reason.
    """
    rows = dataset.rows
    contents = [last_assistant_content(row) for row in rows]
    have = [i for i, c in enumerate(contents) if c is not None]  # rows with a completion to lend
    out = []
    for i, row in enumerate(rows):
        if not have or not isinstance(row, dict):
            out.append(row)
            continue
        source = have[bisect.bisect_right(have, i) % len(have)]  # the next such row after i, wrapping around
        out.append({**row, 'kl_response': contents[source]})
    return Dataset(out, list(dataset.sources))
