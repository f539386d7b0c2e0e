"""The template's errors: rows it cannot encode. A leaf module, so agent templates and loss scales can raise them."""
from __future__ import annotations

from ..utils.errors import UserError


class TemplateError(UserError, ValueError):
    """A row the template cannot encode; ``field`` names the offending part (e.g. ``messages[3].role``)."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        self.detail = message  # the message without the field
        super().__init__(f"field '{field}': {message}" if field else message)


class MaxLengthExceeded(TemplateError):
    """With truncation_strategy 'delete' the sample is skipped (and counted) by the caller."""
