"""Every row field megaswift interprets is checked when the dataset is read, tools and tool calls included: a bad one
is a ``file:line: field '...': ...`` error for every command (sft, rlhf, sample, template), never a traceback or a
row rendered without it."""
import json

import pytest

from megaswift.cli.main import main
from megaswift.dataset import DatasetError, load_dataset

USER = {'role': 'user', 'content': 'Add 2 and 3.'}
ANSWER = {'role': 'assistant', 'content': '5'}
RESULT = {'role': 'tool_response', 'content': '5'}
ADD = {'name': 'add', 'description': 'Add two numbers',
       'parameters': {'type': 'object', 'properties': {'a': {'type': 'number'}, 'b': {'type': 'number'}}}}


def calling(call) -> dict:
    """A conversation whose assistant calls a tool with ``call`` (a tool_call message's content)."""
    return {'messages': [USER, {'role': 'tool_call', 'content': call}, RESULT, ANSWER], 'tools': [ADD]}


def openai_calling(tool_calls) -> dict:
    """The same with an OpenAI-style assistant message carrying ``tool_calls``."""
    return {'messages': [USER, {'role': 'assistant', 'content': None, 'tool_calls': tool_calls},
                         {'role': 'tool', 'content': '5'}, ANSWER], 'tools': [ADD]}


BAD_ROWS = [
    ({'messages': [USER, ANSWER], 'tools': [{'name': 'add', 'parameters': 'a and b'}]},
     'tools[0].parameters', "must be an object (a JSON schema of the arguments), got str 'a and b'"),
    ({'messages': [USER, ANSWER], 'tools': [{'name': 'add', 'parameters': [1]}]},
     'tools[0].parameters', 'must be an object (a JSON schema of the arguments), got list [1]'),
    ({'messages': [USER, ANSWER], 'tools': [5]}, 'tools[0]',
     'must be a tool definition (an object with name and parameters), got int 5'),
    ({'messages': [USER, ANSWER], 'tools': ['{"name": "add"']}, 'tools[0]', 'is a string but not valid JSON'),
    ({'messages': [USER, ANSWER], 'tools': json.dumps([{'type': 'function', 'function': {'description': 'x'}}])},
     'tools[0].function.name', 'must be a non-empty string, got null'),
    ({'messages': [USER, ANSWER], 'tools': [{'type': 'function', 'function': 'add'}]},
     'tools[0].function', "must be an object, got str 'add'"),
    ({'messages': [USER, ANSWER], 'tools': [{'name': 'add', 'description': 3}]},
     'tools[0].description', 'must be a string, got int 3'),
    (calling('{"name": "add", "arguments": '), 'messages[1].content', 'is a string but not valid JSON'),
    (calling('{"arguments": {"a": 2, "b": 3}}'), 'messages[1].content.name', 'must be a non-empty string, got null'),
    (calling({'name': 'add', 'arguments': [2, 3]}), 'messages[1].content.arguments',
     'must be a JSON object (or a string of one), got list [2, 3]'),
    (calling('{"name": "add", "arguments": "{a: 2}"}'), 'messages[1].content.arguments',
     'is a string but not valid JSON'),
    (calling(['add']), 'messages[1].content', "must be a tool call (an object with name and arguments), got list"),
    (openai_calling({'name': 'add'}), 'messages[1].tool_calls', "must be a list of tool calls, got dict"),
    (openai_calling([{'type': 'function', 'function': {'arguments': '{}'}}]),
     'messages[1].tool_calls[0].function.name', 'must be a non-empty string, got null'),
    (openai_calling([{'type': 'function', 'function': {'name': 'add', 'arguments': 5}}]),
     'messages[1].tool_calls[0].function.arguments', 'must be a JSON object (or a string of one), got int 5'),
    ({'messages': [{**USER, 'tool_calls': [{'name': 'add'}]}, ANSWER]}, 'messages[0].tool_calls',
     "only an assistant message can make tool calls (this one is 'user')"),
    ({'messages': [USER, RESULT, ANSWER]}, 'messages[1].role', 'a tool response must follow a tool call'),
    ({'messages': [USER, {**ANSWER, 'reasoning_content': ['think']}]}, 'messages[1].reasoning_content',
     "must be a string, got list ['think']"),
    ({'messages': [USER, ANSWER], 'id': {'n': 1}}, 'id', "must be a string or an integer, got dict {'n': 1}"),
    ({'messages': [{'role': 'user', 'content': '<image>What is this?'}, ANSWER], 'images': ['cat.png']}, 'images',
     "megaswift's models read text only, and this row would be used without its images"),
    ({'conversations': [{'from': 'human', 'value': 'Add 2 and 3.'}, {'from': 'function_call', 'value': '{"name": ""}'},
                        {'from': 'observation', 'value': '5'}]},
     'conversations[1].content.name', "must be a non-empty string, got str ''"),
]


@pytest.mark.parametrize('row, field, message', BAD_ROWS, ids=[f'{i}-{c[1]}' for i, c in enumerate(BAD_ROWS)])
def test_bad_field_is_named_with_file_and_line(tmp_path, row, field, message):
    path = tmp_path / 'agent.jsonl'
    path.write_text(json.dumps(calling({'name': 'add', 'arguments': {'a': 2, 'b': 3}})) + '\n' + json.dumps(row) + '\n')
    with pytest.raises(DatasetError) as caught:
        load_dataset(str(path))
    assert str(caught.value).startswith(f"{path}:2: field '{field}': {message}")


def test_template_command_reports_the_field(capsys, smollm2_dir, tmp_path):
    path = tmp_path / 'agent.jsonl'
    path.write_text(json.dumps(calling({'name': 'add', 'arguments': 'a=2, b=3'})) + '\n')
    capsys.readouterr()
    assert main(['template', '--model', smollm2_dir, '--data', str(path)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"megaswift template: error: {path}:1: field 'messages[1].content.arguments': is a string but not valid JSON "
        "(Expecting value): 'a=2, b=3'")


@pytest.mark.parametrize('suffix, content, line', [
    ('.jsonl', b'{"query": "fine"}\n{"query": "caf\xe9"}\n', 2),
    ('.json', b'[\n {"query": "fine"},\n {"query": "caf\xe9"}\n]\n', 3),
    ('.csv', b'query\nfine\ncaf\xe9\n', 3),
])
def test_text_that_is_not_utf8_is_named_with_its_line(tmp_path, suffix, content, line):
    path = tmp_path / f'latin1{suffix}'
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=rf'latin1{suffix}:{line}: is not UTF-8 text \(byte 0xe9 at column'):
        load_dataset(str(path))


def test_a_byte_order_mark_is_read_as_utf8(tmp_path):
    path = tmp_path / 'notepad.jsonl'
    path.write_bytes('\ufeff{"query": "first"}\r\n{"query": "second"}\r\n'.encode('utf-8'))
    assert [row['messages'][0]['content'] for row in load_dataset(str(path))] == ['first', 'second']


def test_plain_text_rows_need_a_string_text(tmp_path):
    from megaswift.dataset import load_rows
    path = tmp_path / 'corpus.jsonl'
    path.write_text('{"text": "fine"}\n{"text": ["a", "list"]}\n')
    with pytest.raises(DatasetError, match=r"corpus.jsonl:2: field 'text': must be a string, got list \['a', 'list'\]"):
        load_rows([str(path)], seed=0, chat=False)
