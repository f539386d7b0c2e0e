"""The CUDA kernels (csrc/) against their torch references: the linear-CE row passes against
megaswift/ops/linear_ce_rows.py, the packing kernels against Python loops, and linear_cross_entropy(impl='cuda')
against F.cross_entropy on materialised logits. GPU only (the extension is loaded or JIT-built once)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaswift.ops import linear_ce_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# v: 1, below / not a multiple of every vector width (4 fp32, 8 bf16), one row per block, a 150k vocabulary
SHAPES = [(1, 1), (3, 7), (5, 13), (4, 33), (17, 1000), (9, 4099), (64, 8192), (3, 151_937)]


@pytest.fixture(scope='module')
def ext():
    from megaswift.ops import cuda_ext
    return cuda_ext.load(required=True)


@pytest.fixture(autouse=True)
def exact_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _targets(n: int, v: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.randint(0, max(v, 1), (n,), generator=gen)
    t[torch.rand(n, generator=gen) < 0.3] = -1
    return t.cuda()


def _logits(n: int, v: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(n, v, generator=gen) * scale).to('cuda', dtype)


def _first_argmax(z: torch.Tensor) -> torch.Tensor:
    """The first column holding each row's max, independent of torch.max's tie rule."""
    zf = z.float()
    cols = torch.arange(z.size(1), device=z.device).expand_as(zf)
    return torch.where(zf == zf.max(dim=1, keepdim=True).values, cols, z.size(1)).min(dim=1).values.float()


def _check_stats(got: torch.Tensor, z: torch.Tensor, target: torch.Tensor):
    ref = linear_ce_rows.row_stats(z, target)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=0, atol=0)                   # max
    torch.testing.assert_close(got[:, 2], ref[:, 2], rtol=0, atol=0)                   # target logit
    torch.testing.assert_close(got[:, 5], _first_argmax(z), rtol=0, atol=0)            # first argmax
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=2e-5, atol=1e-6)             # sumexp
    zf = z.float()
    # sums in another order: an absolute error relative to the size of the terms
    torch.testing.assert_close(got[:, 3], ref[:, 3], rtol=1e-5, atol=1e-5 * float(zf.abs().sum(1).max()) + 1e-6)
    scale = float((ref[:, 1] * zf.abs().amax(1)).max()) + 1e-6
    torch.testing.assert_close(got[:, 4], ref[:, 4], rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('n,v', SHAPES)
def test_row_stats_matches_reference(ext, n, v, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    z, target = _logits(n, v, dtype, gen), _targets(n, v, gen)
    _check_stats(ext.row_stats(z, target), z, target)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('offset', [1, 3, 5])
def test_row_stats_unaligned_row_slices(ext, dtype, offset):
    """Rows that start off the 16-byte boundary (a column slice of a wider block: row stride != v)."""
    gen = torch.Generator().manual_seed(offset)
    wide = _logits(6, 1031 + offset, dtype, gen)
    z = wide[:, offset:offset + 1031]
    assert z.stride(1) == 1 and z.stride(0) != z.size(1)
    target = _targets(6, 1031, gen)
    _check_stats(ext.row_stats(z, target), z, target)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_row_stats_ties_take_the_first_column(ext, dtype):
    gen = torch.Generator().manual_seed(7)
    z = torch.randint(-3, 3, (33, 5003), generator=gen).to('cuda', dtype)  # every row max appears many times
    z[5] = 1.0                                                             # a constant row
    z[6, 4000:] = 10.0                                                     # the max only in the tail
    target = _targets(33, 5003, gen)
    got = ext.row_stats(z, target)
    torch.testing.assert_close(got[:, 5], _first_argmax(z), rtol=0, atol=0)
    assert got[5, 5] == 0 and got[6, 5] == 4000
    _check_stats(got, z, target)


def test_row_stats_masked_columns_and_edges(ext):
    gen = torch.Generator().manual_seed(3)
    z = _logits(8, 515, torch.float32, gen)
    z[:, ::3] = float('-inf')             # masked columns (also the first one)
    target = (torch.randint(0, 171, (8,), generator=gen) * 3 + 1).cuda()  # off the masked columns
    target[0] = -1                        # no target: 0 (the reference's gather of a -inf column * 0 is NaN)
    z[7] = float('-inf')                  # a fully masked row: max -inf, argmax 0, NaN sums as the reference
    got = ext.row_stats(z, target)
    ref = linear_ce_rows.row_stats(z, target)
    assert got[0, 2] == 0
    torch.testing.assert_close(got[1:7, [0, 2, 5]], ref[1:7, [0, 2, 5]], rtol=0, atol=0)
    assert got[7, 0] == float('-inf') and got[7, 5] == 0 and got[7, 1].isnan()
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=2e-5, atol=0, equal_nan=True)
    assert torch.isnan(got[:, 4]).all() and torch.isnan(ref[:, 4]).all()  # 0 * -inf in sumexpz, as the reference
    # an empty shard, and no rows at all
    empty = ext.row_stats(torch.empty(4, 0, device='cuda'), torch.full((4,), -1, device='cuda'))
    torch.testing.assert_close(empty, linear_ce_rows.row_stats(torch.empty(4, 0), torch.full((4,), -1)).cuda())
    assert ext.row_stats(torch.empty(0, 9, device='cuda'), torch.empty(0, dtype=torch.long, device='cuda')).shape \
        == (0, 6)


def test_row_stats_float64(ext):
    gen = torch.Generator().manual_seed(11)
    z, target = _logits(5, 777, torch.float64, gen), _targets(5, 777, gen)
    got, ref = ext.row_stats(z, target), linear_ce_rows.row_stats(z, target)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-9)


def _grad_inputs(n: int, v: int, dtype: torch.dtype, gen: torch.Generator, entropy: bool):
    z = _logits(n, v, dtype, gen)
    target = _targets(n, v, gen)
    stats = linear_ce_rows.row_stats(z, target)
    lse = stats[:, 0] + stats[:, 1].log()
    coef = torch.rand(n, 4, generator=gen).cuda()
    if not entropy:
        coef[:, 1] = 0
    coef[0] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # plain cross entropy
    return z, lse, target, coef


@pytest.mark.parametrize('entropy', [False, True])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('n,v', SHAPES)
def test_logit_grad_matches_reference(ext, n, v, dtype, entropy):
    gen = torch.Generator().manual_seed(n + v)
    z, lse, target, coef = _grad_inputs(n, v, dtype, gen, entropy)
    ref = linear_ce_rows.logit_grad_(z.clone(), lse, target, coef)
    mine = z.clone()
    out = ext.logit_grad_(mine, lse, target, coef)
    assert out.data_ptr() == mine.data_ptr() and out.dtype == dtype  # in place
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:  # both round an fp32 result to 16 bits (the reference subtracts C at the target in 16 bits)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_logit_grad_unaligned_slice_leaves_the_rest(ext, dtype):
    gen = torch.Generator().manual_seed(5)
    wide = _logits(7, 2053, dtype, gen)
    before = wide.clone()
    z = wide[:, 3:2050]
    _, lse, target, coef = _grad_inputs(7, 2047, dtype, gen, entropy=True)
    ref = linear_ce_rows.logit_grad_(z.clone(), lse, target, coef)
    ext.logit_grad_(z, lse, target, coef)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(wide[:, 3:2050].float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 2050:], before[:, 2050:])


def test_logit_grad_float64(ext):
    gen = torch.Generator().manual_seed(13)
    z, lse, target, coef = _grad_inputs(6, 301, torch.float64, gen, entropy=True)
    lse, coef = lse.double(), coef.double()
    ref = linear_ce_rows.logit_grad_(z.clone(), lse, target, coef)
    torch.testing.assert_close(ext.logit_grad_(z.clone(), lse, target, coef), ref, rtol=1e-12, atol=1e-12)


def test_input_checks(ext):
    z = torch.randn(4, 8, device='cuda')
    t = torch.zeros(4, dtype=torch.long, device='cuda')
    with pytest.raises(RuntimeError, match='CUDA tensor'):
        ext.row_stats(z.cpu(), t.cpu())
    with pytest.raises(RuntimeError, match='int64'):
        ext.row_stats(z, t.int())
    with pytest.raises(RuntimeError, match='contiguous'):
        ext.row_stats(z.t(), torch.zeros(8, dtype=torch.long, device='cuda'))
    with pytest.raises(RuntimeError, match='shape'):
        ext.logit_grad_(z, torch.zeros(3, device='cuda'), t, torch.zeros(4, 4, device='cuda'))
    with pytest.raises(RuntimeError, match='float32, bfloat16'):
        ext.row_stats(z.int(), t)


# ------------------------------------------------------------------------------------------------ packing
def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device='cuda')


LENGTHS = [[5], [3, 0, 7, 1], [0, 0], [16, 16, 2, 9, 0, 11]]


@pytest.mark.parametrize('lengths', LENGTHS)
def test_position_ids(ext, lengths):
    cu = _cu(lengths)
    expected = [p for n in lengths for p in range(n)]
    assert ext.position_ids(cu, sum(lengths)).tolist() == expected
    assert ext.position_ids(cu).tolist() == expected                      # total read from cu_seqlens
    assert ext.position_ids(cu.long(), sum(lengths)).tolist() == expected  # int64 boundaries accepted
    assert ext.position_ids(cu, sum(lengths) + 3).tolist() == expected + [0, 1, 2]  # a trailing segment


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.uint8, torch.bool, torch.float64])
@pytest.mark.parametrize('features', [(), (1,), (5,), (64,), (3, 8)])
@pytest.mark.parametrize('lengths', LENGTHS)
def test_pack_unpack_match_loops(ext, lengths, features, dtype):
    gen = torch.Generator().manual_seed(len(lengths) + len(features))
    width = max(lengths) + 2
    padded = (torch.randn(len(lengths), width, *features, generator=gen) * 50).to(dtype).cuda()
    cu = _cu(lengths)
    packed = ext.pack(padded, cu, sum(lengths))
    expected = torch.cat([padded[b, :n] for b, n in enumerate(lengths)])
    assert packed.dtype == dtype and packed.shape == (sum(lengths), *features)
    assert torch.equal(packed, expected)
    assert torch.equal(ext.pack(padded, cu), expected)  # total from cu_seqlens

    pad = {torch.bool: 1, torch.uint8: 7}.get(dtype, -7)
    for max_len in (max(lengths), width + 3):
        out = ext.unpack(packed, cu, max_len, pad)
        ref = torch.full((len(lengths), max_len, *features), pad, dtype=dtype, device='cuda')
        for b, n in enumerate(lengths):
            ref[b, :n] = packed[int(cu[b]):int(cu[b]) + n]
        assert out.shape == ref.shape and torch.equal(out, ref)


def test_unpack_truncates_and_pads_float(ext):
    cu = _cu([4, 2])
    packed = torch.arange(6, dtype=torch.float32, device='cuda')[:, None].repeat(1, 3)
    out = ext.unpack(packed, cu, 3, float('nan'))
    assert torch.equal(out[0], packed[:3]) and torch.equal(out[1, :2], packed[4:6]) and out[1, 2].isnan().all()
    with pytest.raises(RuntimeError):
        ext.unpack(packed.long(), cu, 3, float('nan'))  # NaN does not fit an integer dtype


def test_pack_unaligned_inputs(ext):
    """A storage offset that breaks 16-byte alignment takes the scalar path."""
    base = torch.randn(2 * 6 * 8 + 1, device='cuda')
    padded = base[1:].view(2, 6, 8)
    cu = _cu([6, 3])
    assert torch.equal(ext.pack(padded, cu, 9), torch.cat([padded[0], padded[1, :3]]))


# ----------------------------------------------------------------------------------- linear_cross_entropy
@pytest.mark.parametrize('chunk_size', [None, 64])
def test_linear_cross_entropy_cuda_matches_materialised_logits(chunk_size):
    from megaswift.ops import linear_cross_entropy
    gen = torch.Generator().manual_seed(0)
    n, h, v = 300, 64, 1003
    hidden = torch.randn(n, h, generator=gen).cuda()
    weight = (torch.randn(v, h, generator=gen) * 0.1).cuda()
    labels = torch.randint(0, v, (n,), generator=gen).cuda()
    labels[::7] = -100
    loss_scale = torch.rand(n, generator=gen).cuda()

    def grads(fn):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(x, w)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    cases = {
        'mean': (lambda x, w: linear_cross_entropy(x, w, labels, impl='cuda', chunk_size=chunk_size),
                 lambda x, w: F.cross_entropy(x @ w.t(), labels, ignore_index=-100)),
        'scaled sum': (lambda x, w: linear_cross_entropy(x, w, labels, loss_scale=loss_scale, reduction='sum',
                                                         impl='cuda', chunk_size=chunk_size),
                       lambda x, w: (loss_scale * F.cross_entropy(x @ w.t(), labels, ignore_index=-100,
                                                                  reduction='none')).sum()),
    }
    for name, (mine_fn, ref_fn) in cases.items():
        for got, ref in zip(grads(mine_fn), grads(ref_fn)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-7, msg=name)
