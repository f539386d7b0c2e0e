"""Loss scales through the real ChatML template and SmolLM2's tokenizer: per-token weights of the
documented ms-swift examples (react / hermes / qwen / ignore_empty_think), base strategies, the
per-message ``loss`` field, binary folding vs a ``loss_scale`` list, chaining, plugins, bad specs."""
from __future__ import annotations

import json
import re

import pytest

from megaswift.template import IGNORE_INDEX, TemplateError
from megaswift.template.loss_scale import (ConcatLossScale, ConfigLossScale, LossScale, LossScaleSpecError,
                                           get_loss_scale, loss_scales)
from megaswift.template.segments import Segment, glue, join_text
from megaswift.template.templates.chatml import ChatMLTemplate

REACT = 'Thought: x\nAction: search\nAction Input: {"q": 1}\nObservation: result\nFinal Answer: y'
HERMES = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
          'Done <tool_call>{"name": "g"}</tool_call> ok')
QWEN = '✿FUNCTION✿: f\n✿ARGS✿: {"a": 1}\n✿RESULT✿: 42\n✿RETURN✿: done'


@pytest.fixture(scope='module')
def tok(smollm2_dir):
    from megaswift.model import load_tokenizer
    return load_tokenizer(smollm2_dir)


class Encoded:
    """An encoded sample plus the rendered text and each token's character span."""

    def __init__(self, tok, spec, messages):
        self.template = ChatMLTemplate(tok, agent_template='hermes', loss_scale=spec)
        self.out = self.template.encode({'messages': messages})
        self.text = join_text(self.template.render(self.template.chat_messages({'messages': messages})[0]))
        enc = tok(self.text, add_special_tokens=False, return_offsets_mapping=True)
        assert list(enc['input_ids']) == self.out['input_ids']
        self.offsets = enc['offset_mapping']
        if 'loss_scale' in self.out:
            self.weights = self.out['loss_scale']
        else:
            self.weights = [0.0 if label == IGNORE_INDEX else 1.0 for label in self.out['labels']]

    def w(self, sub: str, occurrence: int = 0) -> set[float]:
        """Weights of the tokens lying wholly inside the ``occurrence``-th ``sub`` of the text."""
        start = -1
        for _ in range(occurrence + 1):
            start = self.text.index(sub, start + 1)
        end = start + len(sub)
        found = {w for (s, e), w in zip(self.offsets, self.weights) if start <= s and e <= end and e > s}
        assert found, f'no token inside {sub!r}'
        return found


def chat(*turns: str, system: str | None = None) -> list[dict]:
    msgs = [{'role': 'system', 'content': system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({'role': 'user' if i % 2 == 0 else 'assistant', 'content': t})
    return msgs


# ---------------------------------------------------------------------- documented built-ins
def test_react_keys_and_observation(tok):
    e = Encoded(tok, 'react', chat('Book a ticket', REACT))
    assert e.w('Thought:') == {1.0} and e.w(' x\n') == {1.0}
    assert e.w('Action:') == {2.0} and e.w(' search') == {2.0}
    assert e.w('Action Input:') == {2.0} and e.w(' {"q": 1}') == {2.0}
    assert e.w('Observation:') == {2.0}
    assert e.w(' result\n') == {0.0}  # the tool output is never trained
    assert e.w('Final Answer:') == {1.0} and e.w(' y') == {1.0}
    assert e.w('<|im_end|>', 1) == {1.0}
    assert e.w('Book a ticket') == {0.0} and e.w('<|im_start|>user') == {0.0}
    # non-binary: a loss_scale list aligned with input_ids; labels masked exactly where the weight is 0
    assert len(e.out['loss_scale']) == len(e.out['input_ids']) == len(e.out['labels'])
    assert [lab == IGNORE_INDEX for lab in e.out['labels']] == [w == 0 for w in e.weights]


def test_react_parts_exact():
    parts, weights = get_loss_scale('react').get_loss_scale(REACT)
    assert list(zip(parts, weights)) == [
        ('Thought:', 1.0), (' x\n', 1.0), ('Action:', 2.0), (' search\n', 2.0), ('Action Input:', 2.0),
        (' {"q": 1}\n', 2.0), ('Observation:', 2.0), (' result\n', 0.0), ('Final Answer:', 1.0), (' y', 1.0)]
    # text before the first key keeps weight 1
    assert get_loss_scale('react').get_loss_scale('Sure. Action: a') == (['Sure. ', 'Action:', ' a'], [1.0, 2.0, 2.0])


def test_hermes_tool_call_spans(tok):
    e = Encoded(tok, 'hermes', chat('Weather?', HERMES))
    assert e.w('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>') == {2.0}  # regex crosses newlines
    assert e.w('<tool_call>{"name": "g"}</tool_call>') == {2.0}
    assert e.w('Let me check.') == {1.0}
    assert e.w('\nDone ') == {1.0}  # non-greedy: text between two calls is plain
    assert e.w(' ok') == {1.0}
    assert 'loss_scale' in e.out


def test_hermes_plain_answer_is_binary(tok):
    e = Encoded(tok, 'hermes', chat('hi', 'Hello there!'))
    assert 'loss_scale' not in e.out and e.w('Hello there!') == {1.0}


def test_qwen_markers(tok):
    e = Encoded(tok, 'qwen', chat('q', QWEN))
    assert e.w(' f\n') == {2.0} and e.w(' {"a": 1}') == {2.0}
    assert e.w(' 42\n') == {0.0}
    assert e.w(' done') == {1.0}
    parts, weights = get_loss_scale('qwen').get_loss_scale(QWEN)
    assert list(zip(parts, weights)) == [
        ('✿FUNCTION✿:', 2.0), (' f\n', 2.0), ('✿ARGS✿:', 2.0), (' {"a": 1}\n', 2.0), ('✿RESULT✿:', 2.0),
        (' 42\n', 0.0), ('✿RETURN✿:', 1.0), (' done', 1.0)]


@pytest.mark.parametrize('think', ['<think>\n\n</think>\n\n', '<think></think>', '<think>\n</think>\n',
                                   '<think> \n\t </think>'])
def test_ignore_empty_think(tok, think):
    for spec in ('ignore_empty_think', 'default+ignore_empty_think'):
        e = Encoded(tok, spec, chat('2+2?', think + 'The answer is 4.'))
        assert e.w(think) == {0.0}
        assert e.w('The answer is 4.') == {1.0} and e.w('<|im_end|>', 1) == {1.0}
        assert 'loss_scale' not in e.out  # binary: folded into labels
        assert re.fullmatch(r'\[-100 \* \d+\]The answer is 4\.<\|im_end\|>\[-100 \* 1\]',
                            e.template.safe_decode(e.out['labels']))


def test_ignore_empty_think_keeps_real_thinking_and_every_turn(tok):
    msgs = chat('a', '<think>\nLet me add.\n</think>\n\n4', 'b', '<think>\n\n</think>\n\n5')
    e = Encoded(tok, 'ignore_empty_think', msgs)
    assert e.w('<think>\nLet me add.\n</think>') == {1.0} and e.w('4') == {1.0}
    assert e.w('<think>\n\n</think>') == {0.0} and e.w('5') == {1.0}
    # only a leading empty block is masked
    assert get_loss_scale('ignore_empty_think').get_loss_scale('ok <think></think>') == (['ok <think></think>'], [1.0])


# ---------------------------------------------------------------------- strategies and the loss field
def test_base_strategies(tok):
    msgs = chat('q1', 'a1', 'q2', 'a2', system='Be terse')
    d = Encoded(tok, 'default', msgs)
    assert d.w('a1') == {1.0} and d.w('a2') == {1.0} and d.w('q1') == {0.0} and d.w('Be terse') == {0.0}
    last = Encoded(tok, 'last_round', msgs)
    assert last.w('a1') == {0.0} and last.w('<|im_end|>', 2) == {0.0} and last.w('a2') == {1.0}
    assert last.w('<|im_end|>', 4) == {1.0}
    everything = Encoded(tok, 'all', msgs)
    assert set(everything.weights) == {1.0} and everything.out['labels'] == everything.out['input_ids']
    for e in (d, last, everything):
        assert set(e.out) == {'input_ids', 'labels'}  # binary: no loss_scale key
    assert get_loss_scale('last_round').base_strategy == 'last_round'
    assert type(get_loss_scale('all+base')) is LossScale


def test_last_round_covers_every_turn_after_the_last_user_message():
    segs = [glue('<u>'), Segment('q1', 'user', 0), Segment('a1', 'assistant', 1, trainable=True),
            Segment('q2', 'user', 2), Segment('call', 'assistant', 3, trainable=True), Segment('result', 'tool', 4),
            Segment('final', 'assistant', 5, trainable=True)]
    weights = dict(get_loss_scale('last_round').apply(segs))
    assert weights == {'<u>': 0.0, 'q1': 0.0, 'a1': 0.0, 'q2': 0.0, 'call': 1.0, 'result': 0.0, 'final': 1.0}
    assert dict(get_loss_scale('default').apply(segs))['a1'] == 1.0


def test_message_loss_field(tok):
    msgs = chat('q1', 'a1', 'q2', 'a2')
    msgs[1]['loss'] = False
    e = Encoded(tok, 'default', msgs)
    assert e.w('a1') == {0.0} and e.w('<|im_end|>', 1) == {0.0} and e.w('a2') == {1.0}
    assert 'loss_scale' not in e.out
    msgs[1]['loss'] = True  # overrides last_round
    e = Encoded(tok, 'last_round', msgs)
    assert e.w('a1') == {1.0} and e.w('a2') == {1.0}
    msgs[1]['loss'] = 0.5  # a number sets the turn's weight
    e = Encoded(tok, 'default', msgs)
    assert e.w('a1') == {0.5} and e.w('a2') == {1.0}
    assert len(e.out['loss_scale']) == len(e.out['input_ids'])
    # with a splitting scale the numbers multiply, and the observation stays at 0
    react = chat('q', REACT)
    react[1]['loss'] = 0.5
    e = Encoded(tok, 'react', react)
    assert e.w('Action:') == {1.0} and e.w('Thought:') == {0.5} and e.w(' result\n') == {0.0}
    react[1]['loss'] = 'yes'
    with pytest.raises(TemplateError, match=r"messages\[1\]\.loss"):
        Encoded(tok, 'react', react)


# ---------------------------------------------------------------------- chaining and plugins
class DigitsX3(LossScale):
    """Digits weigh 3."""
    is_binary = False

    def get_loss_scale(self, context, **kwargs):
        parts, weights = [], []
        for ch in context:
            w = 3.0 if ch.isdigit() else 1.0
            if weights and weights[-1] == w:
                parts[-1] += ch
            else:
                parts.append(ch)
                weights.append(w)
        return parts, weights


def test_chained_weights_multiply(tok, monkeypatch):
    monkeypatch.setitem(loss_scales, 'digits', DigitsX3)
    scale = get_loss_scale('last_round+react+digits')
    assert isinstance(scale, ConcatLossScale) and scale.base_strategy == 'last_round'
    assert [s.base_strategy for s in scale.scales] == ['last_round', 'last_round']
    e = Encoded(tok, 'react+digits', chat('q', 'Thought: 7\nAction Input: {"q": 1}\nObservation: 9\nFinal Answer: 5'))
    assert e.w('7') == {3.0}      # thought 1 x digit 3
    assert e.w('1') == {6.0}      # action input 2 x digit 3
    assert e.w('9') == {0.0}      # observation result 0 x 3
    assert e.w(' {"') == {2.0} and e.w('5') == {3.0}
    think = Encoded(tok, 'react+ignore_empty_think', chat('q', '<think>\n\n</think>\n\n' + REACT))
    assert think.w('<think>\n\n</think>') == {0.0} and think.w('Action:') == {2.0} and think.w(' result\n') == {0.0}


def test_custom_scale_registered_at_runtime(tok, monkeypatch):
    class Shout(LossScale):
        def get_loss_scale(self, context, *, segment=None, is_last_round=False, query=None, **kwargs):
            assert segment.trainable and query == 'say it'
            i = context.find('!')
            return ([context], [1.0]) if i < 0 else ([context[:i], context[i:]], [1.0, 4.0])

    monkeypatch.setitem(loss_scales, 'mine', Shout)
    e = Encoded(tok, 'last_round+mine', chat('say it', 'hey!'))
    assert e.w('hey') == {1.0} and e.w('!') == {4.0}
    assert e.w('<|im_end|>', 1) == {1.0}  # the end token is its own segment: no weight leaks onto it
    assert e.template.loss_scale.base_strategy == 'last_round'


def test_custom_scale_from_plugin_file(tok, tmp_path, monkeypatch):
    from megaswift.utils.plugins import import_external_plugins
    cfg = tmp_path / 'mine.json'
    cfg.write_text(json.dumps({'ANSWER:': [3.0, 1.5], r'\[\d+\]': 0.0}))
    plugin = tmp_path / 'my_scale_plugin.py'
    plugin.write_text(
        'from megaswift.template.loss_scale import ConfigLossScale, loss_scales\n'
        'class Mine(ConfigLossScale):\n'
        f'    loss_scale_config = {str(cfg)!r}\n'
        "loss_scales['mine_cfg'] = Mine\n")
    monkeypatch.setitem(loss_scales, 'mine_cfg', None)  # restored (removed) after the test
    import_external_plugins([str(plugin)])
    e = Encoded(tok, 'mine_cfg', chat('q', 'intro ANSWER: six [12] yes'))
    assert e.w('intro') == {1.0} and e.w('ANSWER:') == {3.0} and e.w(' six') == {1.5}
    assert e.w('[12]') == {0.0} and e.w(' yes') == {1.5}


# ---------------------------------------------------------------------- config semantics and errors
def test_config_literal_and_regex_semantics(tmp_path):
    scale = ConfigLossScale(config={'A:': [2.0, 3.0], 'AB:': [5.0, 0.5], '<x>.*?</x>': 0.0, r'^\s+': [4.0]})
    parts, weights = scale.get_loss_scale('  pre AB: b <x>\n</x> A: a')
    assert list(zip(parts, weights)) == [('  ', 4.0), ('pre ', 1.0), ('AB:', 5.0), (' b ', 0.5), ('<x>\n</x>', 0.0),
                                         (' ', 0.5), ('A:', 2.0), (' a', 3.0)]
    assert not scale.is_binary and ConfigLossScale(config={'x': 0.0}).is_binary
    path = tmp_path / 'c.json'
    path.write_text(json.dumps({'K:': [1.0, 0.0]}))
    assert ConfigLossScale('all', config=str(path)).get_loss_scale('a K: b') == (['a ', 'K:', ' b'], [1.0, 1.0, 0.0])


@pytest.mark.parametrize('cfg, match', [
    ({'(': 1.0}, 'not a valid regular expression'),
    ({'K:': [1.0, 2.0, 3.0]}, r'\[w_key, w_after\]'),
    ({'K:': [-1.0, 1.0]}, '>= 0'),
    ({'K:': 'two'}, '>= 0'),
    ({}, 'non-empty'),
])
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        ConfigLossScale(config=cfg)


def test_bad_specs(tok, monkeypatch):
    with pytest.raises(LossScaleSpecError, match="did you mean 'react'"):
        get_loss_scale('reactt')
    with pytest.raises(LossScaleSpecError, match="did you mean 'last_round'"):
        get_loss_scale('last_rounds+react')
    with pytest.raises(LossScaleSpecError, match='empty name'):
        get_loss_scale('react+')
    with pytest.raises(LossScaleSpecError, match='base strategy'):
        get_loss_scale('react+all')
    with pytest.raises(LossScaleSpecError, match='non-empty'):
        get_loss_scale('')
    with pytest.raises(ValueError, match="unknown loss_scale 'nope'"):
        ChatMLTemplate(tok, agent_template='hermes', loss_scale='default+nope')
    monkeypatch.setitem(loss_scales, 'broken', object)
    with pytest.raises(TypeError, match='LossScale subclass'):
        get_loss_scale('broken')
    with pytest.raises(ValueError, match='strategy'):
        LossScale('first_round')


def test_get_loss_scale_contract_is_checked(tok, monkeypatch):
    class Lossy(LossScale):
        def get_loss_scale(self, context, **kwargs):
            return [context[:1]], [1.0]

    class Negative(LossScale):
        def get_loss_scale(self, context, **kwargs):
            return [context], [-1.0]

    monkeypatch.setitem(loss_scales, 'lossy', Lossy)
    monkeypatch.setitem(loss_scales, 'negative', Negative)
    with pytest.raises(ValueError, match='join to its input'):
        Encoded(tok, 'lossy', chat('q', 'answer'))
    with pytest.raises(ValueError, match='>= 0'):
        Encoded(tok, 'react+negative', chat('q', 'answer'))
