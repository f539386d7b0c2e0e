"""The one forward call of a megatron-core model chunk, and the one way to run it over micro-batches.

Training, evaluation, in-trainer generation, frozen reference/teacher passes and the export precision check
all call ``model_forward``: a batch dict (``input_ids``, ``position_ids``, optional ``packed_seq_params``, the
only carrier of sequence boundaries) in, the chunk's output out (logits, or hidden states when the head is fused
into the loss; an intermediate activation on an earlier pipeline stage). ``run_schedule`` drives
``model_forward`` through megatron-core's pipeline schedule (1F1B, interleaved, or none), forward-only or with
backward.
"""
from __future__ import annotations

from typing import Callable

import torch


def model_forward(model, batch: dict, keep_dtype: bool = False) -> torch.Tensor:
    """``model``'s output for ``batch``; ``keep_dtype`` keeps a half-precision model's output in its dtype (the
    fused head casts itself) instead of megatron-core's float32 copy."""
    kwargs = {'fp32_output': False} if keep_dtype else {}
    return model(input_ids=batch['input_ids'], position_ids=batch['position_ids'], attention_mask=None,
                 packed_seq_params=batch.get('packed_seq_params'), **kwargs)


def run_schedule(models: list, batches: list[dict], forward_step: Callable, forward_only: bool) -> list:
    """megatron-core's forward(-backward) schedule over ``batches`` (one micro-batch each) on this rank's
    ``models`` (one chunk per virtual pipeline stage). ``forward_step(batch_iterator, model)`` returns
    ``(output, loss_func)`` as megatron-core expects; the result is the last stage's list of loss_func dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    iters = [iter(batches) for _ in models]
    seq = max(int(b['input_ids'].shape[1]) for b in batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0], model=models,
        num_microbatches=len(batches), seq_length=seq, micro_batch_size=int(batches[0]['input_ids'].shape[0]),
        forward_only=forward_only)


__all__ = ['model_forward', 'run_schedule']
