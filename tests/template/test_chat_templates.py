"""Explicit chat templates (qwen2_5, qwen3, llama3, llama3_1) and ``generic`` against the real Jinja strings.

Each family's official chat template (tests/template/data/*.jinja) is put on a copy of SmolLM2's real
tokenizer, with the family's special tokens added so that they tokenize as single tokens; then the
template's ``input_ids`` must equal ``tokenizer.apply_chat_template`` and the labels must cover exactly
the assistant text and its end-of-turn token.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from megaswift.template import IGNORE_INDEX, MaxLengthExceeded, TemplateError, get_template, infer_template_name
from megaswift.template.segments import join_text

DATA = Path(__file__).parent / 'data'
QWEN_TOKENS = ['<think>', '</think>', '<tool_call>', '</tool_call>', '<tool_response>', '</tool_response>']
LLAMA_SPECIAL = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
JINJA = {'qwen2_5': 'qwen2_5_tools.jinja', 'qwen3': 'qwen3.jinja', 'llama3': 'llama3.jinja',
         'llama3_1': 'llama3_1.jinja'}


def make_tokenizer(smollm2_dir: str, family: str | None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if family is None:
        return tok
    if family.startswith('qwen'):
        tok.add_tokens(QWEN_TOKENS)
    else:
        tok.add_tokens(LLAMA_SPECIAL, special_tokens=True)
        tok.bos_token = '<|begin_of_text|>'
    tok.chat_template = (DATA / JINJA[family]).read_text(encoding='utf-8')
    return tok


@pytest.fixture(scope='module')
def toks(smollm2_dir):
    out = {family: make_tokenizer(smollm2_dir, family) for family in JINJA}
    out['smollm2'] = make_tokenizer(smollm2_dir, None)
    return out


def reference_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, **kw)['input_ids'])


def trained(tok, labels) -> list[str]:
    """The decoded runs of unmasked labels."""
    runs, cur = [], []
    for t in list(labels) + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def trainable_by_message(segments) -> list[str]:
    """The trainable text of each assistant message, in order."""
    out: dict[int, str] = {}
    for s in segments:
        if s.trainable:
            out[s.message_index] = out.get(s.message_index, '') + s.text
    return list(out.values())


def encode(tok, name, messages, mode='train', **kw):
    template = get_template(tok, name, **kw)
    template.set_mode(mode)
    return template.encode({'messages': messages})


def user(c):
    return {'role': 'user', 'content': c}


def assistant(c, **kw):
    return {'role': 'assistant', 'content': c, **kw}


def system(c):
    return {'role': 'system', 'content': c}


TWO_TURNS = [user('What is 2+2?'), assistant('It is 4.'), user('And 3+3?'), assistant('6, of course.')]
WITH_SYSTEM = [system('You are terse.')] + TWO_TURNS


# ---------------------------------------------------------------------------------------------- qwen2_5
@pytest.mark.parametrize('messages', [TWO_TURNS, WITH_SYSTEM], ids=['default-system', 'system'])
def test_qwen2_5_train_matches_official(toks, messages):
    tok = toks['qwen2_5']
    enc = encode(tok, 'qwen2_5', messages)
    assert enc['input_ids'] == reference_ids(tok, messages)
    assert trained(tok, enc['labels']) == ['It is 4.<|im_end|>', '6, of course.<|im_end|>']
    assert 'loss_scale' not in enc


def test_qwen2_5_infer_and_mid_conversation_system(toks):
    tok = toks['qwen2_5']
    messages = [user('Hi'), assistant('Hello.'), system('Now answer in French.'), user('Bye'), assistant('Au revoir')]
    enc = encode(tok, 'qwen2_5', messages, mode='infer')
    assert enc['input_ids'] == reference_ids(tok, messages[:-1], add_generation_prompt=True)
    assert encode(tok, 'qwen2_5', messages)['input_ids'] == reference_ids(tok, messages)


def test_qwen2_5_renders_tool_messages_as_official(toks):
    tok = toks['qwen2_5']
    messages = [user('Weather in Paris and Rome?'),
                assistant('<tool_call>\n{"name": "w", "arguments": {"city": "Paris"}}\n</tool_call>'),
                {'role': 'tool', 'content': '{"temp": 21}'}, {'role': 'tool', 'content': '{"temp": 25}'},
                assistant('Paris 21, Rome 25.')]
    segments = get_template(tok, 'qwen2_5').render(messages)
    assert join_text(segments) == tok.apply_chat_template(messages, tokenize=False)
    assert trainable_by_message(segments) == [messages[1]['content'] + '<|im_end|>', 'Paris 21, Rome 25.<|im_end|>']


def test_unknown_role_is_a_template_error(toks):
    with pytest.raises(TemplateError, match=r"messages\[1\]\.role"):
        get_template(toks['qwen2_5'], 'qwen2_5').render([user('a'), {'role': 'robot', 'content': 'b'}])


# ---------------------------------------------------------------------------------------------- qwen3
THINK_HISTORY = [user('2+2?'), assistant('<think>\nadd them\n</think>\n\n4'),
                 user('3+3?'), assistant('<think>\nagain\n</think>\n\n6')]


def test_qwen3_strips_history_reasoning_keeps_last(toks):
    tok = toks['qwen3']
    enc = encode(tok, 'qwen3', [system('Be brief.')] + THINK_HISTORY)
    assert enc['input_ids'] == reference_ids(tok, [system('Be brief.')] + THINK_HISTORY)
    assert trained(tok, enc['labels']) == ['4<|im_end|>', '<think>\nagain\n</think>\n\n6<|im_end|>']
    assert 'add them' not in tok.decode(enc['input_ids'])


def test_qwen3_last_turn_without_reasoning_gets_empty_think(toks):
    tok = toks['qwen3']
    enc = encode(tok, 'qwen3', TWO_TURNS)
    assert enc['input_ids'] == reference_ids(tok, TWO_TURNS)
    assert trained(tok, enc['labels']) == ['It is 4.<|im_end|>', '<think>\n\n</think>\n\n6, of course.<|im_end|>']


def test_qwen3_reasoning_content_field_and_messy_whitespace(toks):
    tok = toks['qwen3']
    for messages in ([user('q'), assistant('answer', reasoning_content='\nthinking\n')],
                     [user('q'), assistant('<think>\n\nthinking\n\n</think>\n\n\nanswer')],
                     [user('q'), assistant('thinking</think>answer')]):
        enc = encode(tok, 'qwen3', messages)
        assert enc['input_ids'] == reference_ids(tok, messages)
        assert trained(tok, enc['labels']) == ['<think>\nthinking\n</think>\n\nanswer<|im_end|>']


def test_qwen3_enable_thinking_false(toks):
    tok = toks['qwen3']
    enc = encode(tok, 'qwen3', THINK_HISTORY, mode='infer', enable_thinking=False)
    assert enc['input_ids'] == reference_ids(tok, THINK_HISTORY[:-1], add_generation_prompt=True,
                                             enable_thinking=False)
    assert tok.decode(enc['input_ids']).endswith('<|im_start|>assistant\n<think>\n\n</think>\n\n')
    on = encode(tok, 'qwen3', THINK_HISTORY, mode='infer')
    assert on['input_ids'] == reference_ids(tok, THINK_HISTORY[:-1], add_generation_prompt=True)
    # training text is the official one; the empty think block the template writes is prompt, not target
    enc = encode(tok, 'qwen3', TWO_TURNS, enable_thinking=False)
    assert enc['input_ids'] == reference_ids(tok, TWO_TURNS)
    assert trained(tok, enc['labels']) == ['It is 4.<|im_end|>', '6, of course.<|im_end|>']


def test_qwen3_segments_keep_end_token_and_tool_spans_apart(toks):
    """The think block the template adds is its own segment, so the base still splits content | end token
    and never trains agent-marked tool output inside the content."""
    tok = toks['qwen3']
    template = get_template(tok, 'qwen3')
    content = 'Action: f\nObservation: SECRET\nFinal Answer: 3'
    start = content.index(' SECRET')
    messages = [user('q'), assistant(content, tool_spans=[[start, start + len(' SECRET\n')]])]
    segments = [(s.text, s.trainable) for s in template.render_segments(messages)]
    assert ('<think>\n\n</think>\n\n', True) in segments and ('<|im_end|>', True) in segments
    enc = template.encode({'messages': messages})
    assert enc['input_ids'] == reference_ids(tok, messages)
    assert trained(tok, enc['labels']) == ['<think>\n\n</think>\n\nAction: f\nObservation:',
                                           'Final Answer: 3<|im_end|>']
    # a rewritten content (history without its reasoning) still gets its end token as a separate segment
    history = template.render_segments(THINK_HISTORY)
    assert [s.text for s in history if s.trainable and s.message_index == 1] == ['4', '<|im_end|>']


def test_qwen3_multi_step_tool_turns(toks):
    """After the last real query, intermediate turns keep their reasoning (or render answer only)."""
    tok = toks['qwen3']
    call = '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>'
    messages = [user('old question'), assistant('<think>\nold\n</think>\n\nold answer'),
                user('weather?'), assistant(f'<think>\nneed a tool\n</think>\n\n{call}'),
                {'role': 'tool', 'content': 'sunny'}, assistant(call), {'role': 'tool', 'content': 'still sunny'},
                assistant('<think>\ndone\n</think>\n\nIt is sunny.')]
    segments = get_template(tok, 'qwen3').render(messages)
    assert join_text(segments) == tok.apply_chat_template(messages, tokenize=False)
    assert trainable_by_message(segments) == [
        'old answer<|im_end|>', f'<think>\nneed a tool\n</think>\n\n{call}<|im_end|>', f'{call}<|im_end|>',
        '<think>\ndone\n</think>\n\nIt is sunny.<|im_end|>']
    # a tool result sent as a user message does not count as the last query
    as_user = [user('weather?'), assistant(f'<think>\nneed a tool\n</think>\n\n{call}'),
               user('<tool_response>\nsunny\n</tool_response>'), assistant('<think>\nok\n</think>\n\nSunny.')]
    enc = encode(tok, 'qwen3', as_user)
    assert enc['input_ids'] == reference_ids(tok, as_user)
    assert 'need a tool' in trained(tok, enc['labels'])[0]


# ---------------------------------------------------------------------------------------------- llama3
@pytest.mark.parametrize('name', ['llama3', 'llama3_1'])
@pytest.mark.parametrize('messages', [TWO_TURNS, WITH_SYSTEM], ids=['no-system', 'system'])
def test_llama3_train_matches_official(toks, name, messages):
    tok = toks[name]
    messages = messages[:-1] + [assistant('  6, of course. \n')]  # the template trims content
    enc = encode(tok, name, messages)
    assert enc['input_ids'] == reference_ids(tok, messages)
    assert enc['input_ids'][0] == tok.convert_tokens_to_ids('<|begin_of_text|>')
    assert trained(tok, enc['labels']) == ['It is 4.<|eot_id|>', '6, of course.<|eot_id|>']


@pytest.mark.parametrize('name', ['llama3', 'llama3_1'])
def test_llama3_infer_matches_official(toks, name):
    tok = toks[name]
    enc = encode(tok, name, WITH_SYSTEM, mode='infer')
    assert enc['input_ids'] == reference_ids(tok, WITH_SYSTEM[:-1], add_generation_prompt=True)
    assert tok.decode(enc['input_ids']).endswith('<|start_header_id|>assistant<|end_header_id|>\n\n')


def test_llama3_1_date_and_tool_turns(toks):
    tok = toks['llama3_1']
    messages = [user('weather?'), assistant('{"name": "w", "parameters": {}}'),
                {'role': 'tool', 'content': '{"temp": "21°"}'}, assistant('21 degrees.')]
    assert join_text(get_template(tok, 'llama3_1').render(messages)) == tok.apply_chat_template(messages,
                                                                                                 tokenize=False)
    text = join_text(get_template(tok, 'llama3_1', date_string='01 Jan 2025').render(messages))
    assert text == tok.apply_chat_template(messages, tokenize=False, date_string='01 Jan 2025')


def test_llama3_1_with_the_llama3_agent_template_matches_official_tools_prompt(toks):
    """Unified agent row -> llama3 agent template -> llama3_1 == the official template given OpenAI tools."""
    from megaswift.template.agent import agent_templates
    if 'llama3' not in agent_templates:
        pytest.skip('the llama3 agent template is not registered')
    tok = toks['llama3_1']
    tools = [{'type': 'function', 'function': {'name': 'w', 'description': 'weather',
                                               'parameters': {'type': 'object', 'properties': {'city': {}}}}}]
    row = {'tools': tools, 'messages': [user('Weather in Paris?'),
                                        {'role': 'tool_call', 'content': '{"name": "w", "arguments": {"city": "P"}}'},
                                        {'role': 'tool_response', 'content': '{"temp": 21}'}, assistant('It is 21.')]}
    official = [user('Weather in Paris?'),
                {'role': 'assistant', 'tool_calls': [{'type': 'function',
                                                      'function': {'name': 'w', 'arguments': {'city': 'P'}}}]},
                {'role': 'tool', 'content': '{"temp": 21}'}, assistant('It is 21.')]
    template = get_template(tok, 'llama3_1')
    assert template.encode(row)['input_ids'] == reference_ids(tok, official, tools=tools)


# ---------------------------------------------------------------------------------------------- inference of the name
def test_infer_template_name(toks, smollm2_dir):
    for name in JINJA:
        assert infer_template_name(toks[name]) == name
    assert infer_template_name(toks['smollm2']) == 'smollm2'
    custom = make_tokenizer(smollm2_dir, 'qwen2_5')
    custom.chat_template = custom.chat_template.replace('You are Qwen, created by Alibaba Cloud.', 'You are Bob.')
    assert infer_template_name(custom) == 'generic'   # looks like Qwen2.5, renders differently
    custom.chat_template = None
    assert infer_template_name(custom) == 'chatml'


# ---------------------------------------------------------------------------------------------- generic
@pytest.mark.parametrize('family', ['smollm2', 'qwen2_5', 'llama3', 'llama3_1'])
def test_generic_equals_official_and_explicit(toks, family):
    tok = toks[family]
    messages = WITH_SYSTEM[:-1] + [assistant(' 6, of course.\n')]
    generic = encode(tok, 'generic', messages)
    assert generic['input_ids'] == reference_ids(tok, messages)
    explicit = encode(tok, family, messages)
    assert generic == explicit
    infer = encode(tok, 'generic', messages, mode='infer')
    assert infer['input_ids'] == reference_ids(tok, messages[:-1], add_generation_prompt=True)
    # the other messages are attributed too, so strategies that look for user turns agree
    assert encode(tok, 'generic', messages, loss_scale='last_round') == encode(tok, family, messages,
                                                                                loss_scale='last_round')
    roles = {(s.role, s.message_index) for s in get_template(tok, 'generic').render_segments(messages)}
    assert {('system', 0), ('user', 1), ('assistant', 2), ('user', 3), ('assistant', 4)} <= roles


def test_generic_qwen3_without_history_reasoning_and_kwargs(toks):
    tok = toks['qwen3']
    messages = [user('q'), assistant('<think>\nr\n</think>\n\nanswer')]
    enc = encode(tok, 'generic', messages)
    assert enc == encode(tok, 'qwen3', messages)
    enc = encode(tok, 'generic', messages, mode='infer', chat_template_kwargs={'enable_thinking': False})
    assert enc['input_ids'] == reference_ids(tok, messages[:1], add_generation_prompt=True, enable_thinking=False)


def test_generic_rejects_templates_that_are_not_prefix_stable(toks, smollm2_dir):
    with pytest.raises(TemplateError, match='later messages change'):   # qwen3 strips the reasoning of history
        encode(toks['qwen3'], 'generic', THINK_HISTORY)
    tok = make_tokenizer(smollm2_dir, None)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }} ({{ loop.index }}/{{ messages|length }})\n"
                         "{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match='--template'):
        encode(tok, 'generic', TWO_TURNS)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match='rewrites or decorates'):
        encode(tok, 'generic', TWO_TURNS)
    tok.chat_template = None
    with pytest.raises(ValueError, match='chat_template'):
        get_template(tok, 'generic')


# ---------------------------------------------------------------------------------------------- modes, truncation
def test_truncation_strategies(toks):
    tok = toks['qwen2_5']
    full = encode(tok, 'qwen2_5', TWO_TURNS)
    n = len(full['input_ids']) - 5
    with pytest.raises(MaxLengthExceeded):
        encode(tok, 'qwen2_5', TWO_TURNS, max_length=n)
    with pytest.raises(TemplateError, match='exceed max_length') as err:
        encode(tok, 'qwen2_5', TWO_TURNS, max_length=n, truncation_strategy='error')
    assert not isinstance(err.value, MaxLengthExceeded)
    left = encode(tok, 'qwen2_5', TWO_TURNS, max_length=n, truncation_strategy='left')
    assert left == {k: v[-n:] for k, v in full.items()}
    right = encode(tok, 'qwen2_5', TWO_TURNS, max_length=n, truncation_strategy='right')
    assert right == {k: v[:n] for k, v in full.items()}
    assert encode(tok, 'qwen2_5', TWO_TURNS, max_length=len(full['input_ids'])) == full
    prompt = encode(tok, 'qwen2_5', TWO_TURNS, mode='infer', max_length=8, truncation_strategy='left')
    assert prompt['input_ids'] == reference_ids(tok, TWO_TURNS[:-1], add_generation_prompt=True)[-8:]


def test_rlhf_mode(toks):
    tok = toks['qwen3']
    template = get_template(tok, 'qwen3', enable_thinking=False)
    template.set_mode('rlhf')
    enc = template.encode({'messages': TWO_TURNS, 'rejected_response': 'Twelve.'})
    assert enc['chosen_input_ids'] == reference_ids(tok, TWO_TURNS)
    assert enc['rejected_input_ids'] == reference_ids(tok, TWO_TURNS[:-1] + [assistant('Twelve.')])
    assert trained(tok, enc['rejected_labels'])[-1] == 'Twelve.<|im_end|>'
    with pytest.raises(TemplateError, match='rejected_response'):
        template.encode({'messages': TWO_TURNS})


def test_safe_decode_and_top_level_api(smollm2_dir):
    from megaswift import get_processor
    from megaswift import get_template as top_get_template
    tok = get_processor(smollm2_dir)
    template = top_get_template(tok)
    assert template.name == 'smollm2'
    template.set_mode('train')
    enc = template.encode({'messages': TWO_TURNS})
    assert template.safe_decode(enc['input_ids']) == tok.decode(enc['input_ids'])
    labels = template.safe_decode(enc['labels'])
    assert labels.startswith('[-100 * ') and 'It is 4.<|im_end|>[-100 * ' in labels
    assert labels.endswith('6, of course.<|im_end|>[-100 * 1]')
    assert top_get_template(tok, 'qwen3', enable_thinking=False).enable_thinking is False
    with pytest.raises(ValueError, match="did you mean 'qwen3'"):
        top_get_template(tok, 'qwen33')
