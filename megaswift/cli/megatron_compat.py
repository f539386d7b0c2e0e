"""Megatron-SWIFT's ``megatron sft|pt|rlhf`` flags under ``megaswift sft|pt|rlhf``: one table, applied before parsing.

``MEGATRON_FLAGS`` holds every flag of Megatron-SWIFT's docs (docs/source_en/Megatron-SWIFT/Command-line-parameters.md)
that megaswift does not define under the same name, the Megatron-LM / Megatron-SWIFT 3.x names that 4.x renamed, and
the ms-swift base flags its ``examples/megatron`` scripts use. Each is one of:

- ``alias``: a megaswift flag with the same meaning, the value passed through (``--train_iters 2``: ``--max_steps 2``);
- ``translate``: per value, the megaswift flags that do the same (``--cross_entropy_loss_fusion true`` is
  ``--cross_entropy_impl auto``), or none where megaswift already behaves so (``--finetune true``); any other value
  is refused with the rule's note;
- ``ignored``: accepted; it changes nothing a megaswift run computes, saves or holds in memory (speed-only kernel,
  loader and communication knobs; options of parts a text-only dense model does not have);
- ``refused``: an error naming megaswift's equivalent, or saying plainly that megaswift has none.

Every accepted flag is logged once at INFO. A Megatron-SWIFT flag together with the megaswift flag it sets is refused.
``--no_X`` is ``--X false`` for a boolean X (Megatron-LM style); a boolean flag without a value is true.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from .parser import CLIError, coerce
from ..utils.dist import rank

logger = logging.getLogger(__name__)

ALIAS, TRANSLATE, IGNORED, REFUSED = 'alias', 'translate', 'ignored', 'refused'
TRAIN = ('sft', 'pt', 'rlhf')
SFT_PT = ('sft', 'pt')
RLHF = ('rlhf',)


@dataclass(frozen=True)
class CompatRule:
    kind: str
    note: str = ''
    target: str | None = None                  # alias: the megaswift flag
    values: Mapping[Any, Mapping[str, str]] = field(default_factory=dict)  # translate: value -> megaswift flags
    commands: tuple[str, ...] = TRAIN
    excludes: tuple[str, ...] = ()             # megaswift flags that contradict it

    @property
    def boolean(self) -> bool:
        return self.kind == TRANSLATE and all(isinstance(k, bool) for k in self.values)


def alias(target: str, note: str = '', commands=TRAIN) -> CompatRule:
    return CompatRule(ALIAS, note, target=target, commands=commands)


def translate(values: dict, note: str, commands=TRAIN) -> CompatRule:
    return CompatRule(TRANSLATE, note, values=values, commands=commands)


def only(value, note: str, commands=TRAIN, excludes=()) -> CompatRule:
    """Accepted when it asks for what megaswift does anyway; other values are refused with ``note``."""
    return CompatRule(TRANSLATE, note, values={value: {}}, commands=commands, excludes=excludes)


def ignored(note: str, commands=TRAIN) -> CompatRule:
    return CompatRule(IGNORED, note, commands=commands)


def refused(note: str, commands=TRAIN) -> CompatRule:
    return CompatRule(REFUSED, note, commands=commands)


def _each(names: str, rule: CompatRule) -> dict[str, CompatRule]:
    return {name: rule for name in names.split()}


FUSION = ('a kernel fusion (speed only, same result); megaswift builds its layers without megatron-core fusions and '
          'picks the loss kernel with --cross_entropy_impl')
LOADER = ('a data-loader knob (speed only); megaswift tokenizes --dataset up front (--dataset_num_proc) and feeds '
          'micro-batches from memory, without loader workers or an on-disk cache')
COMM = 'a communication-scheduling knob (speed only); megaswift uses megatron-core\'s defaults'
TEXT_ONLY = 'megaswift trains text-only models: there is no ViT or aligner for it to act on'
NO_MOE = 'megaswift trains dense models only (no MoE, expert parallelism, MTP or sparse attention)'
NO_FP8 = 'megaswift has no FP8/FP4 training; use --bf16 true (or --torch_dtype bfloat16)'
NO_MUON = 'megaswift has no Muon optimizer (--optimizer adamw | sgd)'
NO_CP = 'megaswift has no context parallelism (--context_parallel_size 1); use --tensor_model_parallel_size with ' \
        '--sequence_parallel true for long sequences'
PRECISION = 'megaswift keeps fp32 main params, grads and Adam states (megatron-core\'s default); it has no ' \
            'precision-aware optimizer'
OFFLOAD = 'megaswift keeps the optimizer on the GPU; --use_distributed_optimizer true (the default for adamw) ' \
          'shards it across data-parallel ranks, --tuner_type lora shrinks it'
RESUME = 'megaswift starts --model / --mcore_model at step 0 with a fresh optimizer (Megatron-SWIFT\'s ' \
         '--finetune true); to resume step, optimizer, RNG and data position use --resume_from_checkpoint <dir> ' \
         '(or true: the latest in --output_dir)'
ADAPTER = 'megaswift loads no adapter to train on: continue a LoRA run with --resume_from_checkpoint, or merge it ' \
          '(megaswift export) and pass the result as --model'
MCORE_REF = 'megaswift\'s --ref_model takes an HF model directory; convert an mcore checkpoint with ' \
            '`megaswift export --to_hf --mcore_model <dir>`'
EVEN_PP = 'megaswift splits the layers evenly across --pipeline_model_parallel_size (x ' \
          '--virtual_pipeline_model_parallel_size) stages; it has no uneven or custom pipeline layout'
SERVER_ENGINE = 'megaswift\'s colocated engine takes no engine settings; run `megaswift rollout` with its own flags ' \
                '(e.g. --infer_backend vllm) and train with --vllm_mode server'
NO_GRPO_OPTION = 'megaswift\'s GRPO has no such option (see megaswift/arguments/grpo.py for what it has)'

MEGATRON_FLAGS: dict[str, CompatRule | tuple[CompatRule, ...]] = {
    # training
    'train_iters': alias('max_steps'),
    'max_epochs': alias('num_train_epochs'),
    'recompute_modules': only('core_attn', 'megaswift\'s --recompute_granularity selective recomputes the core '
                              'attention only; --recompute_granularity full recomputes whole layers'),
    'deterministic_mode': only(False, 'megaswift has no deterministic mode'),
    **_each('masked_softmax_fusion bias_dropout_fusion bias_activation_fusion bias_swiglu_fusion apply_rope_fusion '
            'rope_fusion gradient_accumulation_fusion use_flash_attn', ignored(FUSION)),
    'cross_entropy_loss_fusion': translate({True: {'cross_entropy_impl': 'auto'},      # fused / chunked kernels
                                            False: {'cross_entropy_impl': 'torch'}},   # materialised logits
                                           'megaswift\'s --cross_entropy_impl picks the loss kernel'),
    'cross_entropy_fusion_impl': refused('megaswift picks the loss kernel with --cross_entropy_impl auto | torch | '
                                         'chunked | cuda'),
    'calculate_per_token_loss': (
        only(True, 'megaswift\'s sft/pt loss is always the mean over the step\'s loss tokens', commands=SFT_PT),
        only(False, 'megaswift\'s rlhf objectives normalise per pair / sequence (GRPO: by --loss_type)',
             commands=RLHF)),
    'attention_backend': translate(
        {v: {} for v in ('auto', 'flash', 'fused', 'unfused', 'local', 'flash_2', 'flash_3', 'flash_4')},
        'megaswift picks the attention kernel itself (Transformer Engine\'s automatic choice, flash where the inputs '
        'allow, when TE is installed; else torch SDPA); every backend computes the same attention'),
    'optimizer_cpu_offload': only(False, OFFLOAD),
    'optimizer_offload_fraction': refused(OFFLOAD),
    'optimizer_cuda_graph': only(False, 'megaswift has no CUDA-graph optimizer step'),
    'use_precision_aware_optimizer': only(False, PRECISION),
    **_each('main_grads_dtype main_params_dtype exp_avg_dtype exp_avg_sq_dtype', only('fp32', PRECISION)),
    **_each('manual_gc manual_gc_steps manual_gc_eval', ignored('garbage-collector timing (speed only)')),
    # data
    **_each('dataloader_num_workers num_workers dataloader_pin_memory dataloader_persistent_workers '
            'dataloader_prefetch_factor load_from_cache_file packing_num_proc', ignored(LOADER)),
    'data_sharding': only(False, 'megaswift shuffles the whole dataset, then shards it across data-parallel ranks'),
    'group_by_length': only(False, 'megaswift has no length grouping; --packing true balances lengths'),
    'te_rng_tracker': only(False, 'megaswift uses megatron-core\'s CUDA RNG tracker'),
    'data_parallel_random_init': only(False, 'megaswift starts every data-parallel rank from the same weights'),
    'mlp_padding_free': only(False, 'megaswift\'s --padding_free true (the default) already runs the MLP unpadded'),
    'lazy_tokenize': only(False, 'megaswift tokenizes up front; for data larger than memory use --streaming true'),
    'packing_length': refused('megaswift packs to --max_length'),
    'new_special_tokens': refused('megaswift has none: add the tokens to the tokenizer (and resize the embedding) '
                                  'before training'),
    **_each('model_author model_name', refused('megaswift has no self-cognition placeholders ({{NAME}}, '
                                               '{{AUTHOR}}): write the names into your dataset')),
    # learning rate and regularisation
    'lr_warmup_iters': alias('warmup_steps'),
    'lr_warmup_fraction': alias('warmup_ratio'),
    'lr_warmup_init': only(0.0, 'megaswift\'s warmup starts at lr 0'),
    'lr_decay_iters': refused('megaswift decays the lr over the whole run (--max_steps); it has no separate decay '
                              'length'),
    **_each('lr_wsd_decay_style lr_wsd_decay_iters', refused('megaswift has no WSD schedule (--lr_decay_style '
                                                             'cosine | linear | constant)')),
    'weight_decay_incr_style': only('constant', 'megaswift\'s weight decay is constant (--weight_decay)'),
    **_each('start_weight_decay end_weight_decay', refused('megaswift\'s weight decay is constant: use '
                                                           '--weight_decay')),
    **_each('muon_momentum muon_split_qkv muon_use_nesterov muon_scale_mode muon_fp32_matmul_prec '
            'muon_coefficient_type muon_num_ns_steps muon_tp_mode muon_extra_scale_factor muon_scalar_optimizer',
            refused(NO_MUON)),
    # checkpoints
    'load': alias('mcore_model', 'weights only, from step 0; resume with --resume_from_checkpoint'),
    'save': alias('output_dir'),
    'save_interval': alias('save_steps'),
    'no_save_rng': ignored('megaswift always saves the RNG states (a few KB) so that --resume_from_checkpoint '
                           'continues exactly'),
    'no_load_rng': only(False, 'megaswift always restores the RNG states on --resume_from_checkpoint'),
    'finetune': only(True, RESUME, excludes=('resume_from_checkpoint',)),
    'perform_initialization': ignored('every weight comes from --model / --mcore_model; megaswift skips the random '
                                      'initialization they overwrite'),
    'use_cpu_initialization': ignored('where weights are first created (CUDA when present); same weights'),
    'async_save': only(False, 'megaswift saves synchronously and atomically'),
    'use_persistent_ckpt_worker': only(False, 'megaswift saves synchronously and atomically'),
    **_each('metric_for_best_model greater_is_better', refused('megaswift keeps no best checkpoint: '
                                                                '--save_total_limit N keeps the newest N')),
    **_each('dist_ckpt_save_pre_mcore_014 dist_ckpt_optim_fully_reshardable '
            'distrib_optim_fully_reshardable_mem_efficient', only(False, 'megaswift has no such checkpoint format '
                                                                         'option')),
    'save_strategy': only('steps', 'megaswift saves every --save_steps steps (and after the last)'),
    'add_version': only(False, 'megaswift writes into --output_dir itself (no v<N>-<time> subfolder); it refuses a '
                               'non-empty one unless --overwrite_output_dir or --resume_from_checkpoint'),
    'create_checkpoint_symlink': only(False, 'megaswift names the newest checkpoint in '
                                             '<output_dir>/latest_checkpointed_iteration.txt'),
    'load_safetensors': only(True, 'megaswift\'s --model loads HF safetensors; --mcore_model an mcore checkpoint'),
    'merge_lora': only(False, 'megaswift saves a LoRA run\'s checkpoint-<step>/ as a PEFT adapter, unmerged'),
    'max_shard_size': only('5gb', 'megaswift writes 5GB safetensors shards; reshard with `megaswift export --to_hf '
                                  '--max_shard_size`'),
    # distributed
    'ddp_backend': only('nccl', 'megaswift uses nccl on GPUs (gloo only on CPU)'),
    'ddp_timeout': refused('megaswift\'s process-group timeout is fixed at 30 minutes'),
    'use_megatron_fsdp': only(False, 'megaswift has no FSDP; --use_distributed_optimizer true shards the optimizer '
                                     '(ZeRO-1)'),
    'data_parallel_sharding_strategy': ignored('used only with --use_megatron_fsdp, which megaswift does not have'),
    **_each('decoder_first_pipeline_num_layers decoder_last_pipeline_num_layers pipeline_model_parallel_layout '
            'microbatch_group_size_per_vp_stage', refused(EVEN_PP)),
    **_each('overlap_p2p_comm batch_p2p_comm align_param_gather tp_comm_overlap overlap_grad_reduce '
            'overlap_param_gather', ignored(COMM)),
    'context_parallel_size': only(1.0, NO_CP),
    **_each('cp_comm_type cp_partition_mode', ignored('used only with --context_parallel_size > 1, which megaswift '
                                                      'does not have')),
    'sequence_packing_scheduler': refused('megaswift has no packing scheduler; --packing true packs best-fit into '
                                          '--max_length rows'),
    **_each('expert_model_parallel_size expert_tensor_parallel_size', only(1.0, NO_MOE)),
    # logging and evaluation
    'log_interval': alias('logging_steps'),
    'eval_interval': alias('eval_steps'),
    'tensorboard_queue_size': ignored('how often TensorBoard flushes to disk'),
    'eval_iters': only(-1.0, 'megaswift evaluates the whole validation set (--split_dataset_ratio / --val_dataset) '
                             'every --eval_steps'),
    # precision
    **_each('fp8_format fp8_recipe fp8_amax_history_len fp8_amax_compute_algo fp4_format fp4_recipe', refused(NO_FP8)),
    **_each('fp8_param_gather fp4_param_gather', only(False, NO_FP8)),
    'apply_query_key_layer_scaling': only(False, 'megaswift has no query-key layer scaling (an fp16 aid); use '
                                                 '--bf16 true'),
    'attention_softmax_in_fp32': only(True, 'megaswift\'s attention kernels compute the softmax in fp32'),
    'accumulate_allreduce_grads_in_fp32': only(True, 'megaswift accumulates and all-reduces gradients in fp32'),
    # MoE, DSA, DeepSeek-V4, MTP
    **_each('moe_router_load_balancing_type moe_router_dtype moe_token_dispatcher_type moe_enable_deepep '
            'moe_grouped_gemm moe_permute_fusion moe_aux_loss_coeff moe_z_loss_coeff moe_shared_expert_overlap '
            'moe_expert_capacity_factor moe_pad_expert_input_to_capacity moe_token_drop_policy '
            'dsa_indexer_loss_coeff dsa_indexer_use_sparse_loss apply_dsa_kernel_fusion csa_dense_mode use_fused_mhc '
            'mhc_recompute_layer_num mtp_num_layers mtp_loss_scaling_factor mtp_decoder_input_detach '
            'mtp_shared_weights', refused(NO_MOE)),
    # tuners
    'train_type': alias('tuner_type'),
    'freeze_llm': only(False, 'megaswift freezes by mcore name prefix: --freeze_parameters (or --tuner_type freeze)'),
    **_each('freeze_vit freeze_aligner vit_gradient_checkpointing vit_gradient_checkpointing_kwargs vit_attn_impl '
            'vit_lr aligner_lr language_model_only attn_impl', ignored(TEXT_ONLY)),
    'freeze_parameters_ratio': only(0.0, 'megaswift freezes by name: --freeze_parameters / --freeze_parameters_regex'),
    **_each('mcore_adapter adapters adapter_load', refused(ADAPTER)),
    'target_regex': refused('megaswift selects LoRA modules with --target_modules (suffixes, or all-linear)'),
    'modules_to_save': refused('megaswift trains extra modules beside LoRA with --trainable_parameters <mcore name '
                               'prefixes> (e.g. embedding output_layer)'),
    'lora_bias': only('none', 'megaswift\'s LoRA trains no biases'),
    'use_rslora': only(False, 'megaswift\'s LoRA scales by lora_alpha / lora_rank (no rsLoRA)'),
    # mcore-bridge, model and task
    'model_type': ignored('megaswift reads the architecture from the model\'s config.json'),
    'check_model': ignored('a hub download check; megaswift reads local model directories'),
    'use_hf': ignored('which hub to download from; megaswift reads local directories, else the Hugging Face hub'),
    'hub_token': refused('set HF_TOKEN in the environment instead'),
    'offload_bridge': only(False, 'megaswift has no bridge weight offload'),
    'megatron_extra_kwargs': refused('megaswift passes nothing through to megatron-core\'s TransformerConfig'),
    'rope_scaling': refused('set rope_scaling in the model\'s config.json'),
    'apply_wd_to_qk_layernorm': only(False, 'megaswift applies no weight decay to 1-D parameters (norms, biases)'),
    'linear_decoupled_in_proj': only(False, 'megaswift has no linear-attention models'),
    'enable_dft_loss': only(False, 'megaswift has no DFT loss; a custom objective is a --loss_type registered by '
                                   '--external_plugins'),
    'enable_channel_loss': only(False, 'megaswift has no channel loss'),
    'task_type': only('causal_lm', 'megaswift sft/pt train causal LMs; a reward model is `megaswift rlhf '
                                   '--rlhf_type rm`'),
    **_each('num_labels problem_type mrl_dims', refused('megaswift has no sequence-classification or embedding '
                                                        'training')),
    # rlhf
    'mcore_ref_model': refused(MCORE_REF, commands=RLHF),
    'ref_load': refused(MCORE_REF, commands=RLHF),
    **_each('mcore_ref_adapter ref_adapter_load ref_adapters', refused(ADAPTER, commands=RLHF)),
    'f_divergence_type': only('reverse_kl', 'megaswift\'s DPO uses the reverse KL', commands=RLHF),
    'use_vllm': translate({True: {'rollout_backend': 'vllm'}, False: {'rollout_backend': 'transformers'}},
                          'megaswift\'s colocated engine is --rollout_backend transformers | vllm | sglang',
                          commands=RLHF),
    'vllm_server_host': alias('rollout_host', 'a `megaswift rollout` server', commands=RLHF),
    'vllm_server_port': alias('rollout_port', 'a `megaswift rollout` server', commands=RLHF),
    'vllm_server_base_url': alias('rollout_url', 'a `megaswift rollout` server', commands=RLHF),
    'vllm_server_timeout': refused('megaswift\'s --rollout_timeout bounds each generation and weight push (not the '
                                   'wait for the server to start)', commands=RLHF),
    **_each('vllm_gpu_memory_utilization vllm_max_model_len vllm_enforce_eager vllm_limit_mm_per_prompt '
            'vllm_enable_prefix_caching vllm_tensor_parallel_size vllm_enable_lora vllm_data_parallel_size '
            'vllm_server_pass_dataset', refused(SERVER_ENGINE, commands=RLHF)),
    'sleep_level': only(0.0, 'megaswift\'s colocated engine does not sleep; --vllm_mode server frees the trainer\'s '
                             'GPUs', commands=RLHF),
    **_each('offload_optimizer offload_model offload_teacher_model', only(False, OFFLOAD, commands=RLHF)),
    'num_generations_eval': refused('megaswift\'s GRPO generates no evaluation completions', commands=RLHF),
    **_each('delta rollout_importance_sampling_mode rollout_importance_sampling_threshold '
            'off_policy_sequence_mask_delta teacher_kl_coef', refused(NO_GRPO_OPTION, commands=RLHF)),
    'log_rollout_offpolicy_metrics': only(False, NO_GRPO_OPTION, commands=RLHF),
    'router_replay_mode': only('disabled', NO_MOE, commands=RLHF),
    'sft_alpha': only(0.0, 'megaswift\'s GKD has no SFT term', commands=RLHF),
    **_each('teacher_model_type teacher_model_revision', ignored('megaswift reads the teacher\'s architecture from '
                                                                 'its config.json', commands=RLHF)),
    **_each('teacher_model_server teacher_tag_key', refused('megaswift\'s teacher is a local --teacher_model',
                                                            commands=RLHF)),
}


def megatron_flag_names(command: str) -> list[str]:
    """The table's flags for ``command`` (for did-you-mean suggestions)."""
    return [name for name in MEGATRON_FLAGS if _rule(name, command)]


def compat_command(cls) -> str | None:
    """'sft', 'pt' or 'rlhf' for those commands' arguments classes (the table applies to them), else None."""
    from ..arguments.rlhf import RlhfArguments
    from ..arguments.train import PtArguments, SftArguments
    for klass, command in ((RlhfArguments, 'rlhf'), (PtArguments, 'pt'), (SftArguments, 'sft')):
        if isinstance(cls, type) and issubclass(cls, klass):
            return command
    return None


@dataclass
class FlagUse:
    """One flag as given: ``value`` is the list of strings after ``--name`` on the command line, or a config value."""
    name: str                    # underscores, as the dataclass field would be named
    value: Any
    where: str = ''              # '' on the command line; 'file:line' for a config key
    spelled: str = ''            # as the user wrote it (dashes kept); default: name

    def __post_init__(self):
        self.spelled = self.spelled or self.name

    @property
    def from_cli(self) -> bool:
        return not self.where

    def flag(self) -> str:
        return f'{self.where}: --{self.spelled}' if self.where else f'--{self.spelled}'

    def shown(self) -> str:
        items = self.value if isinstance(self.value, (list, tuple)) else [self.value]
        return ' '.join([self.flag(), *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)])


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (list, tuple)):
        if not value:
            return True              # a boolean flag without a value
        value = value[0] if len(value) == 1 else None
    try:
        return coerce(bool, value, '')
    except CLIError:
        return None


def _as_key(value: Any, like: Any) -> Any:
    """``value`` (CLI strings or a config value) as the type of the table's key ``like``; None if it is not one."""
    if isinstance(like, bool):
        return _as_bool(value)
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(like, float):
        try:
            return float(items[0]) if len(items) == 1 else None
        except (TypeError, ValueError):
            return None
    return ' '.join(str(v) for v in items).lower()


def _rule(name: str, command: str) -> CompatRule | None:
    rules = MEGATRON_FLAGS.get(name)
    for rule in rules if isinstance(rules, tuple) else (rules,) if rules else ():
        if command in rule.commands:
            return rule
    return None


def _negated(use: FlagUse, command: str, bool_fields: set[str]) -> FlagUse | None:
    """``--no_X [v]`` -> ``--X (not v)`` when X is a boolean megaswift flag or a boolean (or value-blind) table flag."""
    if not use.name.startswith('no_'):
        return None
    base = use.name[3:]
    rule = _rule(base, command)
    if base not in bool_fields and not (rule and (rule.boolean or rule.kind in (IGNORED, REFUSED))):
        return None
    value = _as_bool(use.value)
    if value is None:
        raise CLIError(f'{use.flag()}: expected true or false, got {use.value!r}')
    text = 'false' if value else 'true'
    return FlagUse(base, [text] if use.from_cli else text, use.where)


def _translate(use: FlagUse, rule: CompatRule, notes: list[str]) -> list[FlagUse]:
    if rule.kind == REFUSED:
        raise CLIError(f'{use.flag()} (Megatron-SWIFT) is not supported by megaswift: {rule.note}')
    if rule.kind == IGNORED:
        notes.append(f'{use.shown()} (Megatron-SWIFT) is accepted and changes nothing in megaswift: {rule.note}')
        return []
    if rule.kind == ALIAS:
        target = FlagUse(rule.target, use.value, use.where)
        notes.append(f'{use.shown()} (Megatron-SWIFT) -> {target.shown()}' + (f' ({rule.note})' if rule.note else ''))
        return [target]
    key = _as_key(use.value, next(iter(rule.values)))
    if key not in rule.values:
        accepted = ', '.join(str(k).lower() if isinstance(k, (bool, str)) else f'{k:g}' for k in rule.values)
        raise CLIError(f'{use.shown()} (Megatron-SWIFT) is not supported by megaswift (accepted: {accepted}): '
                       f'{rule.note}')
    targets = [FlagUse(name, [value] if use.from_cli else value, use.where) for name, value in rule.values[key].items()]
    if targets:
        notes.append(f"{use.shown()} (Megatron-SWIFT) -> {' '.join(t.shown() for t in targets)} ({rule.note})")
    else:
        notes.append(f'{use.shown()} (Megatron-SWIFT) is what megaswift does anyway: {rule.note}')
    return targets


def _resolve(use: FlagUse, command: str, field_names: set[str], bool_fields: set[str], notes: list[str]):
    """``(rule or None, the megaswift flags use stands for)``."""
    rule = None if use.name in field_names else _rule(use.name, command)
    if rule is None and use.name not in field_names and (negated := _negated(use, command, bool_fields)):
        rule = _rule(negated.name, command) if negated.name not in field_names else None
        if rule is None:
            notes.append(f'{use.shown()} -> {negated.shown()}')
            return None, [negated]
        use = negated
    return rule, (_translate(use, rule, notes) if rule else [use])


def apply_megatron_compat(command: str, field_names: set[str], bool_fields: set[str],
                          uses: list[FlagUse]) -> list[FlagUse]:
    """``uses`` (config keys, then command-line flags) with Megatron-SWIFT flags replaced by megaswift's; raises
    ``CLIError`` for a refused flag or value, or for a Megatron-SWIFT flag given beside the megaswift flag it sets."""
    out: list[FlagUse] = []
    set_by: dict[str, set[str]] = {}
    notes: list[str] = []
    for use in uses:
        rule, translated = _resolve(use, command, field_names, bool_fields, notes)
        for t in translated:
            set_by.setdefault(t.name, set()).add(use.name)
        if rule and rule.excludes:
            excluded = [name for name in rule.excludes if any(u.name == name for u in uses)]
            if excluded:
                raise CLIError(f'{use.shown()} (Megatron-SWIFT) contradicts --{excluded[0]}: {rule.note}')
        out.extend(translated)
    for name, givers in set_by.items():
        if len(givers) > 1:
            raise CLIError(f"{' and '.join('--' + g for g in sorted(givers))} both set --{name}: give only one")
    for note in dict.fromkeys(notes) if rank() == 0 else ():  # each once, on rank 0
        logger.info(note)
    return out
