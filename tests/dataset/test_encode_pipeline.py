"""encode_dataset: parallel == serial, cache hits/invalidation, file:line errors, 'delete' counting."""
import json
import logging
import random

import numpy as np
import pytest
import torch

from megaswift.dataset import DatasetError, load_dataset
from megaswift.dataset import encode as encode_mod
from megaswift.dataset.encode import AllRowsSkipped, encode_dataset, load_cached_lengths
from megaswift.template import get_template
from megaswift.template.packing import collate_packed


@pytest.fixture(scope='module')
def tok(smollm2_dir):
    from megaswift.model import load_tokenizer
    return load_tokenizer(smollm2_dir)


def chat_rows(n=40, seed=0):
    rng = random.Random(seed)
    words = 'the model packs every sample into rows of tokens without mixing them at all'.split()
    rows = []
    for i in range(n):
        msgs = [{'role': 'system', 'content': 'Be brief.'}] if i % 7 == 0 else []
        for t in range(rng.randint(1, 3)):
            msgs.append({'role': 'user', 'content': ' '.join(rng.choices(words, k=rng.randint(2, 12)))})
            msgs.append({'role': 'assistant', 'content': ' '.join(rng.choices(words, k=rng.randint(1, 60)))})
        if i % 9 == 4:
            msgs[-1]['loss'] = 0.5  # a non-binary loss scale for this sample
        rows.append({'messages': msgs})
    return rows


def write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def same(a, b):
    return (len(a) == len(b) and a.num_rows == b.num_rows and np.array_equal(a.row_indices, b.row_indices)
            and np.array_equal(a.lengths, b.lengths) and sorted(a.values) == sorted(b.values)
            and a.scalars == b.scalars
            and all(np.array_equal(a.values[k], b.values[k]) and np.array_equal(a.lens[k], b.lens[k]) for k in a.values)
            and [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))])


def test_num_proc_2_equals_num_proc_1_and_template(tmp_path, tok, monkeypatch):
    ds = load_dataset(write_jsonl(tmp_path / 'd.jsonl', chat_rows()))
    template = get_template(tok)
    monkeypatch.setattr(encode_mod, 'CHUNK_ROWS', 7)  # several chunks in both paths
    one = encode_dataset(ds, template, num_proc=1, use_cache=False)
    two = encode_dataset(ds, template, num_proc=2, use_cache=False)
    assert same(one, two) and len(one) == len(ds) and one.num_skipped == 0
    direct = [template.encode(r) for r in ds]
    assert [one[i] for i in range(len(one))] == direct
    assert one.lengths.tolist() == [len(d['input_ids']) for d in direct]
    with_scale = [i for i, d in enumerate(direct) if 'loss_scale' in d]
    assert with_scale and with_scale == [i for i in range(len(one)) if 'loss_scale' in one[i]]
    bins = one.pack(512)
    batch = collate_packed([one.arrays(i) for i in bins[0]], 512, pad_to_multiple_of=8)
    assert batch.num_tokens % 8 == 0 and batch.seq_lens == [int(one.lengths[i]) for i in bins[0]]


def test_cache_hit_and_invalidation(tmp_path, tok):
    path = write_jsonl(tmp_path / 'd.jsonl', chat_rows(20))
    ds = load_dataset(path)
    cache = tmp_path / 'cache'
    first = encode_dataset(ds, get_template(tok), cache_dir=cache)
    assert not first.from_cache and first.cache_path.startswith(str(cache))
    hit = encode_dataset(ds, get_template(tok), cache_dir=cache, num_proc=2)
    assert hit.from_cache and hit.cache_path == first.cache_path and same(first, hit)
    assert load_cached_lengths(hit.cache_path).tolist() == first.lengths.tolist()
    variants = [dict(max_length=4096), dict(system='Another system.'), dict(loss_scale='last_round'),
                dict(max_length=4096, truncation_strategy='left')]
    paths = {first.cache_path}
    for kw in variants:
        enc = encode_dataset(ds, get_template(tok, **kw), cache_dir=cache)
        assert not enc.from_cache and enc.cache_path not in paths, kw
        paths.add(enc.cache_path)
    infer = get_template(tok)
    infer.set_mode('infer')
    enc = encode_dataset(ds, infer, cache_dir=cache)
    assert not enc.from_cache and 'labels' not in enc[0] and enc.lengths[0] == len(enc[0]['input_ids'])
    rows = chat_rows(20)
    rows[5]['messages'][-1]['content'] += ' changed'
    changed = encode_dataset(load_dataset(write_jsonl(tmp_path / 'd.jsonl', rows)), get_template(tok), cache_dir=cache)
    assert not changed.from_cache and changed.cache_path not in paths
    assert encode_dataset(ds, get_template(tok), cache_dir=cache).from_cache  # the original entry is still valid


def test_default_cache_root_and_corrupt_entry(tmp_path, tok, monkeypatch):
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'root'))
    ds = load_dataset(write_jsonl(tmp_path / 'd.jsonl', chat_rows(5)))
    enc = encode_dataset(ds, get_template(tok))
    assert enc.cache_path.startswith(str(tmp_path / 'root' / 'encoded'))
    (tmp_path / 'root' / 'encoded').joinpath(enc.cache_path.rsplit('/', 1)[1], 'input_ids.values.npy').unlink()
    again = encode_dataset(ds, get_template(tok))
    assert not again.from_cache and same(enc, again)


@pytest.mark.parametrize('num_proc', [1, 2])
def test_bad_row_reports_file_line_and_field(tmp_path, tok, num_proc):
    rows = chat_rows(12)
    rows[8] = {'messages': [{'role': 'user', 'content': 'no answer here'}]}
    path = write_jsonl(tmp_path / 'bad.jsonl', rows)
    with pytest.raises(DatasetError) as e:
        encode_dataset(load_dataset(path), get_template(tok), num_proc=num_proc, use_cache=False)
    assert str(e.value) == f"{path}:9: field 'messages': has no assistant turn to train on"
    assert e.value.field == 'messages'


def test_delete_strategy_skips_and_counts(tmp_path, tok, caplog):
    ds = load_dataset(write_jsonl(tmp_path / 'd.jsonl', chat_rows(30)))
    full = encode_dataset(ds, get_template(tok), use_cache=False)
    limit = int(np.median(full.lengths))
    expected_kept = [i for i in range(len(ds)) if full.lengths[i] <= limit]
    for num_proc in (1, 2):
        with caplog.at_level(logging.WARNING, logger='megaswift.dataset.encode'):
            caplog.clear()
            enc = encode_dataset(ds, get_template(tok, max_length=limit), num_proc=num_proc, cache_dir=tmp_path / 'c')
        skipped = len(ds) - len(expected_kept)
        assert enc.row_indices.tolist() == expected_kept and enc.num_skipped == skipped
        assert f'skipped {skipped} of {len(ds)} rows longer than max_length {limit}' in caplog.text
        assert [enc[i] for i in range(len(enc))] == [full[i] for i in expected_kept]
    assert enc.from_cache  # the second pass hit the cache and still reported the skipped rows
    with pytest.raises(AllRowsSkipped, match=f'all {len(ds)} rows are longer than max_length 5'):
        encode_dataset(ds, get_template(tok, max_length=5), cache_dir=tmp_path / 'c')


class _Exploding:
    """A template whose encode fails with a non-template error on one row (picklable: module level)."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.max_length = inner, inner.tokenizer, inner.max_length

    def encode(self, row):
        if 'boom' in row['messages'][0]['content']:
            raise KeyError('boom')
        return self.inner.encode(row)


@pytest.mark.parametrize('num_proc', [1, 2])
def test_unexpected_error_keeps_its_type_and_names_the_row(tmp_path, tok, num_proc):
    rows = chat_rows(6)
    rows[3]['messages'][0]['content'] = 'boom'
    path = write_jsonl(tmp_path / 'd.jsonl', rows)
    with pytest.raises(KeyError) as e:
        encode_dataset(load_dataset(path), _Exploding(get_template(tok)), num_proc=num_proc, use_cache=False)
    assert e.value.__notes__ == [f'while encoding row 3 ({path}:4)']


class PreferenceEncoder:
    """A chat template plus the columns a preference objective adds: numbers per sample and another sequence."""

    def __init__(self, template):
        self.template, self.tokenizer = template, template.tokenizer

    def encode(self, row):
        out = self.template.encode(row)
        n = len(out['input_ids'])
        return out | {'label': n % 2 == 0, 'margin': n / 10, 'rejected_input_ids': out['input_ids'][:3]}


def test_extra_columns_survive_encoding_processes_and_the_cache(tmp_path, tok, monkeypatch):
    from megaswift.template.collator import Collator
    ds = load_dataset(write_jsonl(tmp_path / 'd.jsonl', chat_rows(20)))
    encoder = PreferenceEncoder(get_template(tok))
    monkeypatch.setattr(encode_mod, 'CHUNK_ROWS', 7)
    first = encode_dataset(ds, encoder, cache_dir=tmp_path / 'cache')
    two = encode_dataset(ds, encoder, num_proc=2, use_cache=False)
    hit = encode_dataset(ds, encoder, cache_dir=tmp_path / 'cache')
    assert hit.from_cache and same(first, two) and same(first, hit)
    direct = [encoder.encode(r) for r in ds]
    for enc in (first, two, hit):
        assert enc.scalars == {'label', 'margin'}
        assert [enc[i] for i in range(len(enc))] == direct
        assert type(enc[0]['label']) is bool and enc.arrays(0)['margin'].shape == ()
    batch = Collator(hit, [[0], [1, 2]], columns=('label', 'margin'))([0, 1])
    assert batch['label'].dtype == torch.bool and batch['label'].tolist() == [d['label'] for d in direct[:3]]
    assert batch['margin'].tolist() == pytest.approx([d['margin'] for d in direct[:3]])
