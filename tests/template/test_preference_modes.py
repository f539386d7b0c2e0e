"""The template's preference modes: 'rlhf' pairs (rejected_response or rejected_messages, margin) and 'kto'
(label, kl_response), on the real SmolLM2 tokenizer and chat template."""
import pytest

from megaswift.template import MaxLengthExceeded, TemplateError
from testing_utils import template_in_mode as template

PROMPT = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is 2 + 2?'}]
CHOSEN = {'role': 'assistant', 'content': 'It is 4.'}
REJECTED = 'It is 5, I think.'


def trained_text(tok, labels):
    return tok.decode([t for t in labels if t >= 0])


def test_pair_from_rejected_response_or_rejected_messages(tok):
    rlhf, train = template(tok, 'rlhf'), template(tok, 'train')
    by_response = rlhf.encode({'messages': PROMPT + [CHOSEN], 'rejected_response': REJECTED})
    by_messages = rlhf.encode({'messages': PROMPT + [CHOSEN],
                               'rejected_messages': PROMPT + [{'role': 'assistant', 'content': REJECTED}]})
    assert by_response == by_messages
    assert sorted(by_response) == ['chosen_input_ids', 'chosen_labels', 'margin', 'rejected_input_ids',
                                   'rejected_labels']
    chosen = train.encode({'messages': PROMPT + [CHOSEN]})
    rejected = train.encode({'messages': PROMPT + [{'role': 'assistant', 'content': REJECTED}]})
    assert by_response['chosen_input_ids'] == chosen['input_ids'] and by_response['chosen_labels'] == chosen['labels']
    assert by_response['rejected_input_ids'] == rejected['input_ids']
    assert trained_text(tok, by_response['rejected_labels']) == REJECTED + '<|im_end|>'
    assert by_response['margin'] == 0.0 and type(by_response['margin']) is float


def test_rejected_messages_bring_their_own_prompt_and_margin(tok):
    rlhf = template(tok, 'rlhf')
    other = [{'role': 'user', 'content': 'And 3 + 3?'}, {'role': 'assistant', 'content': 'Seven.', 'loss': 0.5}]
    enc = rlhf.encode({'messages': PROMPT + [CHOSEN], 'rejected_messages': other, 'margin': 2})
    assert enc['margin'] == 2.0 and type(enc['margin']) is float
    text = tok.decode(enc['rejected_input_ids'])
    assert 'And 3 + 3?' in text and 'What is 2 + 2?' not in text
    assert set(enc['rejected_loss_scale']) == {0.0, 0.5} and 'chosen_loss_scale' not in enc


def test_rows_written_by_megaswift_sample_encode_as_pairs(tok):
    from megaswift.sampling import build_prompt, output_row
    source = {'messages': PROMPT + [CHOSEN], 'solution': '4', 'id': 'row-7', 'choices': ['4', '5']}
    prompt = build_prompt(source, 'math.jsonl:3')
    row = output_row(prompt, 'Four: 2 + 2 = 4.', rejected='Five.')
    row |= {'rewards': {'accuracy': [1.0, 0.0]}, 'reward': 1.0, 'choices': [{'text': 'x'}]}
    enc = template(tok, 'rlhf').encode(row)
    assert trained_text(tok, enc['chosen_labels']) == 'Four: 2 + 2 = 4.<|im_end|>'
    assert trained_text(tok, enc['rejected_labels']) == 'Five.<|im_end|>'
    assert enc['margin'] == 0.0


@pytest.mark.parametrize('row, field', [
    ({'messages': PROMPT + [CHOSEN]}, 'rejected_response'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_response': REJECTED,
      'rejected_messages': PROMPT + [{'role': 'assistant', 'content': REJECTED}]}, 'rejected_messages'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_response': '  '}, 'rejected_response'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_response': ['no']}, 'rejected_response'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_messages': PROMPT}, 'rejected_messages'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_messages': PROMPT + [{'role': 'assistant', 'content': ''}]},
     'rejected_messages[2].content'),
    ({'messages': PROMPT, 'rejected_response': REJECTED}, 'messages'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_response': REJECTED, 'margin': 'big'}, 'margin'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_response': REJECTED, 'margin': True}, 'margin'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_response': REJECTED, 'margin': float('nan')}, 'margin'),
    ({'messages': PROMPT + [CHOSEN], 'rejected_messages': [{'role': 'boss', 'content': 'x'}, CHOSEN]},
     'rejected_messages[0].role'),
])
def test_bad_pairs_name_the_field(tok, row, field):
    with pytest.raises(TemplateError) as err:
        template(tok, 'rlhf').encode(row)
    assert err.value.field == field and str(err.value).startswith(f"field '{field}': ")


def test_a_pair_is_deleted_when_either_side_is_too_long(tok):
    short, long_answer = 'Four.', ' '.join(['four'] * 40)
    n = len(template(tok, 'train').encode({'messages': PROMPT + [{'role': 'assistant', 'content': short}]})[
        'input_ids'])
    rlhf = template(tok, 'rlhf', max_length=n + 5)
    assert rlhf.encode({'messages': PROMPT + [{'role': 'assistant', 'content': short}], 'rejected_response': 'Five.'})
    for chosen, rejected in ((short, long_answer), (long_answer, short)):
        with pytest.raises(MaxLengthExceeded):
            rlhf.encode({'messages': PROMPT + [{'role': 'assistant', 'content': chosen}],
                         'rejected_response': rejected})
    strict = template(tok, 'rlhf', max_length=n + 5, truncation_strategy='error')
    with pytest.raises(TemplateError, match='exceed max_length') as err:
        strict.encode({'messages': PROMPT + [{'role': 'assistant', 'content': short}],
                       'rejected_response': long_answer})
    assert err.value.field == 'rejected_response' and not isinstance(err.value, MaxLengthExceeded)
    left = template(tok, 'rlhf', max_length=n, truncation_strategy='left').encode(
        {'messages': PROMPT + [{'role': 'assistant', 'content': short}], 'rejected_response': long_answer})
    assert len(left['rejected_input_ids']) == n and len(left['chosen_input_ids']) == n


def test_kto_rows(tok):
    kto, train = template(tok, 'kto'), template(tok, 'train')
    for label, expected in ((True, 1), (False, 0), (1, 1), (0, 0)):
        enc = kto.encode({'messages': PROMPT + [CHOSEN], 'label': label, 'kl_response': 'Blue.'})
        assert enc['label'] == expected and type(enc['label']) is int
    assert sorted(enc) == ['input_ids', 'kl_input_ids', 'kl_labels', 'label', 'labels']
    own = train.encode({'messages': PROMPT + [CHOSEN]})
    kl = train.encode({'messages': PROMPT + [{'role': 'assistant', 'content': 'Blue.'}]})
    assert enc['input_ids'] == own['input_ids'] and enc['labels'] == own['labels']
    assert enc['kl_input_ids'] == kl['input_ids'] and enc['kl_labels'] == kl['labels']
    weighted = kto.encode({'messages': PROMPT + [{**CHOSEN, 'loss': 0.5}], 'label': False, 'kl_response': 'Blue.'})
    assert set(weighted['loss_scale']) == {0.0, 0.5} and 'kl_loss_scale' not in weighted


@pytest.mark.parametrize('row, field', [
    ({'messages': PROMPT + [CHOSEN], 'kl_response': 'x'}, 'label'),
    ({'messages': PROMPT + [CHOSEN], 'kl_response': 'x', 'label': 2}, 'label'),
    ({'messages': PROMPT + [CHOSEN], 'kl_response': 'x', 'label': 'yes'}, 'label'),
    ({'messages': PROMPT + [CHOSEN], 'kl_response': 'x', 'label': 1.0}, 'label'),
    ({'messages': PROMPT + [CHOSEN], 'label': True}, 'kl_response'),
    ({'messages': PROMPT + [CHOSEN], 'label': True, 'kl_response': 3}, 'kl_response'),
    ({'messages': PROMPT, 'label': True, 'kl_response': 'x'}, 'messages'),
])
def test_bad_kto_rows_name_the_field(tok, row, field):
    with pytest.raises(TemplateError) as err:
        template(tok, 'kto').encode(row)
    assert err.value.field == field


def test_modes_list_and_train_mode_unchanged(tok):
    from megaswift.template.base import MODES
    assert MODES == ('train', 'infer', 'rlhf', 'kto')
    row = {'messages': PROMPT + [CHOSEN], 'rejected_response': REJECTED, 'label': True, 'margin': 1.5}
    assert template(tok, 'train').encode(row) == template(tok, 'train').encode({'messages': PROMPT + [CHOSEN]})
    with pytest.raises(ValueError, match='mode must be one of'):
        template(tok, 'dpo')
