"""Arguments of ``megaswift sft`` and ``megaswift pt`` (Megatron-SWIFT's flag names), composed of small groups.

Checks that need only the flags (and the launch's world size) run here, at parse time; checks that need
the model's config (the layout against the model: ``ParallelArguments.parallel_config(hf_config=...)``) or the
data run in ``pipelines/train.py`` before any model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..utils.dist import world_size
from .base import (ArgumentError, ArgumentsBase, DataArguments, ModelArguments, ParallelArguments, PluginArguments,
                   TemplateArguments)

LR_DECAY_STYLES = ('cosine', 'linear', 'constant')


@dataclass
class TrainModelArguments:
    mcore_model: str | None = None      # start from an mcore checkpoint (its config/tokenizer files are used)
    template: str | None = None         # default: inferred from the tokenizer's chat template


@dataclass
class TrainDataArguments:
    max_length: int | None = None       # default: the model's max_position_embeddings
    truncation_strategy: str = 'delete'  # delete | left | right | error
    packing: bool = False               # best-fit-decreasing bins of --max_length tokens (forces padding_free)
    padding_free: bool = True           # a micro-batch is one row of concatenated samples (thd attention)
    loss_scale: str = 'default'
    agent_template: str | None = None
    use_chat_template: bool = True      # pt: False (plain text, loss on every token)
    split_dataset_ratio: float = 0.0    # held out of --dataset for evaluation
    val_dataset: list[str] = field(default_factory=list)
    dataset_num_proc: int = 1
    train_dataloader_shuffle: bool = True
    streaming: bool = False             # read --dataset lazily in bounded memory (larger than RAM); needs --max_steps
    shuffle_buffer_size: int = 1000     # --streaming: rows shuffled together (seeded by --data_seed, anew every epoch)
    packing_interval: int = 1000        # --streaming: rows encoded (and, with --packing, packed) together

    def _check(self):
        if self.max_length is not None and self.max_length < 2:
            raise ArgumentError(f'--max_length: must be >= 2, got {self.max_length}')
        if self.truncation_strategy not in ('delete', 'left', 'right', 'error'):
            raise ArgumentError(f"--truncation_strategy: unknown value '{self.truncation_strategy}' "
                                f'(delete, left, right, error)')
        if self.packing and not self.padding_free:
            self.padding_free = True  # as ms-swift: packing implies padding-free rows
        if not 0.0 <= self.split_dataset_ratio < 1.0:
            raise ArgumentError(f'--split_dataset_ratio: must be in [0, 1), got {self.split_dataset_ratio}')
        if self.dataset_num_proc < 1:
            raise ArgumentError(f'--dataset_num_proc: must be >= 1, got {self.dataset_num_proc}')
        if self.shuffle_buffer_size < 0:
            raise ArgumentError(f'--shuffle_buffer_size: must be >= 0, got {self.shuffle_buffer_size}')
        if self.packing_interval < 1:
            raise ArgumentError(f'--packing_interval: must be >= 1, got {self.packing_interval}')
        if self.streaming and getattr(self, 'max_steps', None) is None:
            raise ArgumentError('--streaming true needs --max_steps: a stream has no known length, so epochs cannot '
                                'be turned into steps (when the files end, the stream restarts, reshuffled)')
        if self.streaming and self.split_dataset_ratio:
            raise ArgumentError('--split_dataset_ratio cannot hold rows out of a stream (--streaming true); pass the '
                                'evaluation rows as --val_dataset (read whole, not streamed)')
        from ..template.loss_scale import get_loss_scale
        try:
            get_loss_scale(self.loss_scale)
        except ValueError as e:
            raise ArgumentError(f'--loss_scale: {e}') from None
        from ..template import templates
        if getattr(self, 'template', None) is not None and self.template not in templates:
            raise ArgumentError(f"--template: unknown template '{self.template}' "
                                f"(available: {', '.join(sorted(templates))})")
        from ..template.agent import agent_templates
        if self.agent_template is not None and self.agent_template not in agent_templates:
            raise ArgumentError(f"--agent_template: unknown agent template '{self.agent_template}' "
                                f"(available: {', '.join(sorted(agent_templates))})")


@dataclass
class TrainParallelArguments(ParallelArguments):
    sequence_parallel: bool = False
    use_distributed_optimizer: bool | None = None  # default: True for adam/adamw (ZeRO-1), False for sgd

    def _check(self):
        # as Megatron-LM: sequence parallelism is off without TP (nothing to split)
        self.sequence_parallel = self.parallel_config(world_size=self.world_size).sequence_parallel

    @property
    def world_size(self) -> int:
        return world_size()

    @property
    def data_parallel_size(self) -> int:
        """This launch's data-parallel size; ``ParallelLayoutError`` if its processes cannot hold the layout."""
        return self.world_size // self.parallel_config(world_size=self.world_size).model_parallel_size


@dataclass
class BatchArguments:
    micro_batch_size: int = 1           # samples (or packed rows) per micro-batch and DP rank
    global_batch_size: int = 16         # samples (or packed rows) per optimizer step, all DP ranks together

    def _check(self):
        for name in ('micro_batch_size', 'global_batch_size'):
            if getattr(self, name) < 1:
                raise ArgumentError(f'--{name}: must be >= 1, got {getattr(self, name)}')
        dp = self.data_parallel_size  # validates the layout first (this check runs before the parallel group's)
        world, tp, pp = self.world_size, self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        per_pass = self.micro_batch_size * dp
        if self.global_batch_size % per_pass:
            raise ArgumentError(f'--global_batch_size {self.global_batch_size} is not divisible by --micro_batch_size '
                                f'{self.micro_batch_size} x data-parallel size {dp} (= {world} processes / TP {tp} / '
                                f'PP {pp}) = {per_pass}; use a multiple of {per_pass}')
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp and self.num_microbatches < pp:
            raise ArgumentError(f'--virtual_pipeline_model_parallel_size needs at least --pipeline_model_parallel_size '
                                f'({pp}) micro-batches per step, got {self.num_microbatches} (--global_batch_size / '
                                f'(--micro_batch_size x DP)); raise --global_batch_size')

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)


@dataclass
class OptimArguments:
    optimizer: str = 'adamw'            # adamw | sgd (megaswift.trainers.optim.optimizers)
    lr: float | None = None             # default: 1e-5 (full), 1e-4 (lora)
    min_lr: float = 0.0
    embedding_lr: float | None = None   # a separate peak lr for the embedding and output layer
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0              # 0 disables clipping
    lr_decay_style: str = 'cosine'      # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0           # used when --warmup_steps is 0

    def _check(self):
        from ..trainers.optim import optimizers
        if self.optimizer not in optimizers:
            raise ArgumentError(f"--optimizer: unknown optimizer '{self.optimizer}' "
                                f"(available: {', '.join(sorted(optimizers))})")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ArgumentError(f"--lr_decay_style: unknown style '{self.lr_decay_style}' "
                                f"({', '.join(LR_DECAY_STYLES)})")
        if self.lr is not None and self.lr <= 0:
            raise ArgumentError(f'--lr: must be > 0, got {self.lr}')
        if self.min_lr < 0 or (self.lr is not None and self.min_lr > self.lr):
            raise ArgumentError(f'--min_lr: must be in [0, --lr], got {self.min_lr}')
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise ArgumentError(f'--embedding_lr: must be > 0, got {self.embedding_lr}')
        if self.warmup_steps < 0:
            raise ArgumentError(f'--warmup_steps: must be >= 0, got {self.warmup_steps}')
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ArgumentError(f'--warmup_ratio: must be in [0, 1), got {self.warmup_ratio}')
        if self.use_distributed_optimizer is None:
            self.use_distributed_optimizer = self.optimizer in ('adam', 'adamw')
        elif self.use_distributed_optimizer and self.optimizer == 'sgd':
            raise ArgumentError('--use_distributed_optimizer true supports --optimizer adamw only (megatron-core); '
                                'pass --use_distributed_optimizer false with sgd')
        if self.clip_grad < 0:
            raise ArgumentError(f'--clip_grad: must be >= 0, got {self.clip_grad}')
        if self.weight_decay < 0:
            raise ArgumentError(f'--weight_decay: must be >= 0, got {self.weight_decay}')


CROSS_ENTROPY_IMPLS = ('auto', 'torch', 'chunked', 'cuda')


@dataclass
class TrainLoopArguments:
    max_steps: int | None = None
    num_train_epochs: float | None = None  # used when --max_steps is not given (default 1)
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    recompute_granularity: str | None = None  # full | selective
    recompute_method: str = 'uniform'
    recompute_num_layers: int = 1
    label_smoothing: float = 0.0
    # the LM head + loss: auto (cuda kernel on GPU when built, else chunked), torch (materialised logits, megatron-
    # core's vocab-parallel CE), chunked (megaswift.ops, no N x V logits), cuda (megaswift.ops + csrc kernels)
    cross_entropy_impl: str = 'auto'
    # the training objective, a name in megaswift.trainers.objectives.losses (ms-swift's flag for a custom loss);
    # default 'sft' (checked in preflight, after --external_plugins registered theirs)
    loss_type: str | None = None
    # a step whose loss or grad norm is NaN/inf: abort (name the step and its samples, save nothing, exit non-zero)
    # or skip (drop its update, count it as nonfinite_skipped, go on); megaswift/trainers/nonfinite.py
    on_nonfinite: str = 'abort'

    def _check(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise ArgumentError(f'--max_steps: must be >= 1, got {self.max_steps}')
        epochs = self.num_train_epochs
        if epochs is not None and not (epochs > 0 and math.isfinite(epochs)):
            raise ArgumentError(f'--num_train_epochs: must be > 0, got {self.num_train_epochs}')
        if self.bf16 and self.fp16:
            raise ArgumentError('--bf16 and --fp16 exclude each other')
        from ..trainers.nonfinite import ON_NONFINITE
        if self.on_nonfinite not in ON_NONFINITE:
            raise ArgumentError(f"--on_nonfinite: unknown value '{self.on_nonfinite}' ({', '.join(ON_NONFINITE)})")
        if self.recompute_granularity not in (None, 'none', 'full', 'selective'):
            raise ArgumentError(f"--recompute_granularity: unknown value '{self.recompute_granularity}' "
                                f'(full, selective)')
        if self.recompute_granularity == 'none':
            self.recompute_granularity = None
        if self.recompute_method not in ('uniform', 'block'):
            raise ArgumentError(f"--recompute_method: unknown value '{self.recompute_method}' (uniform, block)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ArgumentError(f'--label_smoothing: must be in [0, 1), got {self.label_smoothing}')
        if self.cross_entropy_impl not in CROSS_ENTROPY_IMPLS:
            raise ArgumentError(f"--cross_entropy_impl: unknown value '{self.cross_entropy_impl}' "
                                f"({', '.join(CROSS_ENTROPY_IMPLS)})")
        if self.cross_entropy_impl == 'cuda':
            import torch
            if not torch.cuda.is_available():
                raise ArgumentError('--cross_entropy_impl cuda needs a CUDA GPU; on CPU use auto or chunked')


@dataclass
class SaveArguments:
    output_dir: str | None = None        # default: output/<model name>
    save_steps: int = 500
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    save_last: bool = True               # also save after the last step
    save_safetensors: bool = True        # also write HF safetensors (checkpoint-<step>/) at every save
    no_save_optim: bool = False
    no_load_optim: bool = False          # resume model, scheduler and data position with a fresh optimizer
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or 'true' for the latest in --output_dir
    overwrite_output_dir: bool = False

    def _check(self):
        if self.save_steps < 1:
            raise ArgumentError(f'--save_steps: must be >= 1, got {self.save_steps}')
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ArgumentError(f'--save_total_limit: must be >= 1, got {self.save_total_limit}')
        if self.resume_from_checkpoint is not None and self.resume_from_checkpoint.lower() in ('false', 'none', ''):
            self.resume_from_checkpoint = None


@dataclass
class LogArguments:
    logging_steps: int = 5
    callbacks: list[str] = field(default_factory=list)
    report_to: list[str] = field(default_factory=list)
    # read by the reporters in callbacks/reporters.py (Megatron-SWIFT's names)
    tensorboard_dir: str | None = None   # default: <output_dir>/runs
    wandb_project: str | None = None     # default: $WANDB_PROJECT, else 'megaswift'
    wandb_exp_name: str | None = None    # default: the --output_dir folder name
    swanlab_project: str | None = None   # default: 'megaswift'
    swanlab_exp_name: str | None = None  # default: the --output_dir folder name

    def _check(self):
        if self.logging_steps < 1:
            raise ArgumentError(f'--logging_steps: must be >= 1, got {self.logging_steps}')
        self.report_to = [r for r in self.report_to if r.lower() != 'none']


@dataclass
class EvalArguments:
    eval_steps: int | None = None        # default: --save_steps
    eval_metric: list[str] = field(default_factory=list)  # extra metrics beside loss and acc
    max_new_tokens: int = 64             # --eval_metric nlg: greedy answer length limit (stops earlier at EOS)

    def _check(self):
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ArgumentError(f'--eval_steps: must be >= 1, got {self.eval_steps}')
        if self.max_new_tokens < 1:
            raise ArgumentError(f'--max_new_tokens: must be >= 1, got {self.max_new_tokens}')


@dataclass
class TunerArguments:
    tuner_type: str = 'full'             # full | lora | freeze
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ['all-linear'])
    freeze_parameters: list[str] = field(default_factory=list)     # mcore name prefixes (decoder.layers.0, embedding)
    freeze_parameters_regex: str | None = None
    trainable_parameters: list[str] = field(default_factory=list)  # win over --freeze_parameters
    trainable_parameters_regex: str | None = None

    def _check(self):
        if self.tuner_type not in ('full', 'lora', 'freeze'):
            raise ArgumentError(f"--tuner_type: unknown value '{self.tuner_type}' (full, lora, freeze)")
        if self.tuner_type == 'lora':
            if self.lora_rank < 1:
                raise ArgumentError(f'--lora_rank: must be >= 1, got {self.lora_rank}')
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ArgumentError(f'--lora_dropout: must be in [0, 1), got {self.lora_dropout}')
        if self.tuner_type == 'freeze' and not (self.freeze_parameters or self.freeze_parameters_regex
                                                or self.trainable_parameters or self.trainable_parameters_regex):
            raise ArgumentError('--tuner_type freeze needs --freeze_parameters (or --trainable_parameters): mcore '
                                'parameter name prefixes such as embedding or decoder.layers.0')


@dataclass
class SftArguments(ArgumentsBase, PluginArguments, ModelArguments, TrainModelArguments, TemplateArguments,
                   DataArguments, TrainDataArguments, TrainParallelArguments, BatchArguments, OptimArguments,
                   TrainLoopArguments, SaveArguments, LogArguments, EvalArguments, TunerArguments):
    """``megaswift sft``: supervised fine-tuning on chat data (template + loss scale)."""

    def _check(self):
        if not self.model and not self.mcore_model:
            raise ArgumentError('--model is required (an HF model directory or hub id; or --mcore_model)')
        if not self.dataset:
            raise ArgumentError('--dataset is required')
        if self.lr is None:
            self.lr = 1e-4 if self.tuner_type == 'lora' else 1e-5
            if self.min_lr > self.lr:
                raise ArgumentError(f'--min_lr ({self.min_lr}) exceeds the default --lr ({self.lr})')
        if self.max_steps is None and self.num_train_epochs is None:
            self.num_train_epochs = 1.0
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        if self.output_dir is None:
            import os
            name = os.path.basename(os.path.normpath(self.model or self.mcore_model))
            self.output_dir = os.path.join('output', name)

    @property
    def command(self) -> str:
        return 'sft'


@dataclass
class PtArguments(SftArguments):
    """``megaswift pt``: continued pre-training; no chat template, loss on every token."""
    use_chat_template: bool = False
    loss_scale: str = 'all'

    @property
    def command(self) -> str:
        return 'pt'
