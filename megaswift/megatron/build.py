"""Build megatron-core GPT models (this rank's pipeline chunks) from an HF config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megaswift.megatron.layout import validate_layout
from megaswift.megatron.model import ModelFamily, get_model_family
from megaswift.megatron.model.registry import build_transformer_config, gpt_model_kwargs, tie_word_embeddings
from megaswift.megatron.parallel import ParallelContext
from megaswift.megatron.weights import MAKE_VOCAB_SIZE_DIVISIBLE_BY, WeightContext, padded_vocab_size


@dataclass
class ModelInfo:
    """What convert/export need to know about a built model (``model.megaswift_info``)."""
    hf_config: object
    family: ModelFamily
    vocab_size: int
    padded_vocab_size: int
    vp_stage: Optional[int]
    use_te: bool

    def weight_context(self) -> WeightContext:
        cfg = self.hf_config
        from megaswift.megatron.model.registry import head_dim, num_kv_heads
        return WeightContext(num_attention_heads=cfg.num_attention_heads, num_query_groups=num_kv_heads(cfg),
                             head_dim=head_dim(cfg), vocab_size=self.vocab_size,
                             padded_vocab_size=self.padded_vocab_size)


def unwrap_model(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, 'megaswift_info') and hasattr(model, 'module'):
        model = model.module
    if not hasattr(model, 'megaswift_info'):
        raise TypeError(f'{type(model).__name__} was not built by megaswift.megatron.build_model')
    return model


def build_model(hf_config, *, dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None,
                parallel: Optional[ParallelContext] = None,
                make_vocab_size_divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY,
                config_overrides: Optional[dict] = None) -> list:
    """One ``GPTModel`` per virtual pipeline stage held by this rank (one without VPP).

    The layout is ``parallel`` (default: ``ParallelContext.from_megatron()``, without sequence parallelism),
    validated against the model before anything is built. Parameters are plain tensors in
    ``dtype`` (no Float16Module), on CPU when CUDA is absent. The vocab is padded to a multiple of
    ``make_vocab_size_divisible_by * tp`` (``model.megaswift_info.padded_vocab_size``; logits past
    ``vocab_size`` are padding). Weights are random until ``load_hf_weights``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megaswift.megatron.spec import final_norm_spec, te_available

    family = get_model_family(hf_config)
    ctx = parallel if parallel is not None else ParallelContext.from_megatron()
    pcfg = ctx.config
    tp, pp = pcfg.tensor_model_parallel_size, pcfg.pipeline_model_parallel_size
    vpp = pcfg.virtual_pipeline_model_parallel_size
    validate_layout(tp, pp, vpp, hf_config=hf_config)
    if not torch.cuda.is_available():
        from megaswift.megatron import cpu_compat
        cpu_compat.apply()
    config = build_transformer_config(family, hf_config, tp=tp, pp=pp, vpp=vpp,
                                      sequence_parallel=pcfg.sequence_parallel, dtype=dtype,
                                      overrides=config_overrides)
    use_te = te_available() if use_te is None else use_te
    layer = family.layer_spec(config, use_te)
    final_norm = final_norm_spec(config, use_te)
    vocab = int(hf_config.vocab_size)
    padded = padded_vocab_size(vocab, tp, make_vocab_size_divisible_by)
    model_kwargs = gpt_model_kwargs(hf_config)
    models = []
    for chunk in range(vpp or 1):
        vp_stage = chunk if vpp else None
        n_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
        block = TransformerBlockSubmodules(layer_specs=[layer] * n_layers, layer_norm=final_norm)
        model = GPTModel(  # megatron-core places the virtual stages: its own parallel_state answers for them
            config=config, transformer_layer_spec=block, vocab_size=padded,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=tie_word_embeddings(hf_config), vp_stage=vp_stage,
            **model_kwargs)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        model.megaswift_info = ModelInfo(hf_config, family, vocab, padded, vp_stage, bool(use_te))
        models.append(model)
    tag_tensor_parallel_weights(models)  # also when perform_initialization=False (weights loaded later)
    return models


def tag_tensor_parallel_weights(models: list) -> int:
    """Give TP-split weights megatron-core's ``tensor_model_parallel`` / ``partition_dim`` attributes.

    megatron-core sets them only inside its random initialisation, so a model built with
    ``perform_initialization=False`` (weights loaded afterwards) has untagged weights, and the optimizer
    then treats every TP shard but rank 0's as a duplicate: the grad norm (and so clipping) misses the
    other ranks' shards. Returns the number of weights tagged.
    """
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      VocabParallelEmbedding, set_tensor_model_parallel_attributes)
    tagged = 0
    for model in models:
        gated = bool(getattr(model.config, 'gated_linear_unit', False))
        for name, module in model.named_modules():
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                dim = 0
            elif isinstance(module, RowParallelLinear):
                dim = 1
            else:
                continue
            weight = getattr(module, 'weight', None)
            if not isinstance(weight, torch.nn.Parameter) or hasattr(weight, 'tensor_model_parallel'):
                continue
            stride = 2 if gated and name.endswith('mlp.linear_fc1') else 1
            set_tensor_model_parallel_attributes(weight, True, dim, stride)
            tagged += 1
    return tagged
