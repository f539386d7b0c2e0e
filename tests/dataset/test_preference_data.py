"""Preference datasets end to end: jsonl -> load_rows -> encode (errors name file:line and the field before anything
trains), add_kl_responses, and the lengths packing sees (all of a sample's sequences)."""
import json

import numpy as np
import pytest

from megaswift.dataset import Dataset, DatasetError, RowSource, add_kl_responses, load_rows
from megaswift.dataset.encode import encode_dataset, encode_on_rank0_first
from testing_utils import template_in_mode as template


def turn(role, content):
    return {'role': role, 'content': content}


def pair(q='What is 2 + 2?', chosen='Four.', rejected='Five.', **extra):
    return {'messages': [turn('user', q), turn('assistant', chosen)], 'rejected_response': rejected, **extra}


def kto_row(q='Name a colour.', answer='Blue.', label=True, **extra):
    return {'messages': [turn('user', q), turn('assistant', answer)], 'label': label, **extra}


def write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


BAD_PAIRS = [
    ({'messages': [turn('user', 'q'), turn('assistant', 'a')]}, 'rejected_response'),
    (pair(rejected_messages=[turn('user', 'q'), turn('assistant', 'b')]), 'rejected_messages'),
    (pair(rejected=''), 'rejected_response'),
    (pair(rejected=7), 'rejected_response'),
    ({'messages': [turn('user', 'q'), turn('assistant', 'a')], 'rejected_messages': [turn('user', 'q')]},
     'rejected_messages'),
    ({'messages': [turn('user', 'q'), turn('assistant', 'a')], 'rejected_messages': 'not json'}, 'rejected_messages'),
    ({'messages': [turn('user', 'q'), turn('assistant', 'a')],
      'rejected_messages': [turn('user', 'q'), turn('critic', 'b')]}, 'rejected_messages[1].role'),
    ({'messages': [turn('user', 'q')], 'rejected_response': 'b'}, 'messages'),
    (pair(margin='wide'), 'margin'),
]


@pytest.mark.parametrize('bad, field', BAD_PAIRS)
def test_bad_pair_rows_fail_with_file_line_and_field(tmp_path, tok, bad, field):
    path = write_jsonl(tmp_path / 'pairs.jsonl', [pair(), pair('Capital of France?', 'Paris.', 'Rome.'), bad, pair()])
    with pytest.raises(DatasetError) as err:
        encode_dataset(load_rows([path], seed=0, chat=True), template(tok, 'rlhf'), use_cache=False)
    assert str(err.value).startswith(f"{path}:3: field '{field}': ") and err.value.field == field


@pytest.mark.parametrize('bad, field', [
    (kto_row(label=None), 'label'),
    ({'messages': [turn('user', 'q'), turn('assistant', 'a')]}, 'label'),
    (kto_row(label=3), 'label'),
    (kto_row(label='true'), 'label'),
    ({'messages': [turn('user', 'q')], 'label': True}, 'messages'),
])
def test_bad_kto_rows_fail_with_file_line_and_field(tmp_path, tok, monkeypatch, bad, field):
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    path = write_jsonl(tmp_path / 'kto.jsonl', [kto_row(), kto_row(label=False), bad])
    dataset = add_kl_responses(load_rows([path], seed=0, chat=True))
    with pytest.raises(DatasetError) as err:
        encode_on_rank0_first(dataset, template(tok, 'kto'), num_proc=1, desc='kto')
    assert str(err.value).startswith(f"{path}:3: field '{field}': ")


def test_kto_without_kl_responses_names_the_missing_column(tmp_path, tok):
    path = write_jsonl(tmp_path / 'kto.jsonl', [kto_row(), kto_row(label=False)])
    with pytest.raises(DatasetError, match=r"kto\.jsonl:1: field 'kl_response': .*add_kl_responses"):
        encode_dataset(load_rows([path], seed=0, chat=True), template(tok, 'kto'), use_cache=False)


def test_add_kl_responses():
    rows = [kto_row(answer=f'answer {i}') for i in range(4)]
    rows[2] = {'messages': [turn('user', 'no answer')], 'label': True}   # no assistant turn: lends nothing
    rows.insert(1, {'label': True})                                      # no messages at all
    sources = [RowSource('d.jsonl', i + 1) for i in range(len(rows))]
    out = add_kl_responses(Dataset(rows, sources))
    assert out.sources == sources and out is not None and rows[0].get('kl_response') is None  # inputs untouched
    assert [r.get('kl_response') for r in out.rows] == ['answer 1', 'answer 1', 'answer 3', 'answer 3', 'answer 0']
    assert all({k: v for k, v in r.items() if k != 'kl_response'} == s for r, s in zip(out.rows, rows))
    assert add_kl_responses(Dataset([kto_row()], sources[:1])).rows[0]['kl_response'] == 'Blue.'
    multi = {'messages': [turn('user', 'a'), turn('assistant', 'first'), turn('user', 'b'), turn('assistant', 'last'),
                          turn('user', 'c')]}
    assert add_kl_responses(Dataset([kto_row(), multi], sources[:2])).rows[0]['kl_response'] == 'last'
    none = Dataset([{'label': True}, {'messages': 'broken'}], sources[:2])
    assert add_kl_responses(none).rows == none.rows
    assert add_kl_responses(Dataset()).rows == []


def test_kto_dataset_encodes_both_sequences_and_counts_them(tmp_path, tok):
    rows = [kto_row('Name a colour.', 'Blue.', True), kto_row('Name a fruit.', 'A chair, clearly.', 0),
            kto_row('Name a planet.', 'Mars.', 1)]
    path = write_jsonl(tmp_path / 'kto.jsonl', rows)
    enc = encode_dataset(add_kl_responses(load_rows([path], seed=0, chat=True)), template(tok, 'kto'),
                         use_cache=False)
    assert enc.scalars == {'label'} and [enc[i]['label'] for i in range(3)] == [1, 0, 1]
    train = template(tok, 'train')
    for i in range(3):
        kl_answer = rows[(i + 1) % 3]['messages'][-1]['content']
        expected = train.encode({'messages': rows[i]['messages'][:-1] + [turn('assistant', kl_answer)]})
        assert enc[i]['kl_input_ids'] == expected['input_ids'] and enc[i]['kl_labels'] == expected['labels']
    assert enc.lengths.tolist() == [len(enc[i]['input_ids']) + len(enc[i]['kl_input_ids']) for i in range(3)]


def test_pair_dataset_lengths_margins_and_deleted_pairs(tmp_path, tok):
    long_answer = ' '.join(['five'] * 60)
    rows = [pair(margin=0.5), pair('Capital of France?', 'Paris.', long_answer), pair(chosen=long_answer),
            {'messages': [turn('user', 'Why?'), turn('assistant', 'Because.')],
             'rejected_messages': [turn('user', 'Why?'), turn('assistant', 'No.')], 'margin': 3}]
    path = write_jsonl(tmp_path / 'pairs.jsonl', rows)
    short = max(len(template(tok, 'train').encode(r)['input_ids']) for r in (pair(), rows[3]))
    limit = short + 10  # the short answers fit, the 60-word one does not
    enc = encode_dataset(load_rows([path], seed=0, chat=True), template(tok, 'rlhf', max_length=limit),
                         use_cache=False)
    assert enc.num_skipped == 2 and enc.row_indices.tolist() == [0, 3]  # either side too long: the pair goes
    assert enc.scalars == {'margin'} and [enc[i]['margin'] for i in range(2)] == [0.5, 3.0]
    assert enc.lengths.tolist() == [len(enc[i]['chosen_input_ids']) + len(enc[i]['rejected_input_ids'])
                                    for i in range(2)]
    again = encode_dataset(load_rows([path], seed=0, chat=True), template(tok, 'rlhf', max_length=limit), num_proc=2,
                           use_cache=False)
    assert all(np.array_equal(enc.values[k], again.values[k]) for k in enc.values) and again.scalars == enc.scalars
