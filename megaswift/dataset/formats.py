"""Normalise every supported row format to the ``messages`` format, validating as we go.

Supported: ``messages`` (OpenAI roles plus tool_call / tool_response), alpaca
(``instruction``/``input``/``output``), sharegpt (``conversations`` with from/value), and
``query``/``response`` (+ ``history``, ``system``). Columns that are not part of the
conversation (``solution``, ``tools``, ids, preference columns ...) are kept, those megaswift reads checked; a
preference pair's ``rejected_messages`` is checked like ``messages``. Media (``images``, ``videos``, ``audios``) are
refused: megaswift's models read text only, and training or sampling such a row without them would be wrong.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import DatasetError, RowSource, describe
from .tools import check_tool_call, check_tool_calls, check_tools

ROLES = ('system', 'user', 'assistant', 'tool', 'tool_call', 'tool_response')
TOOL_RESPONSE_ROLES = ('tool', 'tool_response')
MEDIA_COLUMNS = ('images', 'videos', 'audios')
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
        out['tools'] = check_tools(out['tools'], source)
    if 'solution' in out and out['solution'] is not None and not isinstance(out['solution'], str):
        out['solution'] = str(out['solution'])
    for media in MEDIA_COLUMNS:
        if out.get(media):
            raise DatasetError(source, f"megaswift's models read text only, and this row would be used without its "
                                       f'{media}; remove the column (or these rows) to use the text alone', media)
    row_key = out.get('id')  # matches cached samples to prompts (``megaswift sample``)
    if row_key is not None and (isinstance(row_key, bool) or not isinstance(row_key, (str, int))):
        raise DatasetError(source, f'must be a string or an integer, got {describe(row_key)}', 'id')
    return out


def check_text_row(row: dict[str, Any], source: RowSource) -> dict[str, Any]:
    """A row for plain-text training (``pt`` without a chat template), whose ``text`` must be a string when given;
    the row is returned unchanged."""
    text = row.get('text')
    if text is not None and not isinstance(text, str):
        raise DatasetError(source, f'must be a string, got {describe(text)}', 'text')
    return row


def _check_messages(messages: Any, source: RowSource, field: str) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DatasetError(source, 'must be a list of messages, got a string that is not JSON', field) from None
    if not isinstance(messages, list) or not messages:
        raise DatasetError(source, f'must be a non-empty list of messages, got {describe(messages)}', field)
    out = []
    for i, m in enumerate(messages):
        f = f'{field}[{i}]'
        if not isinstance(m, dict):
            raise DatasetError(source, f'a message must be an object with role and content, got {describe(m)}', f)
        role = m.get('role')
        if role not in ROLES:
            raise DatasetError(source, f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f'{f}.role')
        content = m.get('content')
        if content is None and m.get('tool_calls'):
            content = ''
        if role == 'tool_call':
            check_tool_call(content, source, f'{f}.content')
            if isinstance(content, (dict, list)):
                content = json.dumps(content, ensure_ascii=False)
        if not isinstance(content, str):
            raise DatasetError(source, f'must be a string, got {describe(content)}', f'{f}.content')
        check_tool_calls(m, source, f)
        if role in TOOL_RESPONSE_ROLES and not _answers_a_call(out):
            raise DatasetError(source, 'a tool response must follow a tool call (a tool_call message, an assistant '
                                       "message's tool_calls or another tool response)", f'{f}.role')
        reasoning = m.get('reasoning_content')
        if reasoning is not None and not isinstance(reasoning, str):
            raise DatasetError(source, f'must be a string, got {describe(reasoning)}', f'{f}.reasoning_content')
        msg = dict(m)
        msg['content'] = content
        out.append(msg)
    if all(m['role'] == 'system' for m in out):
        raise DatasetError(source, 'has only system messages; a conversation needs a user turn', field)
    return out


def _answers_a_call(previous: list[dict]) -> bool:
    """Whether a tool response may come after the messages ``previous``."""
    if not previous:
        return False
    last = previous[-1]
    return last['role'] in ('tool_call', *TOOL_RESPONSE_ROLES) or bool(last.get('tool_calls'))


def _from_sharegpt(row: dict, source: RowSource) -> list[dict]:
    conv = row['conversations']
    if not isinstance(conv, list) or not conv:
        raise DatasetError(source, f'must be a non-empty list, got {describe(conv)}', 'conversations')
    messages = [{'role': 'system', 'content': row['system']}] if row.get('system') else []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise DatasetError(source, f'must be an object with from/value, got {describe(turn)}',
                               f'conversations[{i}]')
        speaker = turn.get('from', turn.get('role'))
        if speaker not in _SHAREGPT_ROLES:
            raise DatasetError(source, f'unknown speaker {speaker!r} (expected one of {", ".join(_SHAREGPT_ROLES)})',
                               f'conversations[{i}].from')
        messages.append({'role': _SHAREGPT_ROLES[speaker], 'content': turn.get('value', turn.get('content'))})
    return _check_messages(messages, source, 'conversations')


def _from_alpaca(row: dict, source: RowSource) -> list[dict]:
    instruction = row['instruction']
    if not isinstance(instruction, str) or not instruction.strip():
        raise DatasetError(source, f'must be a non-empty string, got {describe(instruction)}', 'instruction')
    extra = row.get('input')
    if extra is not None and not isinstance(extra, str):
        raise DatasetError(source, f'must be a string, got {describe(extra)}', 'input')
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
        raise DatasetError(source, f'must be a list of [query, response] pairs, got {describe(history)}', 'history')
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DatasetError(source, 'must be a [query, response] pair', f'history[{i}]')
        messages += [{'role': 'user', 'content': pair[0]}, {'role': 'assistant', 'content': pair[1]}]
    messages.append({'role': 'user', 'content': row['query']})
    if row.get('response') is not None:
        messages.append({'role': 'assistant', 'content': row['response']})
    return _check_messages(messages, source, 'query')

