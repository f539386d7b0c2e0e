"""Rules the Template base applies for every template: exact spans, tool output never trained."""
import pytest

from megaswift.model import load_tokenizer
from megaswift.template import IGNORE_INDEX, TemplateError, get_template


@pytest.fixture(scope='module')
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def trained_text(template, enc):
    return ''.join(template.tokenizer.decode([t]) for t in enc['labels'] if t != IGNORE_INDEX)


def test_chatml_equals_the_tokenizer_and_trains_content_plus_end(tok):
    t = get_template(tok)  # SmolLM2's own template (default system prompt)
    msgs = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo there'},
            {'role': 'user', 'content': 'again'}, {'role': 'assistant', 'content': 'ok!'}]
    enc = t.encode({'messages': msgs})
    assert enc['input_ids'] == tok.apply_chat_template(msgs, tokenize=True)['input_ids']
    assert trained_text(t, enc) == 'yo there<|im_end|>ok!<|im_end|>'
    assert 'loss_scale' not in enc


def test_tool_output_inside_an_assistant_turn_is_never_trained(tok):
    t = get_template(tok, template='chatml')  # default loss scale: the whole assistant turn
    content = 'Action: f\nAction Input: {}\nObservation: SECRET RESULT\nFinal Answer: 3'
    start = content.index('SECRET')
    msgs = [{'role': 'user', 'content': 'q'},
            {'role': 'assistant', 'content': content, 'tool_spans': [[start, start + len('SECRET RESULT\n')]]}]
    enc = t.encode({'messages': msgs})
    trained = trained_text(t, enc)
    assert not any(frag in trained for frag in ('SEC', 'RET', 'RES', 'ULT'))  # no fragment, not just the word
    assert trained.startswith('Action: f') and trained.endswith('Final Answer: 3<|im_end|>')
    assert enc['input_ids'] == t.encode({'messages': [msgs[0], {**msgs[1], 'tool_spans': []}]})['input_ids']


def test_tool_responses_rendered_as_user_turns_are_tool_segments(tok):
    t = get_template(tok, template='chatml', loss_scale='last_round')
    msgs = [{'role': 'user', 'content': 'weather?'}, {'role': 'assistant', 'content': 'CALL'},
            {'role': 'user', 'content': '<tool_response>20C</tool_response>', 'tool_response': True},
            {'role': 'assistant', 'content': 'It is 20C.'}]
    segs = t.render_segments(msgs)
    assert {s.role for s in segs if s.message_index == 2} == {'tool'}
    # last_round: every assistant turn after the last real user query is trained, the tool call too
    assert trained_text(t, t.encode({'messages': msgs})) == 'CALL<|im_end|>It is 20C.<|im_end|>'


def test_bad_tool_span_names_the_field(tok):
    t = get_template(tok, template='chatml')
    msgs = [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'abc', 'tool_spans': [[2, 9]]}]
    with pytest.raises(TemplateError, match=r"messages\[1\].tool_spans"):
        t.encode({'messages': msgs})


@pytest.mark.parametrize('agent, loss_scale', [('react_en', 'default'), ('react_en', 'react'), ('qwen_en', 'default'),
                                               ('qwen_en', 'qwen'), ('hermes', 'default'), ('hermes', 'last_round')])
def test_agent_conversations_train_calls_and_answers_but_never_tool_output(tok, agent, loss_scale):
    t = get_template(tok, template='chatml', agent_template=agent, loss_scale=loss_scale)
    row = {'tools': [{'name': 'get_weather', 'description': 'weather', 'parameters': {'type': 'object'}}],
           'messages': [{'role': 'user', 'content': 'Weather in Paris?'},
                        {'role': 'tool_call', 'content': '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
                        {'role': 'tool_response', 'content': 'TOOLSAYS 21 degrees'},
                        {'role': 'assistant', 'content': 'It is 21 degrees in Paris.'}]}
    enc = t.encode(row)
    trained = trained_text(t, enc)
    assert not any(frag in trained for frag in ('TOOL', 'SAYS', 'OOL', 'AYS')), trained
    assert 'get_weather' in trained and 'It is 21 degrees in Paris.' in trained


def test_infer_after_a_react_observation_continues_the_open_turn(tok):
    t = get_template(tok, template='chatml', agent_template='react_en')
    t.set_mode('infer')
    row = {'tools': [{'name': 'f', 'description': 'd', 'parameters': {}}],
           'messages': [{'role': 'user', 'content': 'q'}, {'role': 'tool_call', 'content': '{"name": "f", "arguments": {}}'},
                        {'role': 'tool_response', 'content': 'RESULT'}]}
    prompt = tok.decode(t.encode(row)['input_ids'])
    assert prompt.endswith('Observation: RESULT\n'), prompt[-80:]
    assert prompt.count('<|im_start|>assistant') == 1  # no new turn opened, no end token closing this one
    hermes = get_template(tok, template='chatml', agent_template='hermes')
    hermes.set_mode('infer')
    assert tok.decode(hermes.encode(row)['input_ids']).endswith('</tool_response><|im_end|>\n<|im_start|>assistant\n')
