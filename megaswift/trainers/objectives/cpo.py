"""Reference-free preference objectives on chosen/rejected pairs (no frozen model):

- CPO (Xu et al. 2024):   sum_pairs -log s(beta (lc - lr)) / pairs  +  cpo_alpha * NLL(chosen) / chosen tokens,
  ``lc``/``lr`` the summed log-probs of the chosen/rejected responses (``--cpo_alpha`` default 1);
- SimPO (Meng et al. 2024): sum_pairs -log s(beta (lc - lr) - gamma) / pairs on length-averaged log-probs with
  the target margin ``gamma`` (``--simpo_gamma``), plus ``--cpo_alpha`` * NLL when given (default 0);
- ORPO (Hong et al. 2024):  NLL(chosen) / chosen tokens  -  beta * sum_pairs log s(log odds_c - log odds_r) / pairs,
  odds = P / (1 - P) of the length-averaged probability (``--beta`` is the paper's lambda).

``--label_smoothing`` flips preference labels with that probability (CPO, SimPO). Rewards are ``beta * logp``.
"""
from __future__ import annotations

from .base import ModelOutput, metric_pair
from .dpo import PairObjective, reward_metrics
from .preference_losses import cpo_pair_loss, orpo_odds_ratio_term
from .registry import losses
from .sequences import sequence_logps


@losses.register('cpo')
class CpoObjective(PairObjective):
    length_normalised = False
    default_alpha = 1.0

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta)
        self.eps = float(getattr(args, 'label_smoothing', 0.0) or 0.0)
        alpha = getattr(args, 'cpo_alpha', None)
        self.alpha = float(self.default_alpha if alpha is None else alpha)
        self.gamma = 0.0

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        logps = sequence_logps(output, batch)
        values = logps.means if self.length_normalised else logps.sums
        chosen, rejected = logps.pairs(values)
        pair_losses = cpo_pair_loss(chosen, rejected, self.beta, self.eps, self.gamma)
        metrics = reward_metrics(self.beta * chosen.detach(), self.beta * rejected.detach(), chosen.detach(),
                                 rejected.detach())
        return self.finish(pair_losses, self.chosen_nll(logps, batch), self.alpha, batch, metrics)


@losses.register('simpo')
class SimpoObjective(CpoObjective):
    length_normalised = True
    default_alpha = 0.0

    def __init__(self, args):
        super().__init__(args)
        self.gamma = float(getattr(args, 'simpo_gamma', 1.0))


@losses.register('orpo')
class OrpoObjective(PairObjective):
    train_metrics = eval_metrics = PairObjective.train_metrics + ('log_odds_ratio',)

    def __init__(self, args):
        super().__init__(args)
        self.beta = float(args.beta)

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        logps = sequence_logps(output, batch)
        chosen, rejected = logps.pairs(logps.means)
        ratio = orpo_odds_ratio_term(chosen, rejected)
        metrics = reward_metrics(self.beta * chosen.detach(), self.beta * rejected.detach(), chosen.detach(),
                                 rejected.detach())
        loss, count, metrics = self.finish(-self.beta * ratio, self.chosen_nll(logps, batch), 1.0, batch, metrics)
        metrics['log_odds_ratio'] = metric_pair(ratio.sum(), ratio.new_tensor(float(ratio.numel())))
        return loss, count, metrics


__all__ = ['CpoObjective', 'OrpoObjective', 'SimpoObjective']
