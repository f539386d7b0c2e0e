"""Bin packing and padding-free collation: no sample is mixed, split, dropped or duplicated."""
import dataclasses
import importlib.util
import time

import numpy as np
import pytest
import torch

from megaswift.template.packing import (PackedSeqParamsFallback, PackingError, collate_packed, cu_seqlens_from_position_ids,
                                        pack, pack_best_fit_decreasing, pack_in_order, packed_seq_params,
                                        packing_efficiency, pad_collate, padding_free_collate, padding_multiple)

STRATEGIES = [pack_best_fit_decreasing, pack_in_order]


def random_cases(n_cases=150, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        L = int(rng.integers(4, 300))
        n = int(rng.integers(1, 80))
        kind = rng.integers(3)
        if kind == 0:
            lens = rng.integers(1, L + 1, n)
        elif kind == 1:  # mostly short, a long tail (chat-like)
            lens = np.clip(rng.lognormal(np.log(L / 6), 0.9, n).astype(int), 1, L)
        else:            # many ties
            lens = rng.choice([1, L // 3 or 1, L // 2 or 1, L], n)
        yield lens.tolist(), L


def reference_bfd(lengths, L):
    """Quadratic best-fit decreasing with the same tie rules (longer first, then lower index; tightest bin, then lower bin)."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(L - lengths[i])
    return [sorted(b) for b in bins]


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_every_sample_once_and_bins_fit(strategy):
    for lens, L in random_cases():
        bins = strategy(lens, L)
        flat = [i for b in bins for i in b]
        assert sorted(flat) == list(range(len(lens)))
        assert all(b and sum(lens[i] for i in b) <= L for b in bins)
        assert strategy(lens, L) == bins  # deterministic
        assert strategy(np.asarray(lens), L) == bins


def test_bfd_matches_reference_and_in_order_keeps_order():
    for lens, L in random_cases(seed=1):
        assert pack_best_fit_decreasing(lens, L) == reference_bfd(lens, L)
        bins = pack_in_order(lens, L)
        assert [i for b in bins for i in b] == list(range(len(lens)))
        for a, b in zip(bins, bins[1:]):  # next-fit: a new bin opens only when the next sample does not fit
            assert sum(lens[i] for i in a) + lens[b[0]] > L


def test_bfd_at_least_as_efficient_as_in_order():
    total_bfd = total_order = 0
    for lens, L in random_cases(seed=2):
        bfd, order = pack_best_fit_decreasing(lens, L), pack_in_order(lens, L)
        total_bfd, total_order = total_bfd + len(bfd), total_order + len(order)
        eff = lambda bins: packing_efficiency([[lens[i] for i in b] for b in bins], L)  # noqa: E731
        if len(lens) >= 40:
            assert eff(bfd) >= eff(order)
    assert total_bfd < total_order
    rng = np.random.default_rng(3)
    lens = np.clip(rng.lognormal(5.5, 1.0, 5000).astype(int), 1, 1024)
    effs = [packing_efficiency([lens[b] for b in pack(lens, 1024, s)], 1024) for s in ('bfd', 'in_order')]
    assert effs[0] > 0.99 and effs[0] > effs[1]


def test_too_long_sample_names_index_and_lengths():
    with pytest.raises(PackingError, match='packing_length 512: sample 2 has 600 tokens'):
        pack_best_fit_decreasing([10, 20, 600, 30], 512)
    with pytest.raises(PackingError, match='sample 1 has 0 tokens'):
        pack_in_order([3, 0], 8)
    with pytest.raises(ValueError, match='unknown packing strategy'):
        pack([1], 4, 'ffd')
    assert pack_best_fit_decreasing([], 8) == [] and pack_in_order([], 8) == []


def test_bfd_is_fast():
    lens = np.clip(np.random.default_rng(0).lognormal(5.5, 1.0, 200_000).astype(int), 1, 2048)
    t0 = time.perf_counter()
    bins = pack_best_fit_decreasing(lens, 2048)
    assert time.perf_counter() - t0 < 10  # ~0.15 s on a quiet 2-core machine
    assert sum(len(b) for b in bins) == lens.size


def make_samples(lens, rng, with_scale=()):
    out = []
    for k, n in enumerate(lens):
        ids = rng.integers(3, 1000, n)
        labels = np.where(rng.random(n) < 0.5, ids, -100)
        s = {'input_ids': ids.tolist(), 'labels': labels.tolist()}
        if k in with_scale:
            s['loss_scale'] = np.round(rng.random(n) * 2, 2).tolist()
        out.append(s)
    return out


def check_row(batch, samples, multiple=1):
    T = batch.num_tokens
    lens = [len(s['input_ids']) for s in samples]
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == T and T % multiple == 0
    assert np.array_equal(cu.numpy(), cu_seqlens_from_position_ids(batch.position_ids))
    assert np.diff(cu.numpy())[:len(lens)].tolist() == lens == batch.seq_lens
    assert batch.num_pad == T - sum(lens) and len(cu) == len(lens) + 1 + (batch.num_pad > 0)
    assert batch.max_seqlen == int(np.diff(cu.numpy()).max()) and isinstance(batch.max_seqlen, int)
    ids, labels, pos = (t[0].tolist() for t in (batch.input_ids, batch.labels, batch.position_ids))
    for k, s in enumerate(samples):
        a, b = int(cu[k]), int(cu[k + 1])
        assert ids[a:b] == s['input_ids']  # contiguous and intact
        assert labels[a] == -100 and labels[a + 1:b] == s['labels'][1:]
        assert pos[a:b] == list(range(b - a))
    if batch.num_pad:
        assert labels[-batch.num_pad:] == [-100] * batch.num_pad
        assert pos[-batch.num_pad:] == list(range(batch.num_pad))


def test_collated_bins_never_mix_samples():
    rng = np.random.default_rng(4)
    for lens, L in random_cases(n_cases=60, seed=5):
        samples = make_samples(lens, rng)
        multiple = int(rng.choice([1, 2, 4, 8]))
        for strategy in STRATEGIES:
            for b in strategy(lens, L):
                batch = collate_packed([samples[i] for i in b], L, pad_to_multiple_of=multiple)
                check_row(batch, [samples[i] for i in b], multiple)
                assert batch.loss_scale is None
        batch = padding_free_collate(samples, pad_to_multiple_of=multiple, pad_token_id=7)
        check_row(batch, samples, multiple)
        if batch.num_pad:
            assert batch.input_ids[0, -batch.num_pad:].tolist() == [7] * batch.num_pad


def test_loss_scale_binary_samples_get_labels_mask():
    rng = np.random.default_rng(6)
    samples = make_samples([5, 7, 4], rng, with_scale={1})
    batch = padding_free_collate(samples, pad_to_multiple_of=8)
    ls = batch.loss_scale[0].tolist()
    assert batch.loss_scale.dtype == torch.float32 and len(ls) == 16
    assert ls[0] == 0 and ls[1:5] == [float(x != -100) for x in samples[0]['labels'][1:]]
    assert ls[5] == 0 and ls[6:12] == pytest.approx(samples[1]['loss_scale'][1:])
    assert ls[12] == 0 and ls[13:] == [float(x != -100) for x in samples[2]['labels'][1:]]
    assert batch.num_pad == 0


def test_pad_to_packing_length_and_bin_overflow():
    samples = make_samples([3, 4], np.random.default_rng(7))
    batch = collate_packed(samples, 16, pad_to_multiple_of=4, pad_to_packing_length=True)
    assert batch.num_tokens == 16 and batch.num_pad == 9
    check_row(batch, samples)
    with pytest.raises(PackingError, match='7 tokens > packing_length 6'):
        collate_packed(samples, 6)
    with pytest.raises(PackingError, match='empty'):
        padding_free_collate([])


def test_padding_multiple_rule():
    assert padding_multiple(1, 1, False) == 1
    assert padding_multiple(4, 1, False) == 1
    assert padding_multiple(4, 1, True) == 4
    assert padding_multiple(1, 2, False) == 4
    assert padding_multiple(2, 4, True) == 16 and padding_multiple(2, 4, False) == 16
    with pytest.raises(ValueError):
        padding_multiple(0, 1)
    for tp, cp, sp in [(2, 1, True), (2, 2, True), (1, 4, False)]:
        m = padding_multiple(tp, cp, sp)
        batch = padding_free_collate(make_samples([5, 9, 2], np.random.default_rng(8)), pad_to_multiple_of=m)
        assert batch.num_tokens % m == 0 and (batch.num_tokens // cp) % (tp if sp else 1) == 0


def test_packed_seq_params_fields():
    batch = padding_free_collate(make_samples([3, 5], np.random.default_rng(9)), pad_to_multiple_of=4)
    p = batch.packed_seq_params()
    assert p.qkv_format == 'thd'
    assert torch.equal(p.cu_seqlens_q, batch.cu_seqlens) and torch.equal(p.cu_seqlens_kv, batch.cu_seqlens)
    assert p.max_seqlen_q == p.max_seqlen_kv == 5 and type(p.max_seqlen_q) is int
    assert p.cu_seqlens_q_padded is None
    names = {f.name for f in dataclasses.fields(p)}
    assert {'qkv_format', 'cu_seqlens_q', 'cu_seqlens_kv', 'cu_seqlens_q_padded', 'cu_seqlens_kv_padded',
            'max_seqlen_q', 'max_seqlen_kv'} <= names
    if importlib.util.find_spec('megatron') is None:
        assert isinstance(p, PackedSeqParamsFallback)
    else:
        assert type(p).__module__ == 'megatron.core.packed_seq_params'
    assert packed_seq_params(batch.cu_seqlens, 5).cu_seqlens_q is batch.cu_seqlens
    assert set(batch.to_dict()) == {'input_ids', 'labels', 'position_ids', 'cu_seqlens', 'max_seqlen'}


def test_pad_collate():
    rng = np.random.default_rng(10)
    samples = make_samples([3, 6, 1], rng, with_scale={0})
    out = pad_collate(samples, pad_token_id=0, pad_to_multiple_of=4)
    assert out['input_ids'].shape == (3, 8) and out['attention_mask'].sum(1).tolist() == [3, 6, 1]
    for r, s in enumerate(samples):
        n = len(s['input_ids'])
        assert out['input_ids'][r, :n].tolist() == s['input_ids']
        assert out['labels'][r].tolist() == [-100] + s['labels'][1:] + [-100] * (8 - n)
    assert out['loss_scale'][0, 1:3].tolist() == pytest.approx(samples[0]['loss_scale'][1:])
    assert out['loss_scale'][1].tolist()[6:] == [0, 0]


def test_packing_efficiency():
    assert packing_efficiency([[4, 4], [8]], 8) == 1.0
    assert packing_efficiency([[2], [6]], 8) == 0.5
    assert packing_efficiency([], 8) == 0.0
