"""Megatron-SWIFT's ``megatron sft|rlhf`` flags under ``megaswift sft|pt|rlhf`` (cli/megatron_compat.py).

Parse tests through the real parser and argument classes, table-driven; and one real run of Megatron-SWIFT's own
dense SFT example (ms-swift examples/megatron/dense/qwen3_32b.sh) with only model, data, output and sizes swapped.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shlex
import sys
from pathlib import Path

import pytest

from megaswift.cli.megatron_compat import MEGATRON_FLAGS
from megaswift.arguments.rlhf import RlhfArguments
from megaswift.arguments.train import PtArguments, SftArguments
from megaswift.cli.parser import CLIError, parse_args

BASE = ['--model', 'm', '--dataset', 'd.jsonl']


def parse(argv, cls=SftArguments):
    return parse_args(cls, BASE + argv)


@pytest.mark.parametrize('argv, field, want', [
    (['--train_iters', '7'], 'max_steps', 7),
    (['--train-iters', '7'], 'max_steps', 7),
    (['--train_iters=7'], 'max_steps', 7),
    (['--max_epochs', '3'], 'num_train_epochs', 3.0),
    (['--lr_warmup_iters', '5'], 'warmup_steps', 5),
    (['--lr_warmup_fraction', '0.05'], 'warmup_ratio', 0.05),
    (['--save', 'out/x'], 'output_dir', 'out/x'),
    (['--save_interval', '50'], 'save_steps', 50),
    (['--eval_interval', '20'], 'eval_steps', 20),
    (['--log_interval', '2'], 'logging_steps', 2),
    (['--train_type', 'lora'], 'tuner_type', 'lora'),
    (['--cross_entropy_loss_fusion', 'true'], 'cross_entropy_impl', 'auto'),
    (['--cross_entropy_loss_fusion'], 'cross_entropy_impl', 'auto'),       # a flag without a value is true
    (['--cross_entropy_loss_fusion', 'false'], 'cross_entropy_impl', 'torch'),
    (['--no_cross_entropy_loss_fusion'], 'cross_entropy_impl', 'torch'),   # Megatron-LM's --no_xxx
    (['--no-packing'], 'packing', False),
    (['--tensorboard_dir', 'tb'], 'tensorboard_dir', 'tb'),                # same name (a field since this change)
])
def test_aliases_set_the_megaswift_field(argv, field, want):
    assert getattr(parse(argv), field) == want


def test_load_is_mcore_model(tmp_path):
    assert parse(['--load', str(tmp_path)]).mcore_model == str(tmp_path)


@pytest.mark.parametrize('argv, field, want', [
    (['--vllm_server_host', '10.0.0.2', '--vllm_server_port', '8001'], 'rollout_host', '10.0.0.2'),
    (['--vllm_server_port', '8001'], 'rollout_port', 8001),
    (['--vllm_server_base_url', 'http://h:9'], 'rollout_url', 'http://h:9'),
    (['--use_vllm', 'true'], 'rollout_backend', 'vllm'),
    (['--use_vllm', 'false'], 'rollout_backend', 'transformers'),
])
def test_rlhf_aliases(argv, field, want):
    assert getattr(parse(argv, RlhfArguments), field) == want
    assert parse(['--calculate_per_token_loss', 'false'], RlhfArguments) == parse([], RlhfArguments)


@pytest.mark.parametrize('argv', [
    ['--finetune', 'true'], ['--finetune'], ['--attention_backend', 'flash'], ['--attention_backend', 'unfused'],
    ['--no_save_rng', 'true'], ['--no_load_rng', 'false'], ['--dataloader_num_workers', '8'],
    ['--load_from_cache_file', 'true'], ['--masked_softmax_fusion', 'false'], ['--no-gradient-accumulation-fusion'],
    ['--recompute_modules', 'core_attn'], ['--context_parallel_size', '1'], ['--expert_model_parallel_size', '1'],
    ['--eval_iters', '-1'], ['--use_precision_aware_optimizer', 'false'], ['--calculate_per_token_loss', 'true'],
    ['--freeze_vit', 'true'], ['--max_shard_size', '5GB'], ['--merge_lora', 'false'], ['--task_type', 'causal_lm'],
])
def test_accepted_no_ops_change_nothing_and_are_logged(argv, caplog):
    with caplog.at_level(logging.INFO, logger='megaswift'):
        got = parse(argv)
    assert got == parse([])
    name = argv[0].lstrip('-').replace('-', '_').removeprefix('no_')
    assert [r for r in caplog.records if name in r.getMessage() and '(Megatron-SWIFT)' in r.getMessage()], caplog.text


@pytest.mark.parametrize('argv, names', [
    (['--finetune', 'false'], '--resume_from_checkpoint'),
    (['--optimizer_cpu_offload', 'true'], '--use_distributed_optimizer'),
    (['--use_precision_aware_optimizer', 'true'], 'fp32'),
    (['--context_parallel_size', '2'], '--sequence_parallel'),
    (['--cross_entropy_fusion_impl', 'te'], '--cross_entropy_impl'),
    (['--lr_decay_iters', '100'], '--max_steps'),
    (['--lr_wsd_decay_style', 'linear'], '--lr_decay_style'),
    (['--mcore_adapter', 'ckpt'], '--resume_from_checkpoint'),
    (['--modules_to_save', 'word_embeddings'], '--trainable_parameters'),
    (['--freeze_llm', 'true'], '--freeze_parameters'),
    (['--eval_iters', '10'], '--eval_steps'),
    (['--metric_for_best_model', 'loss'], '--save_total_limit'),
    (['--decoder_first_pipeline_num_layers', '2'], '--pipeline_model_parallel_size'),
    (['--moe_grouped_gemm', 'true'], 'dense models only'),
    (['--fp8_format', 'e4m3'], '--bf16'),
    (['--muon_momentum', '0.9'], '--optimizer'),
    (['--model_author', 'swift'], 'dataset'),
    (['--add_version', 'true'], '--output_dir'),
    (['--attention_backend', 'bogus'], 'accepted: auto, flash'),
    (['--no_load_rng', 'true'], '--resume_from_checkpoint'),
])
def test_refused_flags_name_the_megaswift_equivalent(argv, names):
    with pytest.raises(CLIError) as e:
        parse(argv)
    message = str(e.value)
    assert message.startswith(argv[0]) and '(Megatron-SWIFT)' in message and names in message, message
    assert '\n' not in message


def test_rlhf_refusals_name_the_equivalent():
    with pytest.raises(CLIError, match=r'--mcore_ref_model .*--ref_model.*megaswift export --to_hf'):
        parse(['--mcore_ref_model', 'ref'], RlhfArguments)
    with pytest.raises(CLIError, match=r'--vllm_gpu_memory_utilization .*megaswift rollout.*--vllm_mode server'):
        parse(['--vllm_gpu_memory_utilization', '0.5'], RlhfArguments)
    with pytest.raises(CLIError, match=r'--calculate_per_token_loss true .*accepted: false'):
        parse(['--calculate_per_token_loss', 'true'], RlhfArguments)


@pytest.mark.parametrize('argv, match', [
    (['--train_iters', '3', '--max_steps', '4'], r'--max_steps and --train_iters both set --max_steps'),
    (['--cross_entropy_loss_fusion', '--cross_entropy_impl', 'chunked'], r'both set --cross_entropy_impl'),
    (['--save', 'a', '--output_dir', 'b'], r'--output_dir and --save both set --output_dir'),
    (['--no_packing', '--packing', 'true'], r'--no_packing and --packing both set --packing'),
    (['--finetune', '--resume_from_checkpoint', 'true'], r'--finetune .*contradicts --resume_from_checkpoint'),
])
def test_a_megatron_flag_beside_its_megaswift_equivalent_is_refused(argv, match):
    with pytest.raises(CLIError, match=match):
        parse(argv)


@pytest.mark.parametrize('argv, match', [
    (['--train_iter', '3'], r"unknown argument '--train_iter'; did you mean 'train_iters'"),
    (['--max_step', '3'], r"unknown argument '--max_step'; did you mean 'max_steps'"),
    (['--no_such_flag'], r"unknown argument '--no_such_flag'"),
    (['--vllm_server_host', 'h'], r"unknown argument '--vllm_server_host'"),  # an rlhf flag, not sft's
])
def test_unknown_flags_still_fail_with_a_suggestion(argv, match):
    with pytest.raises(CLIError, match=match):
        parse(argv)


def test_other_commands_take_no_megatron_flags():
    from megaswift.arguments.sampling import SamplingArguments
    with pytest.raises(CLIError, match="unknown argument '--train_iters'"):
        parse_args(SamplingArguments, BASE + ['--train_iters', '3'])
    assert parse(['--train_iters', '3'], PtArguments).max_steps == 3


def test_config_keys_are_translated_with_file_and_line(tmp_path):
    cfg = tmp_path / 'run.yaml'
    cfg.write_text('model: m\ndataset: [d.jsonl]\ntrain_iters: 9\nfinetune: true\nno_save_rng: true\n'
                   'lr_warmup_fraction: 0.1\n')
    got = parse_args(SftArguments, [str(cfg)])
    assert (got.max_steps, got.warmup_ratio) == (9, 0.1)
    assert parse_args(SftArguments, [str(cfg), '--train_iters', '4']).max_steps == 4  # the flag overrides the key
    with pytest.raises(CLIError, match='--max_steps and --train_iters both set --max_steps'):
        parse_args(SftArguments, [str(cfg), '--max_steps', '4'])
    cfg.write_text('model: m\ndataset: [d.jsonl]\nfinetune: false\n')
    with pytest.raises(CLIError, match=re.escape(f'{cfg}:3: --finetune false (Megatron-SWIFT) is not supported')):
        parse_args(SftArguments, [str(cfg)])


# Every flag of docs/source_en/Megatron-SWIFT/Command-line-parameters.md (ms-swift 3602360), Megatron-SWIFT's
# documented `megatron sft` / `megatron rlhf` flags: each is megaswift's own flag or a row of the table.
DOCUMENTED = '''
accumulate_allreduce_grads_in_fp32 adam_beta1 adam_beta2 adam_eps adapters add_version align_param_gather
aligner_lr apply_dsa_kernel_fusion apply_query_key_layer_scaling apply_rope_fusion apply_wd_to_qk_layernorm
async_generate async_save attention_backend attention_softmax_in_fp32 batch_p2p_comm beta bf16
bias_activation_fusion bias_dropout_fusion calculate_per_token_loss callbacks center_rewards_coefficient
check_model clip_grad context_parallel_size cp_comm_type cp_partition_mode create_checkpoint_symlink
cross_entropy_fusion_impl cross_entropy_loss_fusion csa_dense_mode data_parallel_random_init
data_parallel_sharding_strategy data_sharding dataloader_num_workers dataloader_persistent_workers
dataloader_pin_memory dataloader_prefetch_factor dataset_shuffle ddp_backend ddp_timeout
decoder_first_pipeline_num_layers decoder_last_pipeline_num_layers delta desirable_weight deterministic_mode
dist_ckpt_optim_fully_reshardable dist_ckpt_save_pre_mcore_014 distrib_optim_fully_reshardable_mem_efficient
dsa_indexer_loss_coeff dsa_indexer_use_sparse_loss dynamic_sample enable_channel_loss enable_dft_loss
end_weight_decay epsilon epsilon_high eval_iters eval_steps exp_avg_dtype exp_avg_sq_dtype
expert_model_parallel_size expert_tensor_parallel_size f_divergence_type finetune fp16 fp4_format
fp4_param_gather fp4_recipe fp8_amax_compute_algo fp8_amax_history_len fp8_format fp8_param_gather fp8_recipe
freeze_aligner freeze_llm freeze_parameters freeze_parameters_ratio freeze_parameters_regex freeze_vit
generation_batch_size global_batch_size gradient_accumulation_fusion greater_is_better group_by_length
hub_token importance_sampling_level label_smoothing language_model_only lazy_tokenize linear_decoupled_in_proj
lmbda log_completions log_rollout_offpolicy_metrics logging_steps lora_alpha lora_bias lora_dropout lora_rank
loss_scale loss_type lr lr_decay_iters lr_decay_style lr_warmup_fraction lr_warmup_init lr_warmup_iters
lr_wsd_decay_iters lr_wsd_decay_style main_grads_dtype main_params_dtype manual_gc manual_gc_eval
manual_gc_steps masked_softmax_fusion max_completion_length max_resample_times max_shard_size mcore_adapter
mcore_model mcore_ref_adapter mcore_ref_model megatron_extra_kwargs merge_lora metric_for_best_model
mhc_recompute_layer_num micro_batch_size microbatch_group_size_per_vp_stage min_lr mlp_padding_free model
model_type modules_to_save moe_aux_loss_coeff moe_enable_deepep moe_expert_capacity_factor moe_grouped_gemm
moe_pad_expert_input_to_capacity moe_permute_fusion moe_router_dtype moe_router_load_balancing_type
moe_shared_expert_overlap moe_token_dispatcher_type moe_token_drop_policy moe_z_loss_coeff mrl_dims
mtp_decoder_input_detach mtp_loss_scaling_factor mtp_num_layers mtp_shared_weights muon_coefficient_type
muon_extra_scale_factor muon_fp32_matmul_prec muon_momentum muon_num_ns_steps muon_scalar_optimizer
muon_scale_mode muon_split_qkv muon_tp_mode muon_use_nesterov new_special_tokens no_load_optim no_load_rng
no_save_optim no_save_rng num_generations num_generations_eval num_iterations num_labels num_train_epochs
off_policy_sequence_mask_delta offload_bridge offload_model offload_optimizer offload_teacher_model
optimizer optimizer_cpu_offload optimizer_cuda_graph optimizer_offload_fraction output_dir overlap_grad_reduce
overlap_p2p_comm overlap_param_gather overlong_filter packing packing_length packing_num_proc padding_free
perform_initialization pipeline_model_parallel_layout pipeline_model_parallel_size problem_type
recompute_granularity recompute_method recompute_modules recompute_num_layers ref_adapters ref_model
reference_free report_to reward_funcs reward_weights rlhf_type rollout_importance_sampling_mode
rollout_importance_sampling_threshold rope_scaling router_replay_mode rpo_alpha save_safetensors save_steps
save_strategy save_total_limit scale_rewards seed sequence_packing_scheduler sequence_parallel sft_alpha
sgd_momentum sleep_level start_weight_decay steps_per_generation streaming swanlab_exp_name swanlab_project
target_modules target_regex task_type te_rng_tracker teacher_kl_coef teacher_model teacher_model_revision
teacher_model_server teacher_model_type teacher_tag_key temperature tensor_model_parallel_size tensorboard_dir
tensorboard_queue_size tp_comm_overlap train_dataloader_shuffle train_iters trainable_parameters
trainable_parameters_regex truncation_strategy tuner_type undesirable_weight use_cpu_initialization
use_distributed_optimizer use_fused_mhc use_hf use_megatron_fsdp use_persistent_ckpt_worker
use_precision_aware_optimizer use_rslora virtual_pipeline_model_parallel_size vit_attn_impl
vit_gradient_checkpointing vit_gradient_checkpointing_kwargs vit_lr vllm_enable_lora vllm_enable_prefix_caching
vllm_enforce_eager vllm_gpu_memory_utilization vllm_limit_mm_per_prompt vllm_max_model_len vllm_mode
vllm_server_base_url vllm_server_host vllm_server_pass_dataset vllm_server_port vllm_server_timeout
vllm_tensor_parallel_size wandb_exp_name wandb_project weight_decay weight_decay_incr_style
'''.split()


def test_every_documented_flag_has_an_answer():
    import dataclasses
    from megaswift.cli.megatron_compat import _rule
    fields = {f.name for f in dataclasses.fields(RlhfArguments)}
    assert len(DOCUMENTED) == 278
    assert [n for n in DOCUMENTED if n not in fields and _rule(n, 'rlhf') is None] == []
    assert [n for n in MEGATRON_FLAGS if n in fields] == []  # a megaswift flag is never re-routed


# examples/megatron/dense/qwen3_32b.sh of modelscope/ms-swift (3602360), as published.
DENSE_SFT_EXAMPLE = r"""
# 8 * 80GiB
PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' \
NPROC_PER_NODE=8 \
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
megatron sft \
    --model Qwen/Qwen3-32B \
    --save_safetensors true \
    --dataset 'liucong/Chinese-DeepSeek-R1-Distill-data-110k-SFT' \
    --load_from_cache_file true \
    --split_dataset_ratio 0.01 \
    --tensor_model_parallel_size 8 \
    --micro_batch_size 1 \
    --global_batch_size 16 \
    --packing true \
    --recompute_granularity full \
    --recompute_method uniform \
    --recompute_num_layers 1 \
    --num_train_epochs 5 \
    --finetune true \
    --cross_entropy_loss_fusion true \
    --lr 1e-5 \
    --lr_warmup_fraction 0.05 \
    --min_lr 1e-6 \
    --output_dir megatron_output/Qwen3-32B \
    --eval_steps 500 \
    --save_steps 500 \
    --max_length 8192 \
    --dataloader_num_workers 8 \
    --dataset_num_proc 8 \
    --no_save_optim true \
    --no_save_rng true \
    --sequence_parallel true \
    --attention_backend flash
"""


def example_argv(script: str, swaps: dict[str, str]) -> list[str]:
    """The flags after ``megatron sft`` (environment prefixes dropped: one CPU process), values of ``swaps`` replaced;
    every flag of the script is kept."""
    tokens = shlex.split(script.replace('\\\n', ' '), comments=True)  # backslash-newline continues a line
    argv = tokens[tokens.index('sft') + 1:]
    for flag, value in swaps.items():
        argv[argv.index(f'--{flag}') + 1] = value
    return argv


@pytest.mark.slow
def test_megatron_swift_dense_sft_example_trains(run_cli, tiny_llama_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'trainers'))
    from train_cases import write_chat_data
    out = tmp_path / 'megatron_output'
    argv = example_argv(DENSE_SFT_EXAMPLE, {
        'model': tiny_llama_dir, 'dataset': write_chat_data(tmp_path / 'chat.jsonl', n=5, seed=3),
        'output_dir': str(out), 'tensor_model_parallel_size': '1', 'global_batch_size': '2', 'num_train_epochs': '1',
        'max_length': '64', 'dataset_num_proc': '1'})
    assert len([t for t in argv if t.startswith('--')]) == 28  # all of the script's flags
    proc = run_cli(['sft', *argv], env={'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'})
    logs = [json.loads(line) for line in (out / 'logging.jsonl').read_text().splitlines() if line.strip()]
    train_logs = [r for r in logs if 'loss' in r and 'eval_loss' not in r]
    assert [r['step'] for r in train_logs] == [2]        # 4 rows / 2 per step; logged at the last step (every 5)
    assert math.isfinite(train_logs[0]['loss']) and train_logs[0]['lr'] > 0
    assert (out / 'latest_checkpointed_iteration.txt').read_text() == '2'
    assert (out / 'checkpoint-2' / 'model.safetensors').is_file()    # --save_safetensors true
    assert not (out / 'iter_0000002' / 'optim' / 'metadata.json').exists()  # --no_save_optim true
    for line in ('--lr_warmup_fraction 0.05 (Megatron-SWIFT) -> --warmup_ratio 0.05',
                 '--cross_entropy_loss_fusion true (Megatron-SWIFT) -> --cross_entropy_impl auto',
                 '--finetune true (Megatron-SWIFT) is what megaswift does anyway',
                 '--attention_backend flash (Megatron-SWIFT) is what megaswift does anyway',
                 '--no_save_rng true (Megatron-SWIFT) is accepted and changes nothing'):
        assert proc.stderr.count(line) == 1, (line, proc.stderr[-3000:])
