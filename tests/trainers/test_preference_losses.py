"""megaswift.trainers.objectives.preference_losses against each paper's formula.

Every reference here is written per element in Python floats (float64) from the paper, independently of the
module. Its gradient is taken by the complex step, f'(x) = Im f(x + ih) / h with h = 1e-30: no difference of
two nearby values is formed, so the derivative is exact to float64 rounding even where the loss is in the
hundreds of thousands. The module runs in fp32 on the same fp32 inputs (placed on a 1/256 grid, so that the
differences of two inputs are exact in fp32) and must agree with the reference, value and gradient, to 1e-6
relative and absolute, at large |beta * delta| too: a NaN or an inf fails the comparison.
"""
from __future__ import annotations

import cmath
import math
import random
import threading

import pytest
import torch

from megaswift.trainers.objectives.preference_losses import (DPO_LOSS_TYPES, bradley_terry_loss, cpo_pair_loss,
                                                             dpo_pair_loss, generalized_jsd, kto_loss,
                                                             orpo_odds_ratio_term)

RTOL = ATOL = 1e-6
H = 1e-30  # the complex step


def assert_close(actual: torch.Tensor, expected, what: str = 'value'):
    """|actual - expected| <= ATOL + RTOL |expected| everywhere, compared in float64; a NaN or inf fails.
    (torch.testing.assert_close would cost a second and a half of imports on its first call.)"""
    actual = actual.detach().double()
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    err = (actual - expected).abs()
    bad = ~(err <= ATOL + RTOL * expected.abs())
    if bad.any():
        k = int(bad.flatten().nonzero()[0])
        raise AssertionError(f'{what}: {int(bad.sum())} of {bad.numel()} elements off, e.g. #{k}: '
                             f'{actual.flatten()[k].item()!r} != {expected.flatten()[k].item()!r}')


# ---- float64 primitives, analytic in each argument (a tiny imaginary part passes through them exactly) ----

def log1p_(w: complex) -> complex:
    """log(1 + w) for |Re w| <= 1 with an infinitesimal imaginary part (the complex step)."""
    w = complex(w)
    return complex(math.log1p(w.real), math.atan2(w.imag, 1.0 + w.real))


def log_sigmoid(z: complex) -> complex:
    """log s(z) = -log(1 + e^-z), through exp of a non-positive real part only."""
    z = complex(z)
    return -log1p_(cmath.exp(-z)) if z.real >= 0 else z - log1p_(cmath.exp(z))


def sigmoid(z: complex) -> complex:
    return cmath.exp(log_sigmoid(z))


def log1m_exp(x: complex) -> complex:
    """log(1 - e^x) for x < 0: log1p(-e^x) far from 0, log(-expm1(x)) near it (Maechler 2012)."""
    x = complex(x)
    if x.real < -math.log(2):
        return log1p_(-cmath.exp(x))
    neg_expm1 = complex(-math.expm1(x.real), -math.exp(x.real) * x.imag)
    return cmath.log(neg_expm1)


def log_add_exp(a: complex, b: complex) -> complex:
    a, b = complex(a), complex(b)
    hi, lo = (a, b) if a.real >= b.real else (b, a)
    return hi + log1p_(cmath.exp(lo - hi))


def value_and_grad(f, args: list[float], wrt: tuple[int, ...]) -> tuple[float, list[float]]:
    """f's value at args and its partial derivatives in the arguments ``wrt``, by the complex step."""
    value = f(*args)
    grads = []
    for j in wrt:
        shifted = list(args)
        shifted[j] = complex(args[j], H)
        grads.append(complex(f(*shifted)).imag / H)
    return complex(value).real, grads


# ---- the papers' formulas, one pair / completion / token at a time ----

def dpo_references(beta: float, eps: float) -> dict:
    """Per-pair losses of (rc, rr), the policy-minus-reference log-ratios of the chosen and rejected responses."""
    half_b = 1 / (2 * beta)

    def sigmoid_(rc, rr):
        # DPO (Rafailov et al. 2023, eq. 7): -log s(beta ((log pi/ref)(y_w) - (log pi/ref)(y_l)));
        # conservative DPO (Mitchell 2023; Chowdhury et al. 2024): the label flipped with probability eps.
        z = beta * (rc - rr)
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)

    def ipo(rc, rr):
        # IPO (Azar et al. 2023, eq. 17, tau = beta): (h - 1/(2 tau))^2 with h the difference of log-ratios.
        return ((rc - rr) - half_b) ** 2

    def hinge(rc, rr):
        # SLiC's calibration loss (Zhao et al. 2023) on the log-ratios: max(0, 1 - beta (rc - rr)).
        z = beta * (rc - rr)
        assert abs(1 - z.real) > 1e-3, 'an input on the kink of the hinge has no derivative'
        return 1 - z if z.real < 1 else 0.0

    def robust(rc, rr):
        # rDPO (Chowdhury et al. 2024): the unbiased loss ((1-eps) L(y_w, y_l) - eps L(y_l, y_w)) / (1 - 2 eps)
        # with L(a, b) = -log s(beta (r_a - r_b)).
        z = beta * (rc - rr)
        return ((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps)

    def bco_pair(rc, rr):
        # BCO (Jung et al. 2024): a binary classifier, chosen -> 1 and rejected -> 0, on the rewards beta r
        # (the paper's running reward shift delta is left out: delta = 0).
        return -log_sigmoid(beta * rc) - log_sigmoid(-(beta * rr))

    def sppo_hard(rc, rr):
        # SPPO (Wu et al. 2024, Algorithm 1) with the hard win probability P = 1 for y_w and 0 for y_l and
        # eta = 1/beta: (r_w - eta (1 - 1/2))^2 + (r_l - eta (0 - 1/2))^2.
        return (rc - half_b) ** 2 + (rr + half_b) ** 2

    def nca_pair(rc, rr):
        # NCA (Chen et al. 2024), K = 2: -log s(beta r_w) - 1/2 sum_{y in {w, l}} log s(-beta r_y).
        return -log_sigmoid(beta * rc) - 0.5 * log_sigmoid(-(beta * rc)) - 0.5 * log_sigmoid(-(beta * rr))

    def apo_zero(rc, rr):
        # APO-zero (D'Oosterlinck et al. 2024, eq. 7): -s(beta r_w) + s(beta r_l), shifted by 1 to be >= 0.
        return sigmoid(-(beta * rc)) + sigmoid(beta * rr)

    def apo_down(rc, rr):
        # APO-down (D'Oosterlinck et al. 2024, eq. 8): s(beta r_w) - s(beta (r_w - r_l)), shifted by 1.
        return sigmoid(beta * rc) + sigmoid(-(beta * (rc - rr)))

    def exo_pair(rc, rr):
        # EXO (Ji et al. 2024, eq. 16), K = 2: KL(p_theta || p_rh) with p_theta = softmax(beta r) over {y_w, y_l}
        # and p_rh = (1 - eps, eps); the paper's eps = 1e-3 where none is given.
        e = eps if eps > 0 else 1e-3
        z = beta * (rc - rr)
        return (sigmoid(z) * (log_sigmoid(z) - math.log(1 - e))
                + sigmoid(-z) * (log_sigmoid(-z) - math.log(e)))

    def discopop(rc, rr):
        # DiscoPOP's log-ratio modulated loss (Lu et al. 2024, eq. 5), rho = beta (r_w - r_l), tau = 0.05:
        # (1 - s(rho/tau)) (-log s(rho)) + s(rho/tau) e^-rho; the second term as one exponential, so that it
        # vanishes rather than overflowing when rho is very negative.
        tau = 0.05
        rho = beta * (rc - rr)
        return sigmoid(-rho / tau) * -log_sigmoid(rho) + cmath.exp(log_sigmoid(rho / tau) - rho)

    return dict(sigmoid=sigmoid_, ipo=ipo, hinge=hinge, robust=robust, bco_pair=bco_pair, sppo_hard=sppo_hard,
                nca_pair=nca_pair, apo_zero=apo_zero, apo_down=apo_down, exo_pair=exo_pair, discopop=discopop)


def cpo_reference(beta: float, eps: float, gamma: float):
    # CPO (Xu et al. 2024, eq. 3; summed log-probs, no reference model): -log s(beta (l_w - l_l)), here label
    # smoothed like cDPO; SimPO (Meng et al. 2024): -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma),
    # i.e. the same on length-averaged log-probs with the margin gamma subtracted after the scaling by beta.
    def f(lc, lr):
        z = beta * (lc - lr) - gamma
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return f


def orpo_reference(lc, lr):
    # ORPO (Hong et al. 2024): odds(y|x) = P(y|x) / (1 - P(y|x)) on the length-normalised likelihood
    # P = exp(mean log-prob); the term is log s(log(odds(y_w) / odds(y_l))), and L_ORPO = L_SFT - lambda * term.
    log_odds_w = lc - log1m_exp(lc)
    log_odds_l = lr - log1m_exp(lr)
    return log_sigmoid(log_odds_w - log_odds_l)


def kto_reference(beta: float, z0: float, desirable: bool, w_d: float, w_u: float):
    # KTO (Ethayarajh et al. 2024): L = lambda_y - v(x, y) with v = lambda_D s(beta (r - z0)) for a desirable
    # completion and lambda_U s(beta (z0 - r)) for an undesirable one; lambda_y (1 - s(u)) = lambda_y s(-u).
    if desirable:
        return lambda r: w_d * sigmoid(-(beta * (r - z0)))
    return lambda r: w_u * sigmoid(-(beta * (z0 - r)))


def bradley_terry_reference(rc, rr, m=0.0):
    # Reward modelling, Bradley-Terry with Llama 2's margin (Touvron et al. 2023, eq. 2):
    # -log s(r(x, y_c) - r(x, y_r) - m(r)).
    return -log_sigmoid(rc - rr - m)


def jsd_reference(beta: float, vocab: int):
    # GKD (Agarwal et al. 2024, eq. 1), teacher P and student Q over the vocabulary:
    # JSD(beta)(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; at the ends, by
    # convention, beta = 0 is the forward KL(P || Q) and beta = 1 the reverse KL(Q || P).
    # Arguments: the student's log-probs, then the teacher's.
    def kl(log_a, log_b):
        return sum(cmath.exp(a) * (a - b) for a, b in zip(log_a, log_b))

    def f(*logps):
        student, teacher = logps[:vocab], logps[vocab:]
        if beta == 0:
            return kl(teacher, student)
        if beta == 1:
            return kl(student, teacher)
        mixture = [log_add_exp(math.log(beta) + t, math.log(1 - beta) + s) for s, t in zip(student, teacher)]
        return beta * kl(teacher, mixture) + (1 - beta) * kl(student, mixture)
    return f


# ---- the comparison ----

def on_grid(values) -> torch.Tensor:
    """fp32 inputs on a 1/256 grid: a difference of two of them (|x| < 2^15) is exact in fp32."""
    return torch.tensor([round(float(v) * 256) / 256 for v in values], dtype=torch.float32)


def check_elementwise(module_loss, reference, inputs: list[torch.Tensor], wrt: tuple[int, ...]):
    """module_loss(*inputs) is one loss per element; reference(*floats) is the same for one element. Values and
    the gradients in the inputs ``wrt`` must agree."""
    leaves = [x.clone().requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    out = module_loss(*leaves)
    out.sum().backward()
    expected, expected_grads = [], [[] for _ in wrt]
    for k in range(len(inputs[0])):
        value, grads = value_and_grad(reference, [float(x[k]) for x in inputs], wrt)
        expected.append(value)
        for g, v in zip(expected_grads, grads):
            g.append(v)
    assert_close(out, expected)
    for i, g in zip(wrt, expected_grads):
        assert_close(leaves[i].grad, g, f'gradient in input {i}')


def pair_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-ratios of a dozen ordinary pairs and of pairs far apart (|delta| up to 500)."""
    rng = random.Random(seed)
    rc = [rng.gauss(0, 2) for _ in range(12)] + [60, -60, 250, -250, 3, -3, 0.5]
    rr = [rng.gauss(0, 2) for _ in range(12)] + [-60, 60, -250, 250, 200, -200, 0.25]
    return on_grid(rc), on_grid(rr)


DPO_CASES = [(t, eps) for t in ('sigmoid', 'robust') for eps in (0.0, 0.1, 0.3)] + [
    ('exo_pair', 0.0), ('exo_pair', 1e-3), ('exo_pair', 0.05)] + [
    (t, 0.0) for t in ('ipo', 'hinge', 'bco_pair', 'sppo_hard', 'nca_pair', 'apo_zero', 'apo_down', 'discopop')]


def test_every_dpo_loss_type_has_a_reference():
    assert {t for t, _ in DPO_CASES} == set(dpo_references(1.0, 0.0)) == set(DPO_LOSS_TYPES) - {'sft'}


@pytest.mark.parametrize('beta', [0.1, 1.0, 5.0])
@pytest.mark.parametrize('loss_type, eps', DPO_CASES)
def test_dpo_pair_loss(loss_type, eps, beta):
    rc, rr = pair_inputs()
    if loss_type == 'discopop':  # beta * delta < -88.7 overflows in fp32: test_discopop_very_negative_margin
        keep = beta * (rc - rr) > -80
        rc, rr = rc[keep], rr[keep]
    check_elementwise(lambda c, r: dpo_pair_loss(loss_type, c, r, beta, eps), dpo_references(beta, eps)[loss_type],
                      [rc, rr], wrt=(0, 1))


def test_discopop_very_negative_margin():
    rc, rr = on_grid([-100, -5, -300]), on_grid([0, 100, 700])
    check_elementwise(lambda c, r: dpo_pair_loss('discopop', c, r, 1.0), dpo_references(1.0, 0.0)['discopop'],
                      [rc, rr], wrt=(0, 1))


def test_unknown_dpo_loss_type_names_the_known_ones():
    rc, rr = pair_inputs()
    with pytest.raises(ValueError) as excinfo:
        dpo_pair_loss('sigmoidd', rc, rr, 0.1)
    assert "'sigmoidd'" in str(excinfo.value)
    for known in DPO_LOSS_TYPES:
        assert known in str(excinfo.value)


@pytest.mark.parametrize('beta, eps, gamma', [(0.1, 0.0, 0.0), (0.5, 0.1, 0.0), (2.0, 0.0, 0.5), (10.0, 0.0, 1.6),
                                              (2.5, 0.2, 1.0)])
def test_cpo_and_simpo(beta, eps, gamma):
    rng = random.Random(1)
    summed_c = [-rng.uniform(5, 400) for _ in range(8)] + [-10, -900]   # CPO: summed log-probs
    summed_r = [-rng.uniform(5, 400) for _ in range(8)] + [-900, -10]
    mean_c = [-rng.uniform(0.05, 4) for _ in range(8)] + [-0.01, -30]   # SimPO: length-averaged
    mean_r = [-rng.uniform(0.05, 4) for _ in range(8)] + [-30, -0.01]
    lc, lr = on_grid(summed_c + mean_c), on_grid(summed_r + mean_r)
    check_elementwise(lambda c, r: cpo_pair_loss(c, r, beta, eps=eps, gamma=gamma), cpo_reference(beta, eps, gamma),
                      [lc, lr], wrt=(0, 1))


def test_orpo_odds_ratio_term():
    rng = random.Random(2)
    lc = [-rng.uniform(0.05, 5) for _ in range(10)] + [-0.05, -40, -0.5, -0.0625]
    lr = [-rng.uniform(0.05, 5) for _ in range(10)] + [-40, -0.05, -0.5, -80]
    check_elementwise(orpo_odds_ratio_term, orpo_reference, [on_grid(lc), on_grid(lr)], wrt=(0, 1))


def test_orpo_near_certain_completion():
    lc = torch.tensor([-0.01, -0.002, -1e-5, -1e-8], dtype=torch.float32)
    lr = torch.full_like(lc, -2.0)
    check_elementwise(orpo_odds_ratio_term, orpo_reference, [lr, lc], wrt=(0, 1))
    check_elementwise(orpo_odds_ratio_term, orpo_reference, [lc, lr], wrt=(0, 1))


@pytest.mark.parametrize('beta, z0, w_d, w_u', [(0.1, 0.0, 1.0, 1.0), (1.0, 0.37, 1.0, 1.0), (5.0, 2.5, 1.33, 0.75),
                                                (0.5, 40.0, 1.0, 2.0)])
def test_kto_loss(beta, z0, w_d, w_u):
    rng = random.Random(3)
    logratios = on_grid([rng.gauss(0, 3) for _ in range(12)] + [200, -200, 200, -200])
    desirable = torch.tensor([k % 3 != 0 for k in range(12)] + [True, True, False, False])
    kl = torch.tensor(z0, dtype=torch.float32)   # the reference point z0: a detached scalar

    leaf = logratios.clone().requires_grad_(True)
    out = kto_loss(leaf, desirable, kl, beta, desirable_weight=w_d, undesirable_weight=w_u)
    out.sum().backward()
    expected, expected_grad = [], []
    for r, d in zip(logratios.tolist(), desirable.tolist()):
        value, (grad,) = value_and_grad(kto_reference(beta, z0, d, w_d, w_u), [r], (0,))
        expected.append(value)
        expected_grad.append(grad)
    assert_close(out, expected)
    assert_close(leaf.grad, expected_grad, 'gradient')


@pytest.mark.parametrize('with_margin', [False, True])
def test_bradley_terry_loss(with_margin):
    rng = random.Random(4)
    rc = on_grid([rng.gauss(0, 2) for _ in range(10)] + [300, -300, 1.0])
    rr = on_grid([rng.gauss(0, 2) for _ in range(10)] + [-300, 300, 1.0])
    if not with_margin:
        check_elementwise(bradley_terry_loss, bradley_terry_reference, [rc, rr], wrt=(0, 1))
        return
    margin = on_grid([rng.choice([0.0, 0.5, 1.0, 3.0]) for _ in range(13)])
    check_elementwise(bradley_terry_loss, bradley_terry_reference, [rc, rr, margin], wrt=(0, 1))


VOCAB = 16


def token_logprobs(seed: int) -> torch.Tensor:
    """fp32 log-probs of six tokens from flat to very peaked (logits scaled up to 80: log-probs down to ~ -500)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.5, 1.0, 3.0, 10.0, 30.0, 80.0]).unsqueeze(-1)
    return torch.log_softmax(torch.randn(6, VOCAB, generator=gen) * scales, dim=-1)


@pytest.mark.parametrize('beta', [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd(beta):
    student, teacher = token_logprobs(5), token_logprobs(6)
    leaf = student.clone().requires_grad_(True)
    out = generalized_jsd(leaf, teacher, beta)
    out.sum().backward()
    reference = jsd_reference(beta, VOCAB)
    expected, expected_grad = [], []
    for s, t in zip(student.double().tolist(), teacher.double().tolist()):
        value, grads = value_and_grad(reference, s + t, tuple(range(VOCAB)))
        expected.append(value)
        expected_grad.append(grads)
    assert_close(out, expected)
    assert_close(leaf.grad, expected_grad, 'gradient')


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0])
def test_generalized_jsd_vocab_sharded(beta):
    """Two 'tensor-parallel ranks' (threads) each hold part of the vocabulary; their vocab_sum adds the other
    rank's partial sum (an all-reduce whose backward passes the gradient through to the local shard). Every rank
    gets the whole-vocabulary loss, and the shards' gradients put together are the whole one's."""
    student, teacher = token_logprobs(7), token_logprobs(8)
    full_leaf = student.clone().requires_grad_(True)
    full = generalized_jsd(full_leaf, teacher, beta)
    full.sum().backward()

    shards = [slice(0, 7), slice(7, VOCAB)]
    partials: list[list[torch.Tensor]] = [[], []]
    barrier = threading.Barrier(2, timeout=10)
    results: list = [None, None]

    def rank(r: int):
        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            local = t.sum(-1)
            partials[r].append(local.detach())
            barrier.wait()
            return local + partials[1 - r][len(partials[r]) - 1]
        try:
            leaf = student[:, shards[r]].clone().requires_grad_(True)
            out = generalized_jsd(leaf, teacher[:, shards[r]], beta, vocab_sum=all_reduce_sum)
            out.sum().backward()
            results[r] = (out.detach(), leaf.grad)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test's thread
            barrier.abort()
            results[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        if isinstance(res, BaseException):
            raise res
    assert len(partials[0]) == len(partials[1]) > 0   # the hook did the summing
    for out, _ in results:
        assert_close(out, full)
    assert_close(torch.cat([results[0][1], results[1][1]], dim=-1), full_leaf.grad, 'gradient')
