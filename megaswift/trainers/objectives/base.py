"""The objective interface: what the training loop asks of a loss, and what a loss gets from the model.

The loop (``trainers/loop.py``) runs megatron-core's schedule over a step's micro-batches and knows nothing of
any particular loss. An ``Objective`` tells it

- ``head``: which head the trained model ends in ('lm': the language-model head; 'value': a scalar value head);
- ``frozen_models``: the extra frozen models it needs ('ref', 'teacher'), built in the same parallel layout
  without an optimizer (``trainers/model.py: build_frozen_models``); before each step the loop runs them
  forward-only over the step's micro-batches and lets ``frozen_outputs`` store what the loss needs in the
  batch (e.g. ``batch['ref_logps']``) on the last pipeline stage;
  The name 'policy' is the trained model itself, run forward-only without gradients (KTO's KL reference point,
  GRPO's old log-probs); 'ref' under LoRA without ``--ref_model`` is the trained model with its adapters off;
- ``template_mode`` and ``sequences``: how a dataset row is encoded ('train', 'rlhf' pairs, 'kto') and the model
  sequences one encoded sample holds (``('chosen_', 'rejected_')``: a pair, packed as two sequences);
- ``columns``: the encoded columns the collator must carry besides ``input_ids``/``labels``/``loss_scale``;
- ``count(batch)``: what one micro-batch adds to the step's normaliser (loss tokens for SFT, pairs for DPO), or
  a dict of several (pairs and chosen tokens); the loop sums each over the step's micro-batches and
  data-parallel ranks and hands the totals to ``loss`` as ``batch['loss_denominator']`` (a tensor, or a dict
  of them), so any layout follows the single-process trajectory;
- ``rollout(batches, rollout)``: the step's micro-batches to train on, before the frozen passes: the dataset's
  (default), or completions generated from their prompts by the policy or a frozen model (``trainers/rollout.py``;
  GKD on-policy and ``--seq_kd``);
- ``prepare_step(batches, parallel)``: called after the frozen passes with all of the step's micro-batches (a
  step-level quantity such as KTO's reference point, all-reduced over data-parallel ranks, goes in here);
- ``loss(output, batch, evaluate)``: the micro-batch loss, with the contract of megatron-core's schedules
  (``calculate_per_token_loss``): ``(loss already divided by the step denominator, local count, metrics)``.
  ``metrics`` maps each name of ``train_metrics`` (or ``eval_metrics``) to a ``[sum, count]`` float64 pair,
  which the loop sums over micro-batches and ranks and logs as ``sum / count``.

``ModelOutput`` hides whether the LM head is fused into the loss: token losses, log-probs and log-sum-exps
come from ``megaswift.ops.linear_cross_entropy`` on the hidden states (no ``N x V`` logits) or from the
vocab-parallel logits, with the same numbers either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...utils.constants import IGNORE_INDEX


@dataclass
class ModelOutput:
    """One micro-batch's output of the last pipeline stage."""
    output: torch.Tensor                   # [b, s, H] hidden states (head fused) or [b, s, V/tp] logits (or values)
    head_weight: Optional[torch.Tensor]    # this rank's [V/tp, H] output-layer shard when the head is fused
    vocab_size: Optional[int]              # the real vocabulary (padded entries are left out)
    tp_group: Any = None
    impl: str = 'chunked'                  # 'chunked' / 'cuda' (fused head) or 'torch' (logits)

    @property
    def fused(self) -> bool:
        return self.head_weight is not None

    def weighted_loss_sum(self, labels: torch.Tensor, weights: torch.Tensor, label_smoothing: float = 0.0):
        """``sum_t weights[t] * ce[t]``; with the fused head its gradient is computed in the same pass."""
        if self.fused:
            from ...ops import linear_cross_entropy
            return linear_cross_entropy(self.output, self.head_weight, labels, loss_scale=weights, reduction='sum',
                                        tp_group=self.tp_group, label_smoothing=label_smoothing,
                                        vocab_size=self.vocab_size, impl=self.impl)
        return (self.token_losses(labels, label_smoothing)[0] * weights).sum()

    def token_losses(self, labels: torch.Tensor, label_smoothing: float = 0.0, with_argmax: bool = False):
        """``(per-token cross entropy, argmax ids or None)``; positions labelled ``IGNORE_INDEX`` hold a finite
        value the caller masks out."""
        if self.fused:
            from ...ops import linear_cross_entropy
            res = linear_cross_entropy(self.output, self.head_weight, labels, reduction='none',
                                       tp_group=self.tp_group, label_smoothing=label_smoothing,
                                       vocab_size=self.vocab_size, impl=self.impl, return_argmax=with_argmax)
            return (res.loss, res.argmax) if with_argmax else (res, None)
        from ..loss import vocab_parallel_argmax, vocab_parallel_token_loss
        per_token = vocab_parallel_token_loss(self.output, labels, vocab_size=self.vocab_size,
                                              label_smoothing=label_smoothing, tp_group=self.tp_group)
        pred = vocab_parallel_argmax(self.output.detach(), self.vocab_size, self.tp_group) if with_argmax else None
        return per_token, pred

    def token_logprobs(self, labels: torch.Tensor) -> torch.Tensor:
        """``log p(labels[t])`` per token (differentiable), 0 where ``labels`` is ``IGNORE_INDEX``."""
        per_token, _ = self.token_losses(labels)
        return (-per_token).masked_fill(labels == IGNORE_INDEX, 0.0)

    def scaled(self, temperature: float) -> 'ModelOutput':
        """The output whose logits are divided by ``temperature`` (the hidden states scale alike when the head is
        fused: the head is linear)."""
        if temperature == 1.0:
            return self
        return ModelOutput(self.output / temperature, self.head_weight, self.vocab_size, self.tp_group, self.impl)

    def masked(self, mask: torch.Tensor) -> 'ModelOutput':
        """The output at the positions where ``mask`` (shaped like the input ids) is true: ``[n, ...]``."""
        return ModelOutput(self.output[mask], self.head_weight, self.vocab_size, self.tp_group, self.impl)

    @torch.no_grad()
    def argmax(self) -> torch.Tensor:
        """The global id of the largest logit per position (the first on ties, as over the full vocabulary)."""
        if self.fused:
            from ...ops import linear_cross_entropy
            dummy = torch.zeros(self.output.shape[:-1], dtype=torch.long, device=self.output.device)
            return linear_cross_entropy(self.output, self.head_weight, dummy, reduction='none',
                                        tp_group=self.tp_group, vocab_size=self.vocab_size, impl=self.impl,
                                        return_argmax=True).argmax
        from ..loss import vocab_parallel_argmax
        return vocab_parallel_argmax(self.output, self.vocab_size, self.tp_group)

    def vocab_parallel_logits(self) -> torch.Tensor:
        """This rank's ``[b, s, V/tp]`` float32 logits (materialised: for small vocabularies or short rows)."""
        from ..loss import prepare_logits
        if not self.fused:
            return prepare_logits(self.output, self.vocab_size, self.tp_group)
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
        hidden = self.output
        if _tp_size(self.tp_group) > 1:  # backward: the hidden states' gradient summed over the vocab shards
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        logits = torch.matmul(hidden, self.head_weight.t())
        return prepare_logits(logits, self.vocab_size, self.tp_group)

    def log_softmax(self) -> torch.Tensor:
        """This rank's ``[..., V/tp]`` share of the full-vocabulary log-softmax (differentiable, correct under TP;
        materialises the logits: use on selected positions, ``masked``)."""
        z = self.vocab_parallel_logits()
        lse = self._log_sum_exp(z)
        if _tp_size(self.tp_group) > 1:
            # every rank's shard uses the shared normaliser: its gradient is the sum of all ranks' (the loss is
            # summed over the shards by ``vocab_sum``), while the all-reduce inside passes gradients unchanged
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
            lse = copy_to_tensor_model_parallel_region(lse, group=self.tp_group)
        return z - lse.unsqueeze(-1)

    def log_sum_exp(self) -> torch.Tensor:
        """``log sum_v exp(z_v)`` over the full vocabulary, per token (differentiable, correct under TP)."""
        return self._log_sum_exp(self.vocab_parallel_logits())

    def _log_sum_exp(self, z: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
        z_max = z.detach().max(dim=-1).values
        if _tp_size(self.tp_group) > 1:
            torch.distributed.all_reduce(z_max, op=torch.distributed.ReduceOp.MAX, group=self.tp_group)
        sum_exp = torch.exp(z - z_max.unsqueeze(-1)).sum(dim=-1)
        if _tp_size(self.tp_group) > 1:
            sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=self.tp_group)
        return z_max + torch.log(sum_exp)

    def vocab_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (``[..., V/tp]``) summed over the full vocabulary (differentiable all-reduce under TP)."""
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
        total = values.sum(-1)
        if _tp_size(self.tp_group) > 1:
            total = reduce_from_tensor_model_parallel_region(total, group=self.tp_group)
        return total


def _tp_size(group) -> int:
    return group.size() if group is not None and torch.distributed.is_initialized() else 1


def metric_pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The ``[sum, count]`` float64 pair the loop reduces over micro-batches and ranks."""
    return torch.stack([total.detach().double(), count.detach().double()])


class Objective:
    """Base class of the training objectives (see the module docstring for the contract)."""
    head: str = 'lm'
    frozen_models: tuple[str, ...] = ()
    template_mode: str = 'train'
    sequences: tuple[str, ...] = ('',)
    columns: tuple[str, ...] = ()
    normalisers: tuple[str, ...] = ()  # the names of ``count``'s dict; empty: it returns one number
    train_metrics: tuple[str, ...] = ('loss',)
    eval_metrics: tuple[str, ...] = ('loss',)

    def __init__(self, args):
        self.args = args

    def count(self, batch: dict) -> int | dict[str, int]:
        """This micro-batch's share of the step's normaliser (default: its loss tokens)."""
        return int((batch['labels'] != IGNORE_INDEX).sum())

    @classmethod
    def check_data(cls, encoded, args) -> None:
        """A look at the encoded training set before training (e.g. KTO's label balance); default: nothing."""

    def rollout(self, batches: list[dict], rollout) -> list[dict]:
        """The step's micro-batches to train on: ``batches`` (collated from the dataset; the default), or what
        ``rollout`` (``trainers.rollout.Rollout``) generates from their prompts. Called before the frozen passes,
        on every rank with the same decision."""
        return batches

    def prepare_step(self, batches: list[dict], parallel) -> None:
        """Step-level preparation after the frozen passes (default: nothing)."""

    def loss(self, output: ModelOutput, batch: dict, evaluate: bool = False):
        raise NotImplementedError

    def frozen_outputs(self, name: str, output: ModelOutput, batch: dict) -> dict[str, torch.Tensor]:
        """What the frozen model ``name`` contributes to ``batch`` (called under ``no_grad`` on the last stage)."""
        raise NotImplementedError(f'{type(self).__name__} declares frozen model {name!r} but no frozen_outputs')

    def metric_names(self, evaluate: bool) -> tuple[str, ...]:
        return self.eval_metrics if evaluate else self.train_metrics


def build_objective(name: str, args) -> Objective:
    """The objective registered as ``name`` in ``losses``, built for ``args``."""
    from .registry import losses
    return losses.lookup(name, flag='--loss_type')(args)


__all__ = ['ModelOutput', 'Objective', 'build_objective', 'metric_pair']
