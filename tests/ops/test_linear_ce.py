"""megaswift.ops.linear_cross_entropy (the chunked PyTorch implementation) against F.cross_entropy on
materialised logits: losses, gradients, log-probs, entropies, argmax; single process and TP=2 on gloo."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megaswift.ops import LinearCEOutput, linear_cross_entropy
from megaswift.ops.linear_ce import default_chunk_size, merge_stats
from megaswift.ops.linear_ce_rows import logit_grad_, row_stats
from testing_utils import run_case_script

HERE = Path(__file__).resolve().parent


def _reference(h, w, labels, scale, reduction, smoothing, ignore_index=-100):
    per_token = F.cross_entropy(h @ w.t(), labels, reduction='none', label_smoothing=smoothing,
                                ignore_index=ignore_index)
    if scale is not None:
        per_token = per_token * scale
    if reduction == 'none':
        return per_token
    total = per_token.sum()
    return total / (labels != ignore_index).sum() if reduction == 'mean' else total


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize('seed', range(6))
def test_matches_materialised_cross_entropy_fp32(seed):
    g = torch.Generator().manual_seed(seed)
    n, hdim, vocab = (int(x) for x in torch.randint(1, 90, (3,), generator=g))
    vocab += 1
    reduction = ('mean', 'sum', 'none')[seed % 3]
    smoothing = (0.0, 0.15)[seed % 2]
    h = torch.randn(n, hdim, generator=g)
    w = torch.randn(vocab, hdim, generator=g) * 0.3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = -100
    scale = torch.rand(n, generator=g) * 3  # non-binary loss scale
    chunk = int(torch.randint(1, n + 2, (1,), generator=g))
    vchunk = int(torch.randint(1, vocab + 2, (1,), generator=g))
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _reference(hr, wr, labels, scale, reduction, smoothing)
    ho, wo = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(ho, wo, labels, loss_scale=scale, reduction=reduction, label_smoothing=smoothing,
                               chunk_size=chunk, vocab_chunk_size=vchunk)
    up = torch.randn(ref.shape, generator=g)
    (ref * up).sum().backward()
    (out * up).sum().backward()
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5
    assert _rel(ho.grad, hr.grad) < 1e-5
    assert _rel(wo.grad, wr.grad) < 1e-5


def test_batched_shapes_custom_ignore_index_and_padded_vocab():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 9, 16, generator=g)
    w = torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 37, (2, 9), generator=g)
    labels[0, :3] = 7777
    out = linear_cross_entropy(h, w, labels, ignore_index=7777, vocab_size=37, chunk_size=4)
    ref = F.cross_entropy((h @ w[:37].t()).reshape(-1, 37), labels.reshape(-1), ignore_index=7777)
    assert abs(float(out) - float(ref)) < 1e-5


def test_logprobs_entropy_argmax_and_their_gradients():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(25, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 25, (30,), generator=g)
    labels[::5] = -100
    out = linear_cross_entropy(h, w, labels, reduction='none', return_logprobs=True, return_entropy=True,
                               return_argmax=True, chunk_size=7, vocab_chunk_size=9)
    assert isinstance(out, LinearCEOutput)
    z = h @ w.t()
    logp = torch.log_softmax(z, -1)
    lp_ref = torch.where(labels >= 0, logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    assert torch.allclose(out.logprobs, lp_ref, atol=1e-12)
    assert torch.allclose(out.entropy, -(logp.exp() * logp).sum(-1), atol=1e-12)
    assert torch.equal(out.argmax, z.argmax(-1))
    assert torch.allclose(out.loss, -lp_ref, atol=1e-12)

    def f(h, w):  # every differentiable output at once, through the recomputing backward
        r = linear_cross_entropy(h, w, labels, loss_scale=torch.linspace(0, 2, 30, dtype=torch.float64),
                                 return_logprobs=True, return_entropy=True, label_smoothing=0.1, chunk_size=7,
                                 vocab_chunk_size=9)
        return r.loss, r.logprobs, r.entropy
    assert torch.autograd.gradcheck(f, (h, w))
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, labels, label_smoothing=0.1,
                                                                      chunk_size=4), (h, w))


def test_bf16_close_to_fp32_and_gradients_keep_dtypes():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(64, 32, generator=g)
    w = torch.randn(300, 32, generator=g) * 0.2
    labels = torch.randint(0, 300, (64,), generator=g)
    ref = linear_cross_entropy(h, w, labels)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    out = linear_cross_entropy(hb, wb, labels, chunk_size=16)
    out.backward()
    assert out.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    assert abs(out.item() - ref.item()) < 2e-2 * ref.item()


def test_only_weight_or_no_gradient():
    h = torch.randn(10, 4)
    w = torch.randn(7, 4, requires_grad=True)
    labels = torch.randint(0, 7, (10,))
    linear_cross_entropy(h, w, labels).backward()
    wr = w.detach().clone().requires_grad_()
    F.cross_entropy(h @ wr.t(), labels).backward()
    assert torch.allclose(w.grad, wr.grad, atol=1e-6)
    with torch.no_grad():
        assert abs(float(linear_cross_entropy(h, w, labels)) - float(F.cross_entropy(h @ w.t(), labels))) < 1e-6


def test_row_passes_and_merge():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 12, generator=g)
    z[1, 3] = z[1, 9] = 50.0  # a tie: the first index wins
    target = torch.tensor([0, 3, -1, 11, 5])
    s = row_stats(z, target)
    assert torch.equal(s[:, 5].long(), z.argmax(1)) and int(s[1, 5]) == 3
    assert torch.allclose(s[:, 0] + torch.log(s[:, 1]), torch.logsumexp(z, 1))
    parts = torch.stack([row_stats(z[:, :4], torch.full((5,), -1)), row_stats(z[:, 4:], torch.full((5,), -1))])
    parts[1, :, 5] += 4
    merged = merge_stats(parts)
    assert torch.allclose(merged[:, :2].prod(1) * 0 + merged[:, 0] + torch.log(merged[:, 1]), torch.logsumexp(z, 1))
    assert torch.equal(merged[:, 5], s[:, 5])
    lse = torch.logsumexp(z, 1)
    coef = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).repeat(5, 1)
    grad = logit_grad_(z.clone(), lse, target, coef)
    ref = torch.softmax(z, 1) - F.one_hot(target.clamp(min=0), 12) * (target >= 0)[:, None]
    assert torch.allclose(grad, ref, atol=1e-6)


def test_kernel_self_check_accepts_the_reference_and_catches_a_wrong_kernel():
    """The check the never-GPU-run CUDA rows pass before first use, run here on CPU stand-ins."""
    from megaswift.ops import linear_ce_rows
    from megaswift.ops.linear_ce import _compare_rows

    class OffByOne:  # a plausible kernel bug: the gradient's target column shifted by one
        row_stats = staticmethod(linear_ce_rows.row_stats)

        @staticmethod
        def logit_grad_(z, lse, target, coef):
            return linear_ce_rows.logit_grad_(z, lse, torch.where(target > 0, target - 1, target), coef)

    class NoTieRule:  # argmax returning the last of equal maxima
        logit_grad_ = staticmethod(linear_ce_rows.logit_grad_)

        @staticmethod
        def row_stats(z, target):
            out = linear_ce_rows.row_stats(z, target)
            out[:, 5] = z.size(1) - 1 - z.flip(1).float().argmax(1)
            return out

    cpu = torch.device('cpu')
    assert _compare_rows(linear_ce_rows, cpu) is None
    assert 'logit_grad_' in _compare_rows(OffByOne, cpu)
    assert 'row_stats' in _compare_rows(NoTieRule, cpu)


def test_bad_input_is_rejected():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match='outside the vocabulary'):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match='reduction'):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), reduction='avg')
    with pytest.raises(ValueError, match='weight must be'):
        linear_cross_entropy(h, torch.randn(5, 4), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3]), impl='cuda')


def test_default_chunk_keeps_one_block_small_on_cpu():
    n = default_chunk_size(49152, torch.float32, torch.device('cpu'))
    assert 256 <= n and n * 49152 * 4 <= 128 << 20
    assert default_chunk_size(151936, torch.bfloat16, torch.device('cpu')) == 256


def test_tensor_parallel_matches_reference_and_catches_a_missing_reduction(tmp_path):
    results = run_case_script(HERE / 'dist_linear_ce_cases.py', tmp_path, tmp_path / 'unused', timeout=300)
    checked = 0
    for name, ranks in results.items():
        for r in ranks:
            for mode, m in r.items():
                errors = (m['loss'], m['logprobs'], m['entropy'], m['grad_hidden'], m['grad_weight'])
                if name.endswith('no_group'):
                    assert max(errors) > 1e-3 and not m['argmax_equal'], (name, mode, m)
                else:
                    assert max(errors) < 1e-10 and m['argmax_equal'], (name, mode, m)
                    checked += 1
    assert checked >= 2 * 6 * 2 + 6 * 2  # TP=2: 2 ranks x 6 cases x 2 modes; TP=1: 6 cases x 2 modes
