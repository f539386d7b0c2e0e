"""The head a trained model ends in: the language-model head (optionally fused into the loss) or a scalar
value head (reward models, critics).

megatron-core's ``GPTModel`` always calls ``self.output_layer(hidden, weight=..., runtime_gather_output=...)``
and returns what it gives (transposed to ``[b, s, ...]``); both heads below plug in there.

- ``fuse_head_into_loss`` turns the LM head into a ``HiddenStatesOutputLayer``: the same ``ColumnParallelLinear``
  parameters (state-dict keys, DDP buckets, optimizer, checkpoints unchanged) whose forward returns the hidden
  states, gathered from the sequence-parallel region when ``--sequence_parallel`` is on. That gather's backward
  only splits the gradient, because ``linear_cross_entropy`` already returns the TP-summed gradient of the hidden
  states. Setting ``emit_hidden_states = False`` restores plain logits.
- ``attach_value_head`` replaces the LM head with a ``ValueHead``: one ``[1, H]`` weight, replicated on every
  tensor-parallel rank, giving one float per position (``[b, s, 1]``). Every TP rank sees the full sequence
  (gathered under sequence parallelism) and computes the same value and the same weight gradient, so no TP
  reduction is needed; the embeddings are no longer tied to an output layer.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

HEADS = ('lm', 'value')


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


VALUE_HEAD_HF_NAME = 'score.weight'  # transformers' *ForSequenceClassification head ([num_labels, H])


def value_head_rule():
    """The weight rule of a ``ValueHead``: HF ``score.weight``, replicated over TP (``convert.py`` uses it in place
    of the LM head's rule, so the saved model loads as ``AutoModelForSequenceClassification``)."""
    from .weights import WeightRule
    return WeightRule('output_layer.weight', (VALUE_HEAD_HF_NAME,))


def has_value_head(model) -> bool:
    return isinstance(getattr(model, 'output_layer', None), ValueHead)


def sequence_classification_config(hf_config, pad_token_id):
    """A copy of ``hf_config`` for the value-head model as transformers' sequence classifier (one label)."""
    import copy
    cfg = copy.deepcopy(hf_config)
    cfg.architectures = [a.replace('ForCausalLM', 'ForSequenceClassification') for a in
                         (getattr(hf_config, 'architectures', None) or [])] or None
    cfg.num_labels = 1
    cfg.tie_word_embeddings = False
    if getattr(cfg, 'pad_token_id', None) is None:
        cfg.pad_token_id = pad_token_id  # transformers finds each row's last token through it
    return cfg


class ValueHead(torch.nn.Module):
    """``[s, b, H] -> [s, b, 1]``: a scalar per position, the same on every tensor-parallel rank."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool, tp_group, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # the same initial weight at every layout
        init = torch.randn(1, hidden_size, generator=generator, dtype=torch.float32) / hidden_size ** 0.5
        device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.weight = torch.nn.Parameter(init.to(dtype=dtype, device=device))
        self.sequence_parallel, self.tp_group = bool(sequence_parallel), tp_group

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return torch.matmul(input_, self.weight.t()), None


def attach_value_head(models: list, seed: int = 0) -> bool:
    """Give every last-stage chunk of ``models`` a ``ValueHead`` instead of its LM head; True if any got one."""
    attached = False
    for model in models:
        model.share_embeddings_and_output_weights = False  # on every stage: no embedding-group all-reduce
        if not getattr(model, 'post_process', False):
            continue
        config = model.config
        model.output_layer = ValueHead(config.hidden_size, config.params_dtype, config.sequence_parallel,
                                       getattr(model.output_layer, 'tp_group', None), seed)
        attached = True
    return attached


def apply_head(models: list, head: str, fused_lm_head: bool) -> None:
    """``head`` 'lm' (fused into the loss when ``fused_lm_head``) or 'value' on ``models`` (unwrapped)."""
    if head not in HEADS:
        raise ValueError(f'unknown head {head!r}; expected one of {HEADS}')
    if head == 'value':
        attach_value_head(models)
    elif fused_lm_head:
        fuse_head_into_loss(models)


__all__ = ['HEADS', 'HiddenStatesOutputLayer', 'VALUE_HEAD_HF_NAME', 'ValueHead', 'apply_head', 'attach_value_head',
           'fuse_head_into_loss', 'has_value_head', 'head_weight', 'sequence_classification_config',
           'value_head_rule']
