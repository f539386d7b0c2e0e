"""Normalise every supported row format to the ``messages`` format, validating as we go.

Supported: ``messages`` (OpenAI roles plus tool_call / tool_response), alpaca
(``instruction``/``input``/``output``), sharegpt (``conversations`` with from/value), and
``query``/``response`` (+ ``history``, ``system``). Columns that are not part of the
conversation (``solution``, ``tools``, ``images``, ids, preference columns ...) are kept unchanged, except a
preference pair's ``rejected_messages``, which is checked like ``messages``.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import DatasetError, RowSource

ROLES = ('system', 'user', 'assistant', 'tool', 'tool_call', 'tool_response')
_SHAREGPT_ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                   'function_call': 'tool_call', 'tool_call': 'tool_call', 'observation': 'tool_response',
                   'tool': 'tool_response', 'tool_response': 'tool_response'}


def normalize_row(row: dict[str, Any], source: RowSource) -> dict[str, Any]:
    """Return a new row whose conversation is in ``messages``; raise DatasetError on bad input."""
    if 'messages' in row:
        out = dict(row)
        out['messages'] = _check_messages(row['messages'], source, 'messages')
    elif 'conversations' in row:
        out = {k: v for k, v in row.items() if k not in ('conversations', 'system')}
        out['messages'] = _from_sharegpt(row, source)
    elif 'instruction' in row:
        out = {k: v for k, v in row.items() if k not in ('instruction', 'input', 'output', 'system')}
        out['messages'] = _from_alpaca(row, source)
    elif 'query' in row:
        out = {k: v for k, v in row.items() if k not in ('query', 'response', 'history', 'system')}
        out['messages'] = _from_query_response(row, source)
    else:
        raise DatasetError(source, f"no conversation found; expected one of the columns 'messages', 'conversations', "
                                   f"'instruction' or 'query' (columns present: {sorted(row)})")
    if out.get('rejected_messages') is not None:  # a preference pair's whole rejected conversation
        out['rejected_messages'] = _check_messages(out['rejected_messages'], source, 'rejected_messages')
    if 'tools' in out and out['tools'] is not None:
        out['tools'] = _check_tools(out['tools'], source)
    if 'solution' in out and out['solution'] is not None and not isinstance(out['solution'], str):
        out['solution'] = str(out['solution'])
    return out


def _check_messages(messages: Any, source: RowSource, field: str) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DatasetError(source, 'must be a list of messages, got a string that is not JSON', field) from None
    if not isinstance(messages, list) or not messages:
        raise DatasetError(source, f'must be a non-empty list of messages, got {_kind(messages)}', field)
    out = []
    for i, m in enumerate(messages):
        f = f'{field}[{i}]'
        if not isinstance(m, dict):
            raise DatasetError(source, f'a message must be an object with role and content, got {_kind(m)}', f)
        role = m.get('role')
        if role not in ROLES:
            raise DatasetError(source, f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f'{f}.role')
        content = m.get('content')
        if content is None and m.get('tool_calls'):
            content = ''
        if role == 'tool_call' and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise DatasetError(source, f'must be a string, got {_kind(content)}', f'{f}.content')
        msg = dict(m)
        msg['content'] = content
        out.append(msg)
    if all(m['role'] == 'system' for m in out):
        raise DatasetError(source, 'has only system messages; a conversation needs a user turn', field)
    return out


def _from_sharegpt(row: dict, source: RowSource) -> list[dict]:
    conv = row['conversations']
    if not isinstance(conv, list) or not conv:
        raise DatasetError(source, f'must be a non-empty list, got {_kind(conv)}', 'conversations')
    messages = [{'role': 'system', 'content': row['system']}] if row.get('system') else []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise DatasetError(source, f'must be an object with from/value, got {_kind(turn)}', f'conversations[{i}]')
        speaker = turn.get('from', turn.get('role'))
        if speaker not in _SHAREGPT_ROLES:
            raise DatasetError(source, f'unknown speaker {speaker!r} (expected one of {", ".join(_SHAREGPT_ROLES)})',
                               f'conversations[{i}].from')
        messages.append({'role': _SHAREGPT_ROLES[speaker], 'content': turn.get('value', turn.get('content'))})
    return _check_messages(messages, source, 'conversations')


def _from_alpaca(row: dict, source: RowSource) -> list[dict]:
    instruction = row['instruction']
    if not isinstance(instruction, str) or not instruction.strip():
        raise DatasetError(source, f'must be a non-empty string, got {_kind(instruction)}', 'instruction')
    extra = row.get('input')
    if extra is not None and not isinstance(extra, str):
        raise DatasetError(source, f'must be a string, got {_kind(extra)}', 'input')
    user = f'{instruction}\n{extra}' if extra else instruction
    messages = [{'role': 'system', 'content': row['system']}] if row.get('system') else []
    messages.append({'role': 'user', 'content': user})
    if row.get('output') is not None:
        messages.append({'role': 'assistant', 'content': row['output']})
    return _check_messages(messages, source, 'instruction')


def _from_query_response(row: dict, source: RowSource) -> list[dict]:
    messages = [{'role': 'system', 'content': row['system']}] if row.get('system') else []
    history = row.get('history') or []
    if not isinstance(history, list):
        raise DatasetError(source, f'must be a list of [query, response] pairs, got {_kind(history)}', 'history')
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DatasetError(source, 'must be a [query, response] pair', f'history[{i}]')
        messages += [{'role': 'user', 'content': pair[0]}, {'role': 'assistant', 'content': pair[1]}]
    messages.append({'role': 'user', 'content': row['query']})
    if row.get('response') is not None:
        messages.append({'role': 'assistant', 'content': row['response']})
    return _check_messages(messages, source, 'query')


def _check_tools(tools: Any, source: RowSource) -> list:
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DatasetError(source, f'is a string but not valid JSON ({e.msg})', 'tools') from None
    if not isinstance(tools, list):
        raise DatasetError(source, f'must be a list of tool definitions, got {_kind(tools)}', 'tools')
    return tools


def _kind(value: Any) -> str:
    if value is None:
        return 'null'
    text = repr(value)
    return f'{type(value).__name__} {text[:40] + "..." if len(text) > 40 else text}'
