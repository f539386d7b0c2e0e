"""Build the models of a training run at its ``ParallelContext``'s layout: the trained one (mcore chunks, weights,
head, tuner, Float16Module, DDP) and frozen ones (reference, teacher: the same chunks, no DDP, no optimizer)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..utils.errors import UserError

logger = logging.getLogger(__name__)


class TrainSetupError(UserError, RuntimeError):
    pass


def resolve_train_dtype(args) -> torch.dtype:
    """--bf16 / --fp16 win; else --torch_dtype; 'auto' = bf16 on a bf16-capable GPU, fp32 on CPU."""
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    name = (args.torch_dtype or 'auto').lower()
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16, 'float16': torch.float16, 'fp16': torch.float16,
            'float32': torch.float32, 'fp32': torch.float32}[name]


def config_overrides(args, pp: int, vpp, from_weights: bool) -> dict:
    out = {'calculate_per_token_loss': True}     # loss.py normalises by the step's global token count
    if pp > 1 and not vpp:
        # packed rows differ in length: the 1F1B schedule exchanges shapes between stages (the MoE dispatcher
        # setting only satisfies a config check; the model has no experts). The interleaved schedule gets
        # micro-batches padded to one length instead (loop.py).
        out.update(variable_seq_lengths=True, moe_token_dispatcher_type='alltoall')
    if pp > 1 and not torch.cuda.is_available():
        # gloo matches a pair's point-to-point messages in posting order: batched ops that send activations
        # and gradients to the same peer (PP=2 interleaved: prev == next) would swap them silently
        out['batch_p2p_comm'] = False
    if from_weights:
        out['perform_initialization'] = False    # every weight is overwritten by the load
    if args.recompute_granularity == 'full':
        out.update(recompute_granularity='full', recompute_method=args.recompute_method,
                   recompute_num_layers=int(args.recompute_num_layers))
    elif args.recompute_granularity == 'selective':
        out.update(recompute_granularity='selective')
    return out


def apply_tuner(models: list, args, parallel) -> None:
    """--tuner_type through megaswift.tuners (full / freeze / lora), before DDP and the optimizer."""
    try:
        from ..tuners import prepare_model
    except ImportError as e:
        if args.tuner_type == 'full' and not args.freeze_parameters:
            return
        raise TrainSetupError(f'--tuner_type {args.tuner_type}: megaswift.tuners cannot be imported ({e})') from None
    prepare_model(models, args, parallel=parallel)


def build_train_models(args, hf_config, model_dir: Optional[str], dtype: torch.dtype, parallel,
                       init_from: str = 'hf', head: str = 'lm', fused_lm_head: bool = False) -> list:
    """This rank's model chunks, loaded (``init_from``: 'hf' weights of ``model_dir``, 'mcore' checkpoint
    ``args.mcore_model``, or 'none' when a training checkpoint will be loaded), given their ``head``
    (``megatron/heads.py``), tuned and DDP-wrapped."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from ..megatron.heads import apply_head
    models = _build_loaded_models(args, hf_config, model_dir, dtype, parallel, init_from)
    apply_head(models, head, fused_lm_head=False)  # a value head is trained (and tuned) like any layer
    apply_tuner(models, args, parallel)
    if head == 'lm' and fused_lm_head:  # the LM head keeps its parameters: fused after the tuner saw them
        apply_head(models, head, fused_lm_head=True)
    config = models[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=bool(args.use_distributed_optimizer), check_for_nan_in_grad=False)
    wrapped = []
    for i, model in enumerate(models):
        # as Megatron-LM: only the first chunk's buffers are bucketed (VPP chunks > 0 sync with it)
        wrapped.append(DistributedDataParallel(config, ddp_config, _half_precision(model, dtype),
                                               disable_bucketing=i > 0))
    if init_from == 'random':
        for m in wrapped:
            m.broadcast_params()
    return wrapped


def build_frozen_models(args, hf_config, model_dir: str, dtype: torch.dtype, parallel, head: str = 'lm',
                        fused_lm_head: bool = False) -> list:
    """A frozen copy (reference policy, teacher) of the model in ``model_dir`` at the trained model's layout:
    the same chunks per rank, eval mode, no gradients, no DDP and no optimizer."""
    models = _build_loaded_models(args, hf_config, model_dir, dtype, parallel, 'hf')
    from ..megatron.heads import apply_head
    apply_head(models, head, fused_lm_head)
    frozen = []
    for model in models:
        model.requires_grad_(False)
        frozen.append(_half_precision(model, dtype).eval())
    return frozen


def _build_loaded_models(args, hf_config, model_dir: Optional[str], dtype: torch.dtype, parallel, init_from: str):
    from ..megatron import build_model, load_hf_weights
    models = build_model(hf_config, dtype=dtype, parallel=parallel,
                         config_overrides=config_overrides(args, parallel.pp_size, parallel.vpp_size,
                                                           from_weights=init_from != 'random'))
    if init_from == 'hf':
        load_hf_weights(models, model_dir, parallel=parallel)
    elif init_from == 'mcore':
        from ..megatron.checkpoint import load_mcore_checkpoint
        load_mcore_checkpoint(models, args.mcore_model)
    return models


def _half_precision(model, dtype: torch.dtype):
    from megatron.core.transformer.module import Float16Module
    return Float16Module(model.config, model) if dtype in (torch.bfloat16, torch.float16) else model


def resolve_cross_entropy_impl(requested: str, device: torch.device) -> str:
    """--cross_entropy_impl auto -> 'cuda' when the extension runs on ``device``, else 'chunked'."""
    from ..ops.linear_ce import best_impl
    if requested == 'auto':
        return best_impl(device)
    if requested == 'cuda':
        if device.type != 'cuda':
            raise UserError('--cross_entropy_impl cuda needs a GPU; use chunked (or auto) on CPU')
        from ..ops.linear_ce import row_ops
        row_ops('cuda', device)  # builds/loads the extension and checks it now, not at the first step
    return requested


def attach_schedule_hooks(ddp_models: list, optimizer) -> None:
    """The model-config callbacks megatron-core's schedules call (as Megatron-LM's training.py sets them)."""
    from megatron.core.distributed import finalize_model_grads

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        # the loss is already divided by the step's global token count: reduce (sum) only, never rescale
        finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

    config = ddp_models[0].config
    config.no_sync_func = [m.no_sync for m in ddp_models] if len(ddp_models) > 1 else ddp_models[0].no_sync
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize


def trainable_parameter_count(ddp_models: list) -> tuple[int, int]:
    trainable = sum(p.numel() for m in ddp_models for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for m in ddp_models for p in m.parameters())
    return trainable, total
