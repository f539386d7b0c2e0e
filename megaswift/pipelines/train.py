"""``megaswift sft`` / ``pt`` / ``rlhf``: wire the arguments to the megatron-core trainer and its objective.

Order of work, so that bad input fails in seconds: flags (parse time) -> model config, layout and checkpoint
checks (``preflight``) -> process groups -> dataset load, encode (cached; rank 0 first), packing, batch plan ->
model build and weights -> training.
"""
from __future__ import annotations

import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..arguments.base import ArgumentError
from ..arguments.rlhf import RlhfArguments
from ..arguments.train import PtArguments, SftArguments
from ..utils.paths import check_output_dir_writable

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    model_dir: str
    hf_config: object
    max_length: int
    resume_dir: Optional[Path] = None
    objective: type = None  # the Objective class (its template mode, sequences and columns shape the data)
    tokenizer: object = None  # --model's, read once here (an unreadable one fails before the process group)


def preflight(args) -> Plan:
    """Everything that can be checked from the flags, the model's config and the output directory."""
    from ..megatron import get_model_family
    from ..model import load_tokenizer, read_model_config, resolve_model_dir
    from ..utils.errors import UserError
    if args.model:
        model_dir = resolve_model_dir(args.model)
    else:
        model_dir = args.mcore_model
        if not os.path.isfile(os.path.join(model_dir, 'config.json')):
            raise ArgumentError(f"--mcore_model '{model_dir}' has no config.json; pass --model too (the HF model "
                                f'whose config and tokenizer to use)')
    hf_config = read_model_config(model_dir, '--model' if args.model else '--mcore_model')
    tokenizer = load_tokenizer(model_dir, '--model' if args.model else '--mcore_model')
    try:
        get_model_family(hf_config)
        args.parallel_config(hf_config=hf_config)  # the model's heads and layers split over TP and PP x VPP
    except UserError:
        raise
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    max_pos = int(getattr(hf_config, 'max_position_embeddings', 0) or 0)
    max_length = args.max_length or max_pos or 2048
    if max_pos and max_length > max_pos:
        logger.warning('--max_length %d exceeds the model\'s max_position_embeddings %d', max_length, max_pos)
    resume_dir = None
    from ..trainers.checkpoint import (check_optimizer_compatible, output_dir_has_checkpoint, read_trainer_state,
                                       resolve_resume_dir)
    if args.resume_from_checkpoint:
        resume_dir = resolve_resume_dir(args.resume_from_checkpoint, args.output_dir)
        resume_state = read_trainer_state(resume_dir)
        check_optimizer_compatible(resume_state, args, resume_dir)
        from ..trainers.streaming import check_resume_streaming
        check_resume_streaming(resume_state, args, resume_dir)
    elif output_dir_has_checkpoint(args.output_dir) and not args.overwrite_output_dir:
        raise ArgumentError(f"--output_dir '{args.output_dir}' already holds checkpoints; pass "
                            f'--resume_from_checkpoint true to continue that run, --overwrite_output_dir true to '
                            f'start over there, or another --output_dir')
    from ..trainers.generate import check_generation_layout
    from ..trainers.eval_metrics import build_eval_metrics
    from ..trainers.loop import objective_name
    from ..trainers.objectives import losses
    # an unknown objective fails before any model is built
    flag = '--rlhf_type' if getattr(args, 'rlhf_type', None) else '--loss_type'
    objective = losses.lookup(objective_name(args), flag=flag)
    if 'teacher' in objective.frozen_models:
        check_same_tokenizer(tokenizer, model_dir, args.teacher_model)
    check_weights_to_load(args, model_dir, resume_dir)
    check_output_dir_writable(args.output_dir, '--output_dir')  # before any model is built
    # unknown or unusable --eval_metric fail here, not after the model is built
    check_generation_layout(build_eval_metrics(list(args.eval_metric)), args)
    if args.mcore_model and not os.path.isdir(args.mcore_model):
        raise ArgumentError(f"--mcore_model: '{args.mcore_model}' does not exist or is not a directory")
    return Plan(model_dir, hf_config, int(max_length), resume_dir, objective, tokenizer)


def check_weights_to_load(args, model_dir: str, resume_dir: Optional[Path]) -> None:
    """Every HF model folder the run may load weights from has a readable config and weights (megatron-core reads
    safetensors only):
    ``--model`` unless a checkpoint (``--resume_from_checkpoint``, ``--mcore_model``) provides the weights and no
    frozen reference can default to it, and ``--ref_model`` / ``--teacher_model`` when given."""
    from ..model import check_model_weights, read_model_config, resolve_model_dir
    reference_from_model = bool(getattr(args, 'rlhf_type', None)) and not getattr(args, 'ref_model', None)
    folders = {model_dir: '--model'} if (resume_dir is None and not args.mcore_model) or reference_from_model else {}
    for flag in ('--ref_model', '--teacher_model'):
        other = getattr(args, flag[2:], None)
        if other:
            folders.setdefault(resolve_model_dir(other), flag)
    for folder, flag in folders.items():
        read_model_config(folder, flag)
        check_model_weights(folder, safetensors_only=True, flag=flag)


def check_same_tokenizer(tokenizer, model_dir: str, teacher: str) -> None:
    """Distillation compares distributions token by token: the teacher must share the student's (``tokenizer``,
    of ``model_dir``) vocabulary."""
    from ..model import load_tokenizer, resolve_model_dir
    teacher_dir = resolve_model_dir(teacher)
    if tokenizer.get_vocab() != load_tokenizer(teacher_dir, '--teacher_model').get_vocab():
        raise ArgumentError(f"--teacher_model '{teacher}' has another tokenizer than --model '{model_dir}'; "
                            f'distillation needs the same vocabulary')


def prepare_data(args, plan: Plan):
    """Encoded, packed train (and eval) data and the number of optimizer steps."""
    from ..template.packing import padding_multiple
    from ..dataset.encode import encode_on_rank0_first
    from ..dataset.loader import load_rows, split_rows
    from ..template.collator import Collator, build_items
    from ..template.plain_text import PlainTextEncoder
    from ..utils.errors import TrainDataError
    from ..trainers.loop import TrainData
    tokenizer = plan.tokenizer
    if args.use_chat_template:
        encoder = chat_encoder(args, tokenizer, plan.max_length)
        encoder.set_mode(plan.objective.template_mode)
    else:
        encoder = PlainTextEncoder(tokenizer, plan.max_length, args.truncation_strategy)
    if args.streaming:
        train_rows, val_rows = None, None
    else:
        rows = load_rows(args.dataset, args.data_seed, chat=args.use_chat_template)
        train_rows, val_rows = split_rows(rows, args.split_dataset_ratio, args.data_seed)
    if args.val_dataset:
        extra = load_rows(args.val_dataset, args.data_seed, chat=args.use_chat_template)
        if val_rows is not None:
            extra.rows += val_rows.rows
            extra.sources += val_rows.sources
        val_rows = extra
    prepare_rows = None
    if plan.objective.template_mode == 'kto':  # each row's KL completion: the next row's answer
        from ..dataset import add_kl_responses
        prepare_rows = add_kl_responses  # --streaming: within each window of rows
        train_rows = add_kl_responses(train_rows) if train_rows is not None else None
        val_rows = add_kl_responses(val_rows) if val_rows is not None and len(val_rows) else val_rows
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences, columns = tuple(plan.objective.sequences), tuple(plan.objective.columns)
    row_length = plan.max_length * len(sequences)  # a sample's sequences share a packed row
    multiple = padding_multiple(args.tensor_model_parallel_size, 1, args.sequence_parallel)

    def collator(row_set, desc):
        if row_set is None:  # --streaming: the sampler makes one of every step's samples
            return Collator(None, [], args.padding_free, multiple, pad_id, row_length, columns=columns,
                            sequences=sequences), 0
        encoded = encode_on_rank0_first(row_set, encoder, args.dataset_num_proc, desc)
        items = build_items(encoded, args.packing, row_length)
        return Collator(encoded, items, args.padding_free, multiple, pad_id, row_length, columns=columns,
                        sequences=sequences), len(items)

    train_collator, n_items = collator(train_rows, 'encoding train set')
    from ..trainers.generate import stop_token_ids
    data = TrainData(train_collator, n_items, tokenizer=tokenizer,
                     stop_token_ids=stop_token_ids(tokenizer, encoder, plan.hf_config, plan.model_dir))
    if args.streaming:
        from ..trainers.streaming import streaming_sampler
        data.sampler = streaming_sampler(args, encoder, data, row_length, prepare_rows)
    if val_rows is not None and len(val_rows):
        data.val_collator, data.val_num_items = collator(val_rows, 'encoding eval set')
    if args.max_steps:
        max_steps = int(args.max_steps)
    else:
        max_steps = max(1, math.ceil(args.num_train_epochs * n_items / args.global_batch_size))
    if not args.streaming and n_items < args.global_batch_size:
        logger.warning('the training set has %d %s, fewer than --global_batch_size %d: a step repeats items',
                       n_items, 'packed rows' if args.packing else 'samples', args.global_batch_size)
    if args.warmup_steps and args.warmup_steps >= max_steps:
        raise TrainDataError(f'--warmup_steps {args.warmup_steps} must be smaller than the number of training steps '
                             f'({max_steps})')
    if args.streaming:
        return data, max_steps
    check_data = getattr(plan.objective, 'check_data', None)
    if check_data is not None:
        check_data(train_collator.encoded, args)
    stats = train_collator.encoded.lengths
    logger.info('train set: %d samples -> %d %s, %d tokens (mean %.1f, max %d); %d steps of %d items',
                len(stats), n_items, 'packed rows' if args.packing else 'items', int(stats.sum()),
                float(stats.mean()), int(stats.max()), max_steps, args.global_batch_size)
    return data, max_steps


def chat_encoder(args, tokenizer, max_length: int):
    """The chat template of ``--template`` / ``--agent_template`` / ``--loss_scale`` / ``--system``."""
    from ..template import get_template
    try:
        return get_template(tokenizer, args.template, agent_template=args.agent_template, loss_scale=args.loss_scale,
                            system=args.system, max_length=max_length, truncation_strategy=args.truncation_strategy)
    except ValueError as e:
        raise ArgumentError(f'--template: {e}') from None


def build_callback_list(args) -> list:
    """``megaswift.callbacks``: the defaults (progress/log lines, logging.jsonl, loss curve) + --callbacks +
    --report_to; the one place training logs are printed and written."""
    from ..callbacks import build_callbacks
    return list(build_callbacks(list(args.callbacks), args))


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(int(seed))


def train_main(args):
    """Run ``sft`` / ``pt`` / ``rlhf`` with ``args``; returns the final ``TrainerState`` (``log_history`` holds the logs)."""
    import torch
    for pattern in (r'.*(Transformer Engine|Apex) (and Apex )?(are|is) not installed', r'.*Falling back to Torch Norm',
                    r'full scope is deprecated', r'.*`torch.distributed.(reduce_scatter|all_gather_into)_tensor`',
                    r'The .grad attribute of a Tensor that is not a leaf'):
        warnings.filterwarnings('ignore', message=pattern)
    plan = preflight(args)
    from ..megatron import ParallelConfig, destroy_parallel, initialize_parallel
    owns_world = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    parallel = initialize_parallel(ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                                  args.virtual_pipeline_model_parallel_size, args.sequence_parallel),
                                   seed=args.seed)
    try:
        _seed_everything(args.seed)
        from ..trainers.checkpoint import remove_partial_saves
        from ..trainers.loop import Trainer
        if getattr(args, 'rlhf_type', None) == 'grpo':
            from ..trainers.grpo.data import prepare_grpo_data
            from ..trainers.grpo.trainer import GrpoTrainer
            data, max_steps, prompts = prepare_grpo_data(args, plan, chat_encoder)
            trainer = GrpoTrainer(args, plan.hf_config, plan.model_dir, data, max_steps, build_callback_list(args),
                                  parallel=parallel, prompts=prompts)
        else:
            data, max_steps = prepare_data(args, plan)
            trainer = Trainer(args, plan.hf_config, plan.model_dir, data, max_steps, build_callback_list(args),
                              parallel=parallel)
        trainer.setup(plan.resume_dir)
        output_dir = Path(args.output_dir)
        if torch.distributed.get_rank() == 0:  # only once the data and the model are ready: no files otherwise
            output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(output_dir)
            (output_dir / 'args.json').write_text(_args_json(args))
        if plan.resume_dir is not None:
            logger.info('resumed from %s at step %d', plan.resume_dir, trainer.state.global_step)
        torch.distributed.barrier()
        state = trainer.train()
        torch.distributed.barrier()
    finally:
        destroy_parallel(destroy_process_group=owns_world)
    return state


def _args_json(args) -> str:
    import json
    out = {}
    for k, v in args.to_dict().items():
        try:
            json.dumps(v)
            out[k] = v
        except (TypeError, ValueError):
            out[k] = str(v)
    return json.dumps(out, indent=2) + '\n'


def sft_main(args: SftArguments | None = None, **kwargs):
    """``megaswift sft``; ``sft_main(model=..., dataset=[...], ...)`` works too."""
    return train_main(args if args is not None else SftArguments(**kwargs))


def pt_main(args: PtArguments | None = None, **kwargs):
    """``megaswift pt``: continued pre-training on plain text (``text`` column), loss on every token."""
    return train_main(args if args is not None else PtArguments(**kwargs))


def rlhf_main(args: RlhfArguments | None = None, **kwargs):
    """``megaswift rlhf --rlhf_type dpo|orpo|simpo|cpo|kto|rm|gkd|grpo``: preference, reward, distillation and online
    RL training."""
    return train_main(args if args is not None else RlhfArguments(**kwargs))
