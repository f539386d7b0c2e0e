"""Dataset row -> prompt to sample from, plus the columns the reward functions see."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..dataset import DatasetError, row_id
from ..infer_engine import InferRequest


@dataclass
class Prompt:
    """One row to sample for: the request sent to the engine and the row's reward columns."""
    id: str
    request: InferRequest
    columns: dict[str, Any]   # every dataset column except messages; 'solution' is the ground truth or None
    source: str               # file:line of the row, for error messages

    @property
    def messages(self) -> list[dict]:
        return self.request.messages


def build_prompt(row: dict, source: str, system: str | None = None) -> Prompt:
    """Drop the trailing assistant turn (it is the reference answer, never a candidate) and apply ``system``.

    The ground truth is the row's ``solution`` column, else that trailing assistant turn.
    """
    messages = copy.deepcopy(row['messages'])
    reference = None
    if messages and messages[-1]['role'] == 'assistant':
        reference = messages.pop()['content']
    if not messages or messages[-1]['role'] == 'system':
        raise DatasetError(source, 'nothing to answer: the conversation has no user turn before the last assistant '
                                   'turn', 'messages')
    if system is not None:
        if messages[0]['role'] == 'system':
            messages[0] = {**messages[0], 'content': system}
        else:
            messages.insert(0, {'role': 'system', 'content': system})
    columns = {k: v for k, v in row.items() if k not in ('messages', 'id', 'rejected_response')}
    if columns.get('solution') is None:
        columns['solution'] = reference
    tools = columns.get('tools')
    row_key = row.get('id')  # a string or an integer (checked by normalize_row); ids are compared as strings
    return Prompt(id=str(row_key) if row_key not in (None, '') else row_id(row),
                  request=InferRequest(messages=messages, tools=tools), columns=columns, source=source)


def output_row(prompt: Prompt, response: str, rejected: str | None = None) -> dict:
    """The jsonl line for one kept sample: the row's columns, the prompt messages + the sample, and its id."""
    line = dict(prompt.columns)
    line['messages'] = [*prompt.messages, {'role': 'assistant', 'content': response}]
    line['id'] = prompt.id
    if rejected is not None:
        line['rejected_response'] = rejected
    return line
