"""``PlainTextEncoder``: the encoder of ``pt`` without a chat template (``--use_chat_template false``)."""
from __future__ import annotations

from typing import Any

from .errors import MaxLengthExceeded, TemplateError


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
