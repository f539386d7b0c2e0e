"""Checks of a row's agent fields: its ``tools`` column and the tool calls in its messages.

Both are interpreted by the agent templates (``megaswift.template.agent``), which render them into the prompt; a
malformed one is reported here, when the dataset is read, with ``file:line`` and the field, so that every command
(``sft``, ``rlhf``, ``sample``, ``template``) refuses it before any model is loaded instead of rendering it wrongly.

- ``tools``: a list, or a JSON string of one, of function definitions: ``{"name", "description", "parameters"}``
  or the OpenAI form ``{"type": "function", "function": {...}}``; each item may itself be a JSON string. The name is
  a non-empty string, the description a string and the parameters an object (a JSON schema) when given.
- A tool call (the content of a ``tool_call`` message, or an item of an assistant message's ``tool_calls``): an
  object, or a JSON string of one, in either form, with a non-empty ``name`` and ``arguments`` that are an object
  or a JSON string of an object (``parameters`` is accepted for ``arguments``, as ms-swift does).
"""
from __future__ import annotations

import json
from typing import Any

from .errors import DatasetError, RowSource, describe


def check_tools(tools: Any, source: RowSource) -> list[dict]:
    """The row's ``tools`` as a list of definition objects; a ``DatasetError`` naming the bad item otherwise."""
    tools = _json_value(tools, source, 'tools')
    if not isinstance(tools, list):
        raise DatasetError(source, f'must be a list of tool definitions, got {describe(tools)}', 'tools')
    out = []
    for i, tool in enumerate(tools):
        field = f'tools[{i}]'
        tool = _json_value(tool, source, field)
        function, field = _function_part(tool, source, field, 'a tool definition (an object with name and parameters)')
        _check_name(function, source, field)
        description = function.get('description')
        if description is not None and not isinstance(description, str):
            raise DatasetError(source, f'must be a string, got {describe(description)}', f'{field}.description')
        parameters = function.get('parameters')
        if parameters is not None and not isinstance(parameters, dict):
            raise DatasetError(source, f'must be an object (a JSON schema of the arguments), got '
                                       f'{describe(parameters)}', f'{field}.parameters')
        out.append(tool)
    return out


def check_tool_call(call: Any, source: RowSource, field: str) -> None:
    """One tool call of the conversation (see the module docstring); errors name ``field`` and its parts."""
    call = _json_value(call, source, field)
    function, field = _function_part(call, source, field, 'a tool call (an object with name and arguments)')
    _check_name(function, source, field)
    key = 'arguments' if 'arguments' in function else 'parameters'
    arguments = function.get(key)
    if arguments is None:
        return
    arguments = _json_value(arguments, source, f'{field}.{key}')
    if not isinstance(arguments, dict):
        raise DatasetError(source, f'must be a JSON object (or a string of one), got {describe(arguments)}',
                           f'{field}.{key}')


def check_tool_calls(message: dict, source: RowSource, field: str) -> None:
    """An assistant message's ``tool_calls``: a list of tool calls (``field`` is the message's)."""
    calls = message.get('tool_calls')
    if calls is None or calls == []:
        return
    if message.get('role') != 'assistant':
        raise DatasetError(source, f"only an assistant message can make tool calls (this one is "
                                   f"{message.get('role')!r})", f'{field}.tool_calls')
    if not isinstance(calls, list):
        raise DatasetError(source, f'must be a list of tool calls, got {describe(calls)}', f'{field}.tool_calls')
    for j, call in enumerate(calls):
        check_tool_call(call, source, f'{field}.tool_calls[{j}]')


def _json_value(value: Any, source: RowSource, field: str) -> Any:
    """``value``, decoded when it is a string of JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DatasetError(source, f'is a string but not valid JSON ({e.msg}): {value[:60]!r}', field) from None


def _function_part(value: Any, source: RowSource, field: str, what: str) -> tuple[dict, str]:
    """The function object of a bare or OpenAI-form (``{"type": "function", "function": {...}}``) definition or
    call, and the field that names it."""
    if not isinstance(value, dict):
        raise DatasetError(source, f'must be {what}, got {describe(value)}', field)
    if value.get('function') is None:  # None too: an HF dataset fills a key its other rows have with None
        return value, field
    if not isinstance(value['function'], dict):
        raise DatasetError(source, f"must be an object, got {describe(value['function'])}", f'{field}.function')
    return value['function'], f'{field}.function'


def _check_name(function: dict, source: RowSource, field: str) -> None:
    name = function.get('name')
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(source, f'must be a non-empty string, got {describe(name)}', f'{field}.name')

