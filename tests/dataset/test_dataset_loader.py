"""Every supported format normalises to messages; bad rows name file, line and field."""
import json

import pytest

from megaswift.dataset import DatasetError, load_dataset, row_id


def write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def test_formats_normalise_to_messages(tmp_path):
    rows = [
        {'messages': [{'role': 'system', 'content': 's'}, {'role': 'user', 'content': 'q'},
                      {'role': 'assistant', 'content': 'a'}], 'solution': 5},
        {'instruction': 'do', 'input': 'this', 'output': 'done'},
        {'conversations': [{'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'yo'}], 'system': 'S'},
        {'query': 'q2', 'response': 'r2', 'history': [['q1', 'r1']]},
        {'messages': [{'role': 'user', 'content': 'x'}], 'tools': '[{"name": "f"}]'},
    ]
    ds = load_dataset(write_jsonl(tmp_path / 'd.jsonl', rows))
    m = [r['messages'] for r in ds]
    assert m[0][-1] == {'role': 'assistant', 'content': 'a'} and ds[0]['solution'] == '5'
    assert m[1] == [{'role': 'user', 'content': 'do\nthis'}, {'role': 'assistant', 'content': 'done'}]
    assert m[2] == [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'hi'},
                    {'role': 'assistant', 'content': 'yo'}]
    assert [x['content'] for x in m[3]] == ['q1', 'r1', 'q2', 'r2']
    assert ds[4]['tools'] == [{'name': 'f'}]
    assert [str(s) for s in ds.sources] == [f'{tmp_path}/d.jsonl:{i}' for i in range(1, 6)]


def test_json_array_and_csv(tmp_path):
    (tmp_path / 'd.json').write_text('[\n  {"query": "a"},\n\n  {"query": "b",\n   "response": "c"}\n]\n')
    ds = load_dataset(str(tmp_path / 'd.json'))
    assert [str(s).rsplit(':', 1)[1] for s in ds.sources] == ['2', '4']
    (tmp_path / 'd.csv').write_text('instruction,output,solution\nadd 1 and 1,2,2\n"multi\nline",x,\n')
    ds = load_dataset(str(tmp_path / 'd.csv'))
    assert ds[0]['solution'] == '2' and 'solution' not in ds[1]
    assert ds[1]['messages'][0]['content'] == 'multi\nline'


def test_hf_datasets_dir(tmp_path):
    import datasets
    datasets.Dataset.from_list([{'query': 'a', 'response': 'b'}, {'query': 'c'}]).save_to_disk(str(tmp_path / 'hf'))
    ds = load_dataset(str(tmp_path / 'hf'))
    assert len(ds) == 2 and str(ds.sources[1]).endswith('[row 1]')


def test_subsample_is_seeded_and_repeats(tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'query': str(i)} for i in range(10)])
    a = [r['messages'][0]['content'] for r in load_dataset(f'{path}#4', seed=1)]
    b = [r['messages'][0]['content'] for r in load_dataset(f'{path}#4', seed=1)]
    c = [r['messages'][0]['content'] for r in load_dataset(f'{path}#4', seed=2)]
    assert a == b and len(set(a)) == 4 and a != c
    assert len(load_dataset(f'{path}#23')) == 23


@pytest.mark.parametrize('line, match', [
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"d.jsonl:2: field 'messages\[0\].role': unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"d.jsonl:2: field 'messages\[0\].content': must be a string"),
    ('{"messages": []}', r"d.jsonl:2: field 'messages': must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "x"}], "tools": "{not json"}', r"d.jsonl:2: field 'tools'"),
    ('{"question": "x"}', r"d.jsonl:2: no conversation found"),
    ('{"messages": [', r'd.jsonl:2: invalid JSON'),
    ('[1, 2]', r'd.jsonl:2: a row must be a JSON object'),
    ('{"conversations": [{"from": "robot", "value": "x"}]}', r"field 'conversations\[0\].from'"),
])
def test_bad_rows_point_at_file_line_field(tmp_path, line, match):
    (tmp_path / 'd.jsonl').write_text('{"query": "fine"}\n' + line + '\n')
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(tmp_path / 'd.jsonl'))


def test_bad_json_array_item_line(tmp_path):
    (tmp_path / 'd.json').write_text('[\n {"query": "a"},\n {"messages": [{"role": "x", "content": ""}]}\n]')
    with pytest.raises(DatasetError, match=r'd.json:3: field'):
        load_dataset(str(tmp_path / 'd.json'))


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_dataset(str(tmp_path / 'nope.jsonl'))
    (tmp_path / 'd.txt').write_text('x')
    with pytest.raises(DatasetError, match="unsupported file type '.txt'"):
        load_dataset(str(tmp_path / 'd.txt'))


def test_row_id_is_stable_and_content_based():
    a = {'messages': [{'role': 'user', 'content': 'q'}], 'solution': '1'}
    assert row_id(a) == row_id(dict(reversed(list(a.items()))))
    assert row_id(a) != row_id({**a, 'solution': '2'})
