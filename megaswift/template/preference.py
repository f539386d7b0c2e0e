"""The columns of preference rows (ms-swift's formats), checked for the template's 'rlhf' and 'kto' modes.

- A pair ('rlhf': DPO, ORPO, SimPO, CPO, reward modelling): ``messages`` ending in the chosen assistant turn, and
  the rejected answer as ``rejected_response`` (a string answering the same prompt) or ``rejected_messages`` (a
  whole conversation ending in the rejected assistant turn; its earlier turns are its prompt). ``margin`` (a
  number, 0.0 when absent) is the reward-modelling margin.
- A KTO row ('kto'): ``messages`` ending in the completion, ``label`` (true/false or 1/0: desirable or not) and
  ``kl_response``, an unrelated completion for the KL reference point (``dataset.add_kl_responses`` sets it).

Every problem is a ``TemplateError`` naming the row's field, which the dataset encoder turns into ``file:line``.
"""
from __future__ import annotations

import math
import numbers

from .errors import TemplateError


def completion_messages(row: dict, field: str = 'messages', what: str = 'the chosen response') -> list[dict]:
    """``row[field]``, a conversation whose last message is the assistant turn ``what``."""
    messages = row.get(field)
    if not isinstance(messages, list) or not messages:
        raise TemplateError('must be a non-empty list of messages', field)
    last = messages[-1]
    role = last.get('role') if isinstance(last, dict) else type(last).__name__
    if role != 'assistant':
        raise TemplateError(f'must end with an assistant turn ({what}); the last message is {role!r}', field)
    return messages


def rejected_conversation(row: dict) -> tuple[list[dict], str]:
    """The rejected side of a pair: its conversation and the field it came from (``rejected_response`` or
    ``rejected_messages``). ``row['messages']`` must already have been checked (``completion_messages``)."""
    response, messages = row.get('rejected_response'), row.get('rejected_messages')
    if response is None and messages is None:
        raise TemplateError("is required in rlhf mode (or 'rejected_messages', the whole rejected conversation)",
                            'rejected_response')
    if response is not None and messages is not None:
        raise TemplateError("is given together with 'rejected_response': give the rejected answer once",
                            'rejected_messages')
    if response is not None:
        if not isinstance(response, str):
            raise TemplateError(f'must be a string, got {type(response).__name__}', 'rejected_response')
        if not response.strip():
            raise TemplateError('is empty: the rejected answer needs content', 'rejected_response')
        return [*row['messages'][:-1], {'role': 'assistant', 'content': response}], 'rejected_response'
    messages = completion_messages(row, 'rejected_messages', 'the rejected response')
    content = messages[-1].get('content')
    field = f'rejected_messages[{len(messages) - 1}].content'
    if not isinstance(content, str):
        raise TemplateError(f'must be a string, got {type(content).__name__}', field)
    if not content.strip():
        raise TemplateError('is empty: the rejected answer needs content', field)
    return messages, 'rejected_messages'


def pair_margin(row: dict) -> float:
    """The row's ``margin`` (a finite number), 0.0 when absent."""
    value = row.get('margin')
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TemplateError(f'must be a finite number, got {value!r}', 'margin')
    return float(value)


def kto_label(row: dict) -> int:
    """The row's ``label`` as 1 (desirable) or 0: a boolean, or the integer 0 or 1."""
    value = row.get('label')
    if value is None:
        raise TemplateError('is required in kto mode: true for a desirable completion, false for an undesirable one',
                            'label')
    if isinstance(value, bool) or type(value).__name__ == 'bool_':
        return int(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return int(value)
    raise TemplateError(f'must be true/false or 1/0, got {value!r}', 'label')


def kl_conversation(row: dict) -> list[dict]:
    """The KTO row's prompt answered with its ``kl_response``."""
    response = row.get('kl_response')
    if response is None:
        raise TemplateError('is required in kto mode: an unrelated completion for the KL reference point '
                            '(megaswift.dataset.add_kl_responses sets it from the next row)', 'kl_response')
    if not isinstance(response, str):
        raise TemplateError(f'must be a string, got {type(response).__name__}', 'kl_response')
    return [*row['messages'][:-1], {'role': 'assistant', 'content': response}]


def relabelled(error: TemplateError, source: str, last: int) -> TemplateError:
    """``error``, raised while encoding a second conversation built from ``source`` (whose last message has index
    ``last``), with its field named after the row's column: ``rejected_messages[2].role`` rather than
    ``messages[2].role``; an error about the whole sequence or its last turn (too long, ...) names ``source``."""
    field = error.field or ''
    if source == 'rejected_messages' and field.startswith('messages'):
        new = 'rejected_messages' + field[len('messages'):]
    elif field == 'messages' or field.startswith(f'messages[{last}]'):
        new = source
    else:
        return error
    return type(error)(error.detail, new)
