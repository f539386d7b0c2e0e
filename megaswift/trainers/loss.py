"""Token-level losses on vocab-parallel logits, normalised so the result does not depend on the layout.

The language-model loss of one optimizer step is

    sum over every loss token t of the step (all micro-batches, all DP ranks) of loss_scale[t] * ce[t]
    ----------------------------------------------------------------------------------------------
    number of loss tokens of the step (all micro-batches, all DP ranks)

Each micro-batch contributes ``sum(loss_scale * ce) / N`` where ``N`` is that global count, computed and
all-reduced across DP *before* the forward passes (``global_token_count``). The DDP gradient reduction then
*sums* over DP ranks (``calculate_per_token_loss=True`` in the model config) and the pipeline schedule sums
over micro-batches, so the gradient equals the single-process gradient of the same step whatever TP/PP/DP
and micro-batch split produced it.

Cross entropy uses megatron-core's ``vocab_parallel_cross_entropy`` on a copy of the logits (it overwrites its
input). Label smoothing is computed here from the full-vocabulary log-sum-exp and the sum of the logits, both
all-reduced across TP, because megatron-core's own smoothing averages over the local vocab shard only
(NVIDIA/Megatron-LM#737). Logits of the padded vocabulary entries (ids >= the tokenizer's vocab size) are
masked out of the softmax, the smoothing term and the argmax, so the loss equals the HF model's.
"""
from __future__ import annotations

import torch

_NEG = -1e30  # a padded vocab entry's logit: exp() is exactly 0 and no inf-inf NaN can arise


def _tp_info(tp_group):
    if tp_group is None or not torch.distributed.is_initialized():
        return None, 1, 0
    return tp_group, tp_group.size(), tp_group.rank()


def _padded_mask(shard: int, vocab_size: int, tp_rank: int, device) -> torch.Tensor | None:
    """Bool [shard]: True for this rank's vocab entries past ``vocab_size`` (None when there are none)."""
    start = tp_rank * shard
    if start + shard <= vocab_size:
        return None
    return torch.arange(start, start + shard, device=device) >= vocab_size


def prepare_logits(logits: torch.Tensor, vocab_size: int | None, tp_group=None) -> torch.Tensor:
    """fp32 logits with the padded vocab entries set to a huge negative value (a new tensor, autograd-safe)."""
    group, tp, rank = _tp_info(tp_group)
    z = logits.float()
    if vocab_size is not None:
        pad = _padded_mask(z.size(-1), vocab_size, rank, z.device)
        if pad is not None:
            return z.masked_fill(pad, _NEG)
    return z


def vocab_parallel_token_loss(logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int | None = None,
                              label_smoothing: float = 0.0, tp_group=None) -> torch.Tensor:
    """Per-token loss (fp32, shape of ``target``) of logits ``[..., V/tp]`` split over ``tp_group``.

    Positions whose target is ``IGNORE_INDEX`` get a finite value the caller must mask out.
    With ``label_smoothing = e``: ``(1 - e) * nll + e * (logsumexp(z) - mean_v z_v)``, the mean over the real
    vocabulary (``vocab_size`` entries), i.e. ``torch.nn.functional.cross_entropy(..., label_smoothing=e)``.
    """
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
    group, tp, rank = _tp_info(tp_group)
    z = prepare_logits(logits, vocab_size, tp_group)
    safe_target = target.clamp(min=0)
    if tp > 1:
        nll = tensor_parallel.vocab_parallel_cross_entropy(z.clone(), safe_target)  # mutates its input: a copy
    else:
        nll = _local_cross_entropy(z, safe_target)
    if not label_smoothing:
        return nll
    n_vocab = vocab_size if vocab_size is not None else z.size(-1) * tp
    z_max = z.detach().max(dim=-1).values
    if tp > 1:
        torch.distributed.all_reduce(z_max, op=torch.distributed.ReduceOp.MAX, group=group)
    sum_exp = torch.exp(z - z_max.unsqueeze(-1)).sum(dim=-1)
    pad = _padded_mask(z.size(-1), n_vocab, rank, z.device)
    sum_z = (z if pad is None else z.masked_fill(pad, 0.0)).sum(dim=-1)
    if tp > 1:  # forward: all-reduce; backward: identity (every TP rank holds the same replicated loss)
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=group)
        sum_z = reduce_from_tensor_model_parallel_region(sum_z, group=group)
    lse = z_max + torch.log(sum_exp)
    smooth = lse - sum_z / n_vocab
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth


def _local_cross_entropy(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy of unsplit logits (TP = 1): the same numbers as megatron-core's, without its collectives."""
    return torch.nn.functional.cross_entropy(z.reshape(-1, z.size(-1)), target.reshape(-1),
                                             reduction='none').view(target.shape)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int | None = None, tp_group=None) -> torch.Tensor:
    """Global token ids of the largest logit (first one on ties, as ``torch.argmax`` over the full vocab)."""
    group, tp, rank = _tp_info(tp_group)
    z = prepare_logits(logits, vocab_size, tp_group)
    shard = z.size(-1)
    local_max, local_idx = z.max(dim=-1)
    local_idx = local_idx + rank * shard
    if tp == 1:
        return local_idx
    maxes = [torch.empty_like(local_max) for _ in range(tp)]
    idxs = [torch.empty_like(local_idx) for _ in range(tp)]
    torch.distributed.all_gather(maxes, local_max.contiguous(), group=group)
    torch.distributed.all_gather(idxs, local_idx.contiguous(), group=group)
    best = torch.stack(maxes).argmax(dim=0, keepdim=True)  # the lowest rank among equal maxima
    return torch.stack(idxs).gather(0, best).squeeze(0)


def global_token_count(local_count, dp_group=None, device=None) -> torch.Tensor:
    """The step's normaliser (loss tokens, pairs, ...; a number or a list of them) summed over all DP ranks (a
    float tensor of one entry per number, each >= 1 to keep all-masked steps finite)."""
    counts = local_count if isinstance(local_count, (list, tuple)) else [local_count]
    total = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=device)
    if dp_group is not None and torch.distributed.is_initialized() and dp_group.size() > 1:
        torch.distributed.all_reduce(total, group=dp_group)
    return total.clamp(min=1.0).to(torch.float32)
