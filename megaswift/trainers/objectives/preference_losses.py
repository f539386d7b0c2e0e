"""The preference and distillation losses, each as its paper writes it, on per-sequence (or per-token) tensors.

Notation: ``rc``/``rr`` are the policy-minus-reference log-probability ratios of the chosen/rejected responses
(``log pi(y|x) - log pi_ref(y|x)``), ``beta`` the inverse temperature, ``eps`` the label smoothing (the
probability that a preference label is flipped). Every function returns one loss per pair (or per sample,
per token), unreduced: the objectives sum them and divide by the step's global count, so any data-parallel
layout and any micro-batching gives the same step loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ('sigmoid', 'ipo', 'hinge', 'robust', 'bco_pair', 'sppo_hard', 'nca_pair', 'apo_zero', 'apo_down',
                  'exo_pair', 'discopop', 'sft')
DISCOPOP_TAU = 0.05   # the temperature of DiscoPOP's log-ratio modulation (Chris Lu et al. 2024)
EXO_DEFAULT_EPS = 1e-3  # EXO needs eps > 0 (a log of it); its paper's default


def dpo_pair_loss(loss_type: str, rc: torch.Tensor, rr: torch.Tensor, beta: float,
                  eps: float = 0.0) -> torch.Tensor:
    """One DPO-family loss per pair (``sft`` is the chosen NLL, computed by the objective, not here).

    - sigmoid (DPO, Rafailov et al. 2023; conservative DPO with ``eps``): -(1-eps) log s(b D) - eps log s(-b D)
    - ipo (Azar et al. 2023, on length-averaged log-probs): (D - 1/(2b))^2
    - hinge (SLiC, Zhao et al. 2023): max(0, 1 - b D)
    - robust (rDPO, Chowdhury et al. 2024): (-(1-eps) log s(b D) + eps log s(-b D)) / (1 - 2 eps)
    - bco_pair (BCO, Jung et al. 2024, without its running reward shift): -log s(b rc) - log s(-b rr)
    - sppo_hard (SPPO, Wu et al. 2024): (rc - 1/(2b))^2 + (rr + 1/(2b))^2
    - nca_pair (NCA, Chen et al. 2024): -log s(b rc) - 1/2 log s(-b rc) - 1/2 log s(-b rr)
    - apo_zero / apo_down (APO, D'Oosterlinck et al. 2024): 1 - s(b rc) + s(b rr) / s(b rc) + 1 - s(b D)
    - exo_pair (EXO, Ji et al. 2024): s(b D)(log s(b D) - log(1-eps)) + s(-b D)(log s(-b D) - log eps)
    - discopop (DiscoPOP, Lu et al. 2024): m = s(b D / tau); (1-m)(-log s(b D)) + m exp(-b D)
    with D = rc - rr and s the logistic function.
    """
    delta = rc - rr
    z = beta * delta
    if loss_type == 'sigmoid':
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == 'ipo':
        return (delta - 1 / (2 * beta)) ** 2
    if loss_type == 'hinge':
        return torch.relu(1 - z)
    if loss_type == 'robust':
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == 'bco_pair':
        return -F.logsigmoid(beta * rc) - F.logsigmoid(-beta * rr)
    if loss_type == 'sppo_hard':
        return (rc - 1 / (2 * beta)) ** 2 + (rr + 1 / (2 * beta)) ** 2
    if loss_type == 'nca_pair':
        return -F.logsigmoid(beta * rc) - 0.5 * F.logsigmoid(-beta * rc) - 0.5 * F.logsigmoid(-beta * rr)
    if loss_type == 'apo_zero':
        return 1 - torch.sigmoid(beta * rc) + torch.sigmoid(beta * rr)
    if loss_type == 'apo_down':
        return torch.sigmoid(beta * rc) + 1 - torch.sigmoid(z)
    if loss_type == 'exo_pair':
        e = eps or EXO_DEFAULT_EPS
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    if loss_type == 'discopop':  # m exp(-z) as exp(log m - z): no 0 * inf when z is very negative
        m_log = F.logsigmoid(z / DISCOPOP_TAU)
        return torch.sigmoid(-z / DISCOPOP_TAU) * -F.logsigmoid(z) + torch.exp(m_log - z)
    if loss_type == 'sft':
        raise ValueError("loss type 'sft' is the chosen responses' NLL, which the DPO objective adds itself")
    raise ValueError(f'unknown DPO loss type {loss_type!r} (one of {", ".join(DPO_LOSS_TYPES)})')


def cpo_pair_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, eps: float = 0.0,
                  gamma: float = 0.0) -> torch.Tensor:
    """CPO (Xu et al. 2024; summed log-probs) and SimPO (Meng et al. 2024; length-averaged log-probs and a target
    margin ``gamma``): -(1-eps) log s(b (lc - lr) - gamma) - eps log s(-(b (lc - lr) - gamma)), no reference."""
    z = beta * (chosen_logps - rejected_logps) - gamma
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def orpo_odds_ratio_term(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """ORPO (Hong et al. 2024): log s(log odds(y_w) - log odds(y_l)) with odds(y) = P(y) / (1 - P(y)) on the
    length-averaged log-probability; the loss is NLL(chosen) - lambda * this term."""
    # log(1 - P) as log(-expm1(log P)): exact for P near 1, where log1p(-exp(.)) cancels
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        torch.log(-torch.expm1(chosen_avg_logps)) - torch.log(-torch.expm1(rejected_avg_logps)))
    return F.logsigmoid(log_odds)


def kto_loss(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024), one loss per completion: with the reference point ``kl`` (z0, detached),
    desirable: wD (1 - s(b (r - z0))); undesirable: wU (1 - s(b (z0 - r))), r = log pi - log pi_ref."""
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, chosen, rejected)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Reward modelling (Bradley-Terry; Llama 2's margin): -log s(r_c - r_r - margin) per pair."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def generalized_jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float,
                    vocab_sum=None) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024) per token, from log-probabilities over
    the vocabulary (last dim; ``vocab_sum`` sums over it, e.g. across tensor-parallel shards):
    beta = 0: KL(teacher || student); beta = 1: KL(student || teacher); otherwise with the mixture
    M = (1-beta) S + beta T: beta KL(T || M) + (1-beta) KL(S || M)."""
    vocab_sum = vocab_sum if vocab_sum is not None else (lambda t: t.sum(-1))
    if beta == 0:
        return vocab_sum(teacher_logprobs.exp() * (teacher_logprobs - student_logprobs))
    if beta == 1:
        return vocab_sum(student_logprobs.exp() * (student_logprobs - teacher_logprobs))
    mixture = torch.logaddexp(student_logprobs + math.log(1 - beta), teacher_logprobs + math.log(beta))
    kl_teacher = vocab_sum(teacher_logprobs.exp() * (teacher_logprobs - mixture))
    kl_student = vocab_sum(student_logprobs.exp() * (student_logprobs - mixture))
    return beta * kl_teacher + (1 - beta) * kl_student


__all__ = ['DPO_LOSS_TYPES', 'bradley_terry_loss', 'cpo_pair_loss', 'dpo_pair_loss', 'generalized_jsd',
           'kto_loss', 'orpo_odds_ratio_term']
