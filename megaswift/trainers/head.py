"""The LM head fused into the loss: the last pipeline stage hands its hidden states (not logits) to the loss
function, which runs ``megaswift.ops.linear_cross_entropy`` against the output-layer weight.

megatron-core's ``GPTModel`` always calls ``self.output_layer(hidden, weight=...)`` and returns what it gives
(transposed to ``[b, s, ...]``). ``fuse_head_into_loss`` turns that layer into a ``HiddenStatesOutputLayer``:
the same ``ColumnParallelLinear`` parameters (state-dict keys, DDP buckets, optimizer, checkpoints unchanged)
whose forward returns the hidden states, gathered from the sequence-parallel region when ``--sequence_parallel``
is on. That gather's backward only splits the gradient, because ``linear_cross_entropy`` already returns the
TP-summed gradient of the hidden states. Setting ``emit_hidden_states = False`` restores plain logits.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


class HiddenStatesOutputLayer(ColumnParallelLinear):
    emit_hidden_states = True

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.emit_hidden_states:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if self.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return input_, None


def fuse_head_into_loss(models: list) -> bool:
    """Make every last-stage chunk of ``models`` (unwrapped ``GPTModel``s) emit hidden states; True if any did."""
    fused = False
    for model in models:
        layer = getattr(model, 'output_layer', None)
        if getattr(model, 'post_process', False) and isinstance(layer, ColumnParallelLinear):
            layer.__class__ = HiddenStatesOutputLayer
            fused = True
    return fused


def head_weight(model) -> torch.Tensor:
    """The output-layer weight the loss must use (the shared embedding when input and output are tied)."""
    if getattr(model, 'share_embeddings_and_output_weights', False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def resolve_cross_entropy_impl(requested: str, device: torch.device) -> str:
    """--cross_entropy_impl auto -> 'cuda' when the extension runs on ``device``, else 'chunked'."""
    from ..ops.linear_ce import best_impl
    if requested == 'auto':
        return best_impl(device)
    if requested == 'cuda':
        if device.type != 'cuda':
            from ..utils.errors import UserError
            raise UserError('--cross_entropy_impl cuda needs a GPU; use chunked (or auto) on CPU')
        from ..ops.linear_ce import row_ops
        row_ops('cuda', device)  # builds/loads the extension and checks it now, not at the first step
    return requested
