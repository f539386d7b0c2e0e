"""GRPO's loss types, importance-sampling levels and advantage estimators against references written here from
their published formulas (padded ``[B, T]`` tensors with a completion mask, as the papers and TRL write them), on
the same log-probs, rewards and masks; and the objective's micro-batch shares summing to the whole-step loss."""
from __future__ import annotations

import pytest
import torch

from megaswift.trainers.grpo.advantages import compute_advantages, zero_std_groups
from megaswift.trainers.grpo.losses import LOSS_TYPES, aggregate, per_token_loss

B, T, MAX_LEN = 6, 7, 9
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    logps = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # ratios on both sides of the clip, per token and per sequence (GSPO averages a sequence's log-ratios)
    old = (logps.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
           + torch.randn(B, 1, generator=g, dtype=torch.float64) * 0.4)
    ref = logps.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logps, old, ref, adv, mask


def reference_loss(logps, old, ref, adv, mask, loss_type, level):
    """The published objective, padded: per-token terms, then the loss type's aggregation."""
    a = adv[:, None]
    log_ratio = logps - old
    if level == 'sequence':  # GSPO: s_i = exp(1/|o_i| sum_t log r_it), on every token of o_i
        log_ratio = ((log_ratio * mask).sum(1) / mask.sum(1))[:, None].expand_as(logps)
    r = torch.exp(log_ratio)
    if loss_type == 'cispo':  # MiniMax-M1: sg(clip(r, max=1 + eps_high)) * A * log pi
        per_token = -torch.clamp(r, max=1 + EPS_HIGH).detach() * a * logps
    else:
        per_token = -torch.minimum(r * a, torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
    d = ref - logps
    per_token = per_token + BETA * (torch.exp(d) - d - 1)
    if loss_type == 'grpo':
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    if loss_type == 'bnpo':
        return (per_token * mask).sum() / mask.sum()
    if loss_type == 'dr_grpo':
        return (per_token * mask).sum() / (B * MAX_LEN)
    return (per_token * mask).sum() / mask.sum()  # dapo, cispo: the global token mean


@pytest.mark.parametrize('level', ['token', 'sequence'])
@pytest.mark.parametrize('loss_type', LOSS_TYPES)
def test_loss_types_equal_their_formulas(loss_type, level):
    logps, old, ref, adv, mask = _batch()
    want = reference_loss(logps, old, ref, adv, mask, loss_type, level)
    (want_grad,) = torch.autograd.grad(want, logps)
    sel = mask.bool()
    flat = logps[sel]
    seq_index = torch.arange(B)[:, None].expand(B, T)[sel]
    per_token, info = per_token_loss(flat, old[sel], adv[seq_index], seq_index, B, loss_type=loss_type,
                                     epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, importance_sampling_level=level,
                                     beta=BETA, ref_logps=ref[sel])
    denominators = {'tokens': torch.tensor(float(sel.sum())), 'sequences': torch.tensor(float(B)),
                    'micro_batches': torch.tensor(1.0)}
    got = aggregate(per_token, seq_index, B, loss_type, denominators, MAX_LEN)
    (got_grad,) = torch.autograd.grad(got, logps)
    assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item())), (got.item(), want.item())
    assert torch.allclose(got_grad, want_grad, atol=1e-6, rtol=0)
    assert info['clipped_low'].any() or info['clipped_high'].any()  # the batch exercises the clip
    # negative control: another loss type's aggregation differs on the same tokens (they are not all alike)
    other = {'grpo': 'dapo', 'bnpo': 'dr_grpo', 'dr_grpo': 'grpo', 'dapo': 'grpo', 'cispo': 'grpo'}[loss_type]
    assert abs(aggregate(per_token, seq_index, B, other, denominators, MAX_LEN).item() - want.item()) > 1e-4


def test_sequence_level_ratio_is_one_number_per_completion():
    logps, old, ref, adv, mask = _batch(1)
    sel = mask.bool()
    seq_index = torch.arange(B)[:, None].expand(B, T)[sel]
    _, info = per_token_loss(logps[sel], old[sel], adv[seq_index], seq_index, B, importance_sampling_level='sequence')
    for i in range(B):
        r = info['ratio'][seq_index == i]
        assert torch.allclose(r, r[0].expand_as(r))


def reference_advantages(r, estimator, scale):
    """GRPO: (r - mean_group) / (std_group + eps); RLOO: r minus the mean of the other G - 1 rewards;
    REINFORCE++ (baseline): r - mean_group, normalised by the batch's std of those."""
    G = r.shape[1]
    eps = 1e-4
    if estimator == 'reinforce_plus_plus':
        c = r - r.mean(1, keepdim=True)
        return c / (c.flatten().std() + eps)
    if estimator == 'rloo':
        a = r - (r.sum(1, keepdim=True) - r) / (G - 1)
    else:
        a = r - r.mean(1, keepdim=True)
    if scale == 'group':
        return a / (r.std(1, keepdim=True) + eps)
    if scale == 'batch':
        return a / (r.flatten().std() + eps)
    return a


@pytest.mark.parametrize('scale', ['group', 'batch', 'none'])
@pytest.mark.parametrize('estimator', ['grpo', 'rloo', 'reinforce_plus_plus'])
def test_advantage_estimators_equal_their_formulas(estimator, scale):
    r = torch.rand(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r[3] = 0.5  # a group with one reward for all: its advantages are 0 under every estimator and scaling
    want = reference_advantages(r, estimator, scale)
    got = compute_advantages(r, estimator, scale)
    assert torch.allclose(got, want, atol=1e-9), (got, want)
    assert torch.allclose(got[3], torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert zero_std_groups(r).tolist() == [False, False, False, True, False]


def test_rloo_is_not_grpo():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    assert not torch.allclose(compute_advantages(r, 'rloo', 'none'), compute_advantages(r, 'grpo', 'none'))
