"""Packing ops against straightforward Python-loop references: cu_seqlens, position ids, pack/unpack (values,
round trips, gradients, bad input), the CUDA-extension dispatch (with a stand-in extension) and the collators."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megaswift.ops import packing
from megaswift.ops.packing import (cu_seqlens_from_lengths, pack_padded, position_ids_from_cu_seqlens,
                                   unpack_to_padded)

DTYPES = [torch.int64, torch.int32, torch.float32, torch.float64]
FEATURES = [(), (3,), (2, 3)]


# ------------------------------------------------------------------------------------------ references
def ref_cu_seqlens(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def ref_position_ids(lengths):
    return [p for n in lengths for p in range(n)]


def ref_pack(padded, lengths):
    rows = [padded[b, :n] for b, n in enumerate(lengths)]
    return torch.cat(rows) if rows else padded.new_zeros((0, *padded.shape[2:]))


def ref_unpack(packed, lengths, max_len, pad_value):
    out = torch.full((len(lengths), max_len, *packed.shape[1:]), pad_value, dtype=packed.dtype)
    start = 0
    for b, n in enumerate(lengths):
        for t in range(n):
            out[b, t] = packed[start + t]
        start += n
    return out


def random_lengths(rng, zeros=True):
    n = int(rng.integers(0, 8))
    lens = rng.integers(0 if zeros else 1, 10, n)
    if zeros and n and rng.random() < 0.5:
        lens[rng.integers(n)] = 0
    return lens.tolist()


def random_tensor(shape, dtype, rng):
    if dtype.is_floating_point:
        return torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    return torch.from_numpy(rng.integers(-1000, 1000, shape)).to(dtype)


def cases(n=60, seed=0):
    rng = np.random.default_rng(seed)
    for k in range(n):
        yield rng, random_lengths(rng), FEATURES[k % len(FEATURES)], DTYPES[k % len(DTYPES)]


# -------------------------------------------------------------------------------- cu_seqlens / positions
def test_cu_seqlens_and_position_ids_match_references():
    for rng, lens, _, _ in cases():
        cu = cu_seqlens_from_lengths(lens)
        assert cu.dtype == torch.int32 and cu.tolist() == ref_cu_seqlens(lens)
        for given in (torch.tensor(lens, dtype=torch.int32), np.asarray(lens, dtype=np.int64), tuple(lens)):
            assert torch.equal(cu_seqlens_from_lengths(given), cu)
        pos = position_ids_from_cu_seqlens(cu)
        assert pos.dtype == torch.int64 and pos.tolist() == ref_position_ids(lens)
        assert torch.equal(position_ids_from_cu_seqlens(cu.tolist(), total=sum(lens)), pos)
        assert torch.equal(position_ids_from_cu_seqlens(cu.long()), pos)


def test_edge_cases():
    assert cu_seqlens_from_lengths([]).tolist() == [0]
    assert cu_seqlens_from_lengths([0, 0]).tolist() == [0, 0, 0]
    assert position_ids_from_cu_seqlens([0]).tolist() == []
    assert position_ids_from_cu_seqlens([0, 0, 3, 3, 4]).tolist() == [0, 1, 2, 0]
    assert pack_padded(torch.zeros(0, 5, 2), []).shape == (0, 2)
    assert pack_padded(torch.ones(2, 3), [0, 0]).shape == (0,)
    assert unpack_to_padded(torch.zeros(0, 2), [0]).shape == (0, 0, 2)
    assert unpack_to_padded(torch.zeros(0), [0, 0, 0], max_len=2, pad_value=7).tolist() == [[7, 7], [7, 7]]


# ---------------------------------------------------------------------------------------- pack / unpack
def test_pack_and_unpack_match_references():
    for rng, lens, feat, dtype in cases(seed=1):
        width = max(lens, default=0) + int(rng.integers(0, 3))
        padded = random_tensor((len(lens), width, *feat), dtype, rng)
        packed = pack_padded(padded, lens)
        assert packed.dtype == dtype and torch.equal(packed, ref_pack(padded, lens))
        cu = cu_seqlens_from_lengths(lens)
        for max_len in (None, width):
            size = max(lens, default=0) if max_len is None else max_len
            out = unpack_to_padded(packed, cu, max_len, pad_value=-3)
            assert out.dtype == dtype and torch.equal(out, ref_unpack(packed, lens, size, -3))


def test_round_trips():
    for rng, lens, feat, dtype in cases(seed=2):
        cu = cu_seqlens_from_lengths(lens)
        packed = random_tensor((sum(lens), *feat), dtype, rng)
        assert torch.equal(pack_padded(unpack_to_padded(packed, cu, pad_value=5), lens), packed)
        padded = random_tensor((len(lens), max(lens, default=0) + 1, *feat), dtype, rng)
        back = unpack_to_padded(pack_padded(padded, lens), cu, padded.shape[1])
        mask = (torch.arange(padded.shape[1])[None] < torch.tensor(lens, dtype=torch.int64)[:, None])
        mask = mask.view(*mask.shape, *[1] * len(feat))
        assert torch.equal(back, torch.where(mask, padded, torch.zeros((), dtype=dtype)))


def test_gradients_and_adjoint():
    gen = torch.Generator().manual_seed(3)
    for lens, feat in [([3, 0, 2], ()), ([1, 4], (2,)), ([0, 2, 2, 1], (2, 2)), ([], (3,))]:
        cu = cu_seqlens_from_lengths(lens)
        width = max(lens, default=0) + 1
        padded = torch.randn(len(lens), width, *feat, dtype=torch.float64, generator=gen, requires_grad=True)
        packed = torch.randn(sum(lens), *feat, dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: pack_padded(x, lens), (padded,))
        assert torch.autograd.gradcheck(lambda x: unpack_to_padded(x, cu, width, pad_value=2.0), (packed,))
        # <pack(x), y> == <x, unpack(y)> (padding 0): each is the other's adjoint
        lhs = (pack_padded(padded, lens) * packed).sum()
        rhs = (padded * unpack_to_padded(packed, cu, width)).sum()
        assert torch.allclose(lhs, rhs)


@pytest.mark.parametrize('call, match', [
    (lambda: cu_seqlens_from_lengths([2, -1, 3]), r'lengths must be >= 0, but lengths\[1\] = -1'),
    (lambda: cu_seqlens_from_lengths(torch.tensor([[1, 2]])), r'lengths must be 1-D'),
    (lambda: cu_seqlens_from_lengths([1.0, 2.0]), r'lengths must hold integers'),
    (lambda: cu_seqlens_from_lengths([True]), r'lengths must hold integers'),
    (lambda: cu_seqlens_from_lengths([2 ** 30, 2 ** 30]), r'do not fit int32'),
    (lambda: position_ids_from_cu_seqlens([1, 3]), r'cu_seqlens must start at 0'),
    (lambda: position_ids_from_cu_seqlens([0, 4, 2]), r'non-decreasing, but cu_seqlens\[2\] = 2 < cu_seqlens\[1\] = 4'),
    (lambda: position_ids_from_cu_seqlens([]), r'at least one entry'),
    (lambda: position_ids_from_cu_seqlens([0, 3], total=4), r'cu_seqlens ends at 3 but there are 4 tokens'),
    (lambda: pack_padded(torch.zeros(2, 3), [1, 4]), r'a length of 4 exceeds the 3 columns'),
    (lambda: pack_padded(torch.zeros(2, 3), [1]), r'1 lengths for 2 rows'),
    (lambda: pack_padded(torch.zeros(3), [1]), r'padded must be \[B, S, \*\]'),
    (lambda: pack_padded(torch.zeros(1, 3), [-1]), r'lengths must be >= 0'),
    (lambda: unpack_to_padded(torch.zeros(5), [0, 2, 4]), r'cu_seqlens ends at 4 but there are 5 tokens'),
    (lambda: unpack_to_padded(torch.zeros(4), [0, 3, 4], max_len=2), r'max_len 2 is shorter than .* \(3\)'),
    (lambda: unpack_to_padded(torch.tensor(1.0), [0]), r'packed must be \[T, \*\]'),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------ CUDA-extension dispatch
class FakeExtension:
    """The CUDA extension's interface, in Python loops over CPU tensors; counts its calls."""

    def __init__(self):
        self.calls = []

    def position_ids(self, cu, total):
        assert cu.dtype == torch.int32
        self.calls.append('position_ids')
        return torch.tensor(ref_position_ids(np.diff(cu.tolist()).tolist()), dtype=torch.int64)[:total]

    def pack(self, padded, cu, total=-1):
        assert cu.dtype == torch.int32 and padded.ndim == 3 and padded.is_contiguous() and total == cu[-1]
        self.calls.append('pack')
        return ref_pack(padded, np.diff(cu.tolist()).tolist())

    def unpack(self, packed, cu, max_len, pad_value):
        assert cu.dtype == torch.int32 and packed.ndim == 2 and packed.is_contiguous()
        self.calls.append('unpack')
        return ref_unpack(packed, np.diff(cu.tolist()).tolist(), max_len, pad_value)


def test_cpu_tensors_and_a_missing_extension_use_torch(monkeypatch):
    assert packing._cuda_ext(torch.zeros(1)) is None
    monkeypatch.setitem(sys.modules, 'megaswift.ops.cuda_ext', None)  # importing it raises ImportError
    assert packing._cuda_ext(SimpleNamespace(is_cuda=True)) is None


def test_extension_path_matches_torch_path_with_gradients(monkeypatch):
    ext = FakeExtension()
    monkeypatch.setattr(packing, '_cuda_ext', lambda t: ext)
    lens, feat = [2, 0, 3], (2, 2)
    cu = cu_seqlens_from_lengths(lens)
    padded = torch.randn(3, 4, *feat, dtype=torch.float64).requires_grad_()
    packed = torch.randn(5, *feat, dtype=torch.float64).requires_grad_()
    assert torch.equal(position_ids_from_cu_seqlens(cu), torch.tensor(ref_position_ids(lens)))
    assert torch.equal(pack_padded(padded, lens), ref_pack(padded, lens))
    assert torch.equal(unpack_to_padded(packed, cu, 4, -1.0), ref_unpack(packed, lens, 4, -1.0))
    assert ext.calls == ['position_ids', 'pack', 'unpack']
    assert torch.autograd.gradcheck(lambda x: pack_padded(x, lens), (padded,))
    assert torch.autograd.gradcheck(lambda x: unpack_to_padded(x, cu, 4, pad_value=3.0), (packed,))
    assert {'pack', 'unpack'} <= set(ext.calls[3:])  # forward and backward both ran through the extension
    ext.calls.clear()  # nothing to move: no kernel launch
    assert pack_padded(torch.zeros(2, 3, 4), [0, 0]).shape == (0, 4)
    assert unpack_to_padded(torch.zeros(4, 0), [0, 4]).shape == (1, 4, 0)
    assert ext.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_tensors_match_cpu():
    rng = np.random.default_rng(4)
    for _, lens, feat, dtype in cases(20, seed=5):
        cu = cu_seqlens_from_lengths(lens)
        padded = random_tensor((len(lens), max(lens, default=0) + 2, *feat), dtype, rng)
        packed = pack_padded(padded.cuda(), torch.tensor(lens).cuda())
        assert packed.is_cuda and torch.equal(packed.cpu(), pack_padded(padded, lens))
        expected = unpack_to_padded(packed.cpu(), cu, pad_value=1)
        assert torch.equal(unpack_to_padded(packed, cu.cuda(), pad_value=1).cpu(), expected)
        assert torch.equal(position_ids_from_cu_seqlens(cu.cuda()).cpu(), position_ids_from_cu_seqlens(cu))


# ------------------------------------------------------------------------------------------- collators
def encoded(lens, rng):
    from megaswift.dataset.encode import EncodedDataset
    samples = []
    for n in lens:
        ids = rng.integers(3, 1000, n)
        samples.append({'input_ids': ids.tolist(), 'labels': np.where(rng.random(n) < 0.5, ids, -100).tolist()})
    return EncodedDataset.from_samples(samples), samples


def test_collators_use_the_ops():
    from megaswift.template.collator import Collator
    rng = np.random.default_rng(6)
    for lens, multiple in [([5, 3, 7], 4), ([1], 1), ([2, 9, 4, 4], 8)]:
        enc, samples = encoded(lens, rng)
        num_pad = -sum(lens) % multiple
        row = Collator(enc, [list(range(len(lens)))], padding_free=True, pad_to_multiple_of=multiple)([0])
        cu = row['packed_seq_params'].cu_seqlens_q
        assert torch.equal(cu, cu_seqlens_from_lengths(lens + ([num_pad] if num_pad else [])))
        assert torch.equal(row['position_ids'][0], position_ids_from_cu_seqlens(cu))
        padded = Collator(enc, [[i] for i in range(len(lens))], padding_free=False)(list(range(len(lens))))
        flat = torch.tensor([t for s in samples for t in s['input_ids']])
        assert torch.equal(padded['input_ids'], unpack_to_padded(flat, cu_seqlens_from_lengths(lens), max(lens)))
        assert torch.equal(pack_padded(padded['input_ids'], lens), flat)
