"""Agent templates: round trips, exact Qwen2.5 hermes rendering, ReAct/Qwen in-turn observations, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaswift.template import IGNORE_INDEX, TemplateError
from megaswift.template.agent import Function, agent_templates, get_agent_template
from megaswift.template.segments import join_text
from megaswift.template.templates.chatml import ChatMLTemplate

DATA = Path(__file__).parent / 'data'
QWEN_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.'

TOOLS = [
    {'type': 'function', 'function': {
        'name': 'get_weather', 'description': 'Get the current weather in a city.',
        'parameters': {'type': 'object', 'properties': {'city': {'type': 'string', 'description': 'City name'},
                                                        'unit': {'type': 'string', 'enum': ['c', 'f']}},
                       'required': ['city']}}},
    {'type': 'function', 'function': {
        'name': 'search', 'description': 'Search the web (résumé, 天气).',
        'parameters': {'type': 'object', 'properties': {'query': {'type': 'string'}}}}},
]

CALL_SETS = {
    'single': [Function('get_weather', {'city': 'Paris'})],
    'parallel': [Function('get_weather', {'city': 'Paris', 'unit': 'c'}), Function('search', {'query': 'louvre'}),
                 Function('get_weather', {'city': 'Tokyo'})],
    'unicode': [Function('search', {'query': '北京 天气 ☀️', 'note': 'naïve café "quoted"'})],
    'nested': [Function('plan', {'steps': [{'do': 'a', 'args': {'x': [1, 2, {'y': None}]}}, {'do': 'b'}],
                                 'flags': {'dry_run': True, 'depth': 2.5}})],
    'empty_args': [Function('now', {})],
    'raw_string_args': [Function('shell', 'ls -la /tmp')],
}


def call_msg(fn: Function) -> dict:
    content = json.dumps({'name': fn.name, 'arguments': fn.arguments}, ensure_ascii=False)
    return {'role': 'tool_call', 'content': content}


def conversation() -> list[dict]:
    """Two rounds: parallel calls + grouped responses, then text + a call, unicode everywhere."""
    return [
        {'role': 'system', 'content': 'You are a weather bot.'},
        {'role': 'user', 'content': 'Weather in Paris and Tokyo?'},
        call_msg(Function('get_weather', {'city': 'Paris'})),
        call_msg(Function('get_weather', {'city': 'Tokyo', 'unit': 'c'})),
        {'role': 'tool_response', 'content': '{"temp": 21}'},
        {'role': 'tool', 'content': '東京: 18°C'},
        {'role': 'assistant', 'content': 'Paris is 21°C and Tokyo 18°C.'},
        {'role': 'user', 'content': 'Search for 天气 news.'},
        {'role': 'assistant', 'content': 'Let me search.'},
        call_msg(Function('search', {'query': '天气 news', 'opts': {'lang': ['zh', 'en']}})),
        {'role': 'tool_response', 'content': 'no results'},
        {'role': 'assistant', 'content': 'Nothing found.'},
    ]


def to_openai(messages: list[dict]) -> list[dict]:
    """Unified agent messages -> OpenAI/HF messages (assistant ``tool_calls`` + role ``tool``)."""
    out, prev = [], None
    for m in messages:
        if m['role'] == 'tool_call':
            call = json.loads(m['content'])
            fn = {'type': 'function', 'function': {'name': call['name'], 'arguments': call['arguments']}}
            if prev in ('assistant', 'tool_call'):  # parallel calls, or text then calls: one assistant turn
                out[-1].setdefault('tool_calls', []).append(fn)
            else:
                out.append({'role': 'assistant', 'content': '', 'tool_calls': [fn]})
        elif m['role'] in ('tool', 'tool_response'):
            out.append({'role': 'tool', 'content': m['content']})
        else:
            out.append(dict(m))
        prev = m['role']
    return out


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize('name', sorted(agent_templates))
@pytest.mark.parametrize('case', sorted(CALL_SETS))
def test_round_trip(name, case):
    tpl = get_agent_template(name)
    calls = CALL_SETS[case]
    assert tpl.get_toolcall(tpl._format_tool_calls(calls)) == calls


@pytest.mark.parametrize('name', sorted(agent_templates))
def test_round_trip_through_to_chat(name):
    tpl = get_agent_template(name)
    calls = CALL_SETS['parallel'] + CALL_SETS['unicode']
    msgs = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'Thinking first.'},
            *map(call_msg, calls)]
    chat = tpl.to_chat(msgs, TOOLS)
    assert chat[-1]['role'] == 'assistant' and chat[-1]['content'].startswith('Thinking first.\n')
    assert tpl.get_toolcall(chat[-1]['content']) == calls


@pytest.mark.parametrize('name', sorted(agent_templates))
def test_plain_conversation_passes_through(name):
    msgs = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'Hi', 'loss': None},
            {'role': 'assistant', 'content': 'Hello!', 'loss': False}, {'role': 'user', 'content': 'Bye'},
            {'role': 'assistant', 'content': 'Bye.'}]
    out = get_agent_template(name).to_chat(msgs, None, default_system='DEFAULT')
    assert out == msgs and all(a is not b for a, b in zip(out, msgs))
    assert get_agent_template(name).get_toolcall('Just text, no tool call.') == []


def test_get_toolcall_on_model_outputs():
    hermes = get_agent_template('hermes')
    out = ('I will check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
           '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": 2}"}\n</tool_call>\n'
           '<tool_call>\n{"name": "c", "arguments": {}}')  # unterminated last call
    assert hermes.get_toolcall(out) == [Function('a', {'x': 1}), Function('b', {'y': 2}), Function('c', {})]
    assert hermes.get_toolcall('<tool_call>\nnot json\n</tool_call>') == []
    assert hermes.get_toolcall('Action: f\nAction Input: {"q": 1}\n') == [Function('f', {'q': 1})]  # ms-swift compat
    react = get_agent_template('react_en')
    out = 'Thought: look it up\nAction: search\nAction Input: {"query": "x"}\nObservation:'
    assert react.get_toolcall(out) == [Function('search', {'query': 'x'})]
    assert react.get_toolcall('Action: calc\nAction Input: 2+2') == [Function('calc', '2+2')]
    qwen = get_agent_template('qwen_zh')
    out = '好的。\n✿FUNCTION✿: search\n✿ARGS✿: {"query": "天气"}\n✿RESULT✿'
    assert qwen.get_toolcall(out) == [Function('search', {'query': '天气'})]
    llama = get_agent_template('llama3')
    out = '<|python_tag|>{"name": "f", "parameters": {"a": {"b": [1]}}}; {"name": "g", "parameters": {}}<|eom_id|>'
    assert llama.get_toolcall(out) == [Function('f', {'a': {'b': [1]}}), Function('g', {})]


# ---------------------------------------------------------------------------------------------- hermes == Qwen2.5
@pytest.fixture(scope='module')
def qwen_tok(smollm2_dir):
    from megaswift.model import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = (DATA / 'qwen2_5_tools.jinja').read_text()
    return tok


class QwenLikeChatML(ChatMLTemplate):
    default_system = QWEN_SYSTEM


def _render(tpl, row, add_generation_prompt=False):
    messages, tools = tpl.chat_messages(row)
    return join_text(tpl.render(messages, tools, add_generation_prompt=add_generation_prompt))


@pytest.mark.parametrize('with_system', [True, False])
def test_hermes_matches_qwen2_5_chat_template(qwen_tok, with_system):
    msgs = conversation() if with_system else conversation()[1:]
    expected = qwen_tok.apply_chat_template(to_openai(msgs), tools=TOOLS, tokenize=False)
    tpl = QwenLikeChatML(qwen_tok, agent_template='hermes')
    assert _render(tpl, {'messages': msgs, 'tools': json.dumps(TOOLS)}) == expected


def test_hermes_matches_qwen2_5_generation_prompt(qwen_tok):
    msgs = conversation()[:6]  # ends with the grouped tool responses
    expected = qwen_tok.apply_chat_template(to_openai(msgs), tools=TOOLS, tokenize=False, add_generation_prompt=True)
    tpl = QwenLikeChatML(qwen_tok, agent_template='hermes')
    assert _render(tpl, {'messages': msgs, 'tools': TOOLS}, add_generation_prompt=True) == expected
    assert expected.endswith('<tool_response>\n東京: 18°C\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


def test_hermes_accepts_bare_tools_and_openai_tool_calls(qwen_tok):
    tpl = get_agent_template('hermes')
    bare = [t['function'] for t in TOOLS]
    assert tpl.to_chat(conversation(), bare) == tpl.to_chat(conversation(), TOOLS)
    openai = to_openai(conversation())
    openai[2]['content'] = None
    for call in openai[2]['tool_calls']:  # OpenAI sends arguments as a JSON string
        call['function']['arguments'] = json.dumps(call['function']['arguments'])
    assert tpl.to_chat(openai, TOOLS) == tpl.to_chat(conversation(), TOOLS)


def test_agent_roles_without_tools_keep_the_system_as_is():
    msgs = [{'role': 'system', 'content': '', 'loss': None}, {'role': 'user', 'content': 'q'},
            call_msg(Function('f', {'a': 1})), {'role': 'tool', 'content': 'r'}]
    chat = get_agent_template('hermes').to_chat(msgs, None, default_system='DEFAULT')
    assert chat[0] == msgs[0] and [m['role'] for m in chat] == ['system', 'user', 'assistant', 'user']
    only_assistant = [{'role': 'assistant', 'content': 'a'}]  # tools without a user turn: fine unless listed there
    assert get_agent_template('hermes').to_chat(only_assistant, TOOLS)[1:] == only_assistant


def test_hermes_encode_labels(qwen_tok):
    tpl = ChatMLTemplate(qwen_tok, agent_template='hermes')
    row = {'messages': conversation(), 'tools': TOOLS}
    enc = tpl.encode(row)
    trained = qwen_tok.decode([t for t in enc['labels'] if t != IGNORE_INDEX])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in trained
    assert 'Let me search.\n<tool_call>' in trained and 'Nothing found.<|im_end|>' in trained
    assert '<tool_response>' not in trained and '東京' not in trained and 'no results' not in trained
    assert '# Tools' not in trained
    assert qwen_tok.decode(enc['input_ids']) == _render(tpl, row)


# ---------------------------------------------------------------------------------------------- in-turn observations
def test_react_keeps_observation_in_assistant_turn(qwen_tok):
    tpl = get_agent_template('react_en')
    msgs = [{'role': 'user', 'content': 'Weather?'},
            {'role': 'assistant', 'content': 'Thought: I should call a tool.'},
            call_msg(Function('get_weather', {'city': 'Paris'})), call_msg(Function('search', {'query': 'q'})),
            {'role': 'tool_response', 'content': 'sunny'}, {'role': 'tool', 'content': 'nothing'},
            {'role': 'assistant', 'content': 'Thought: I now know the final answer\nFinal Answer: sunny'}]
    chat = tpl.to_chat(msgs, TOOLS)
    assert [m['role'] for m in chat] == ['system', 'user', 'assistant']
    assert chat[0]['content'].startswith('Answer the following questions as best you can.')
    assert 'Action: the action to take, should be one of [get_weather,search]' in chat[0]['content']
    assert chat[2]['content'] == ('Thought: I should call a tool.\n'
                                  'Action: get_weather\nAction Input: {"city": "Paris"}\n'
                                  'Action: search\nAction Input: {"query": "q"}\nObservation: sunny\n'
                                  'Observation: nothing\nThought: I now know the final answer\nFinal Answer: sunny')
    segs = ChatMLTemplate(qwen_tok, agent_template='react_en').render(chat)
    (assistant,) = [s for s in segs if s.trainable]
    assert 'Observation: sunny' in assistant.text  # the loss scale, not the turn structure, masks it
    zh = get_agent_template('react_zh').to_chat(msgs, TOOLS, default_system='SYS')
    assert zh[0]['content'].startswith('SYS\n\n尽可能地回答以下问题。') and zh[0]['content'].endswith('现在开始！\n')


def test_qwen_format_follows_qwen_agent():
    tpl = get_agent_template('qwen_en')
    msgs = [{'role': 'user', 'content': 'Weather?'}, call_msg(Function('get_weather', {'city': 'Paris'})),
            {'role': 'tool_response', 'content': 'sunny'}, {'role': 'assistant', 'content': 'It is sunny.'}]
    chat = tpl.to_chat(msgs, TOOLS, default_system='SYS')
    assert [m['role'] for m in chat] == ['system', 'user', 'assistant']
    assert chat[2]['content'] == ('✿FUNCTION✿: get_weather\n✿ARGS✿: {"city": "Paris"}\n✿RESULT✿: sunny\n'
                                  '✿RETURN✿: It is sunny.')
    system = chat[0]['content']
    assert system.startswith('SYS\n\n# Tools\n\n## You have access to the following tools:\n\n### get_weather\n\n'
                             'get_weather: Get the current weather in a city. Parameters: {"type": "object"')
    assert system.endswith('✿RETURN✿: Reply based on tool results. Images need to be rendered as ![](url)')
    zh = get_agent_template('qwen_zh_parallel').to_chat(msgs, TOOLS)[0]['content']
    assert zh.startswith('# 工具\n\n## 你拥有如下工具：') and '✿FUNCTION✿: 工具1的名称，必须是[get_weather,search]之一' in zh


def test_llama3_tools_in_first_user_message_and_tool_role():
    tpl = get_agent_template('llama3')
    msgs = [{'role': 'system', 'content': 'SYS'}, {'role': 'user', 'content': '  Weather?\n'},
            call_msg(Function('get_weather', {'city': 'Paris'})), {'role': 'tool_response', 'content': 'sunny'},
            {'role': 'assistant', 'content': 'Sunny.'}]
    chat = tpl.to_chat(msgs, TOOLS)
    assert [m['role'] for m in chat] == ['system', 'user', 'assistant', 'tool', 'assistant']
    assert chat[0]['content'] == 'SYS'
    user = chat[1]['content']
    assert user.startswith('Given the following functions, please respond with a JSON for a function call with its '
                           'proper arguments that best answers the given prompt.\n\nRespond in the format {"name": '
                           'function name, "parameters": dictionary of argument name and its value}.Do not use '
                           'variables.\n\n{\n    "type": "function",')
    assert user.endswith('}\n\nWeather?') and json.dumps(TOOLS[1], indent=4, ensure_ascii=False) in user
    assert chat[2]['content'] == '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert chat[3] == {'role': 'tool', 'content': 'sunny', 'tool_response': True}
    with pytest.raises(TemplateError) as e:
        tpl.to_chat([{'role': 'system', 'content': 'S'}], TOOLS)
    assert e.value.field == 'messages'


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize('name', ['hermes', 'react_en', 'qwen_en', 'llama3'])
@pytest.mark.parametrize('bad, field, text', [
    ({'role': 'tool_call', 'content': '{"name": "f", "arguments": '}, 'messages[2].content', 'not valid JSON'),
    ({'role': 'tool_call', 'content': '{"arguments": {}}'}, 'messages[2].content', "'name'"),
    ({'role': 'tool_call', 'content': '[1, 2]'}, 'messages[2].content', "'name'"),
    ({'role': 'tool_response', 'content': 'orphan'}, 'messages[2].role', 'no preceding tool call'),
    ({'role': 'function', 'content': 'x'}, 'messages[2].role', "unknown role 'function'"),
])
def test_errors_name_the_field(name, bad, field, text):
    msgs = [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}, bad]
    with pytest.raises(TemplateError) as e:
        get_agent_template(name).to_chat(msgs, TOOLS)
    assert e.value.field == field and text in str(e.value) and field in str(e.value)


def test_response_after_user_turn_is_an_error():
    msgs = [{'role': 'user', 'content': 'q'}, call_msg(Function('f', {})), {'role': 'tool', 'content': 'r'},
            {'role': 'user', 'content': 'again'}, {'role': 'tool', 'content': 'late'}]
    with pytest.raises(TemplateError) as e:
        get_agent_template('hermes').to_chat(msgs, None)
    assert e.value.field == 'messages[4].role'


def test_errors_through_encode(qwen_tok):
    tpl = ChatMLTemplate(qwen_tok, agent_template='hermes')
    row = {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'tool_call', 'content': 'get_weather(city=1)'}]}
    with pytest.raises(TemplateError, match=r"field 'messages\[1\]\.content'"):
        tpl.encode(row)
    with pytest.raises(TemplateError) as e:
        tpl.encode({'messages': conversation(), 'tools': '[{"name": '})
    assert e.value.field == 'tools'
    with pytest.raises(TemplateError) as e:
        tpl.encode({'messages': conversation(), 'tools': [{'description': 'no name'}]})
    assert e.value.field == 'tools[0]'
