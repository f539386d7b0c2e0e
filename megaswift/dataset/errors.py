"""Errors that point at the exact row and field of a bad input file."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..utils.errors import UserError


@dataclass(frozen=True)
class RowSource:
    """Where a row came from: ``path:line`` for text files, ``path[row i]`` for HF datasets."""
    path: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f'{self.path}:{self.line}'
        return f'{self.path}[row {self.index}]'


class DatasetError(UserError, ValueError):
    """A bad row: the message starts with ``file:line`` and names the field."""

    def __init__(self, source: RowSource | str, message: str, field: str | None = None):
        self.source = source
        self.field = field
        where = f"{source}: field '{field}': " if field else f'{source}: '
        super().__init__(where + message)


def describe(value: Any) -> str:
    """A value's type and the start of its repr, for messages: ``int 5``, ``list ['a']``, ``null``."""
    if value is None:
        return 'null'
    text = repr(value)
    return f'{type(value).__name__} {text[:40] + "..." if len(text) > 40 else text}'
