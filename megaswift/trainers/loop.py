"""The training loop on megatron-core: DDP-wrapped chunks, megatron-core optimizer and scheduler,
``get_forward_backward_func`` over the step's micro-batches, per-step logs, evaluation, checkpoints, callbacks.

One optimizer step = ``global_batch_size`` items = ``num_microbatches`` micro-batches of ``micro_batch_size``
items on each of the ``dp`` data-parallel ranks (gradient accumulation is the micro-batch loop inside the
pipeline schedule). The loss is normalised by the step's global token count (``loss.py``), so a run at any
layout follows the single-process trajectory.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from ..template.collator import Collator, collate_micro_batches, packing_efficiency, to_device
from .data import StepSampler, eval_micro_batches, rank_micro_batches
from .generate import GENERATED_OUTPUTS, needs_generation
from .loss import count_loss_tokens, global_token_count, micro_batch_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0
    log_history: list = field(default_factory=list)


@dataclass
class TrainData:
    """What the loop needs from the data pipeline (``data.py``)."""
    collator: Collator
    num_items: int
    val_collator: Optional[Collator] = None
    val_num_items: int = 0
    sampler: Optional[Any] = None  # replaces StepSampler (``streaming.StreamingSampler``; num_items is then 0)
    tokenizer: Optional[Any] = None  # decodes generated text (``--eval_metric nlg``, ``generate.py``)
    stop_token_ids: list = field(default_factory=list)  # where generation stops (EOS, the template's end token)


class Trainer:
    def __init__(self, args, hf_config, model_dir: Optional[str], data: TrainData, max_steps: int, callbacks=None):
        self.args, self.hf_config, self.model_dir, self.data = args, hf_config, model_dir, data
        self.state = TrainerState(max_steps=int(max_steps))
        self.sampler = data.sampler if data.sampler is not None else StepSampler(
            data.num_items, args.global_batch_size, args.data_seed, args.train_dataloader_shuffle)
        self.callbacks = list(callbacks or [])
        self.models = self.optimizer = self.scheduler = None
        self.metrics = []
        self._train_start = None

    # ------------------------------------------------------------------------------------------ setup
    @property
    def is_main_process(self) -> bool:
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    @property
    def models_unwrapped(self) -> list:
        from ..megatron import unwrap_model
        return [unwrap_model(m) for m in self.models]

    def setup(self, resume_dir: Optional[Path] = None) -> None:
        """Build the model (weights from --model / --mcore_model, or a training checkpoint), optimizer, scheduler."""
        from megatron.core import parallel_state as ps

        from ..megatron import current_parallel_config
        from .model import attach_schedule_hooks, build_train_models, resolve_train_dtype, trainable_parameter_count
        from .optim import build_optimizer, build_scheduler
        self.dtype = resolve_train_dtype(self.args)
        self.pcfg = current_parallel_config()
        init_from = 'none' if resume_dir else ('mcore' if self.args.mcore_model else 'hf')
        self.models = build_train_models(self.args, self.hf_config, self.model_dir, self.dtype, self.pcfg, init_from)
        self.optimizer = build_optimizer(self.args, self.models, self.dtype)
        self.scheduler = build_scheduler(self.args, self.optimizer, self.state.max_steps)
        attach_schedule_hooks(self.models, self.optimizer)
        self.ce_impl = self._setup_cross_entropy()
        self.vocab_size = self.models_unwrapped[0].megaswift_info.vocab_size
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.fixed_shape = bool(self.pcfg.virtual_pipeline_model_parallel_size)  # the interleaved schedule
        self.device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device('cpu')
        if resume_dir is not None:
            from .checkpoint import load_checkpoint
            load_checkpoint(self, resume_dir)
        trainable, total = trainable_parameter_count(self.models)
        logger.info('model: %d parameters on this rank, %d trainable; dtype %s; layout TP=%d PP=%d VPP=%s DP=%d',
                    total, trainable, self.dtype, self.pcfg.tensor_model_parallel_size,
                    self.pcfg.pipeline_model_parallel_size, self.pcfg.virtual_pipeline_model_parallel_size,
                    self.dp_size)
        self._build_metrics()
        from .flops import MfuMeter
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.mfu_meter = MfuMeter(self.hf_config, self.device, self.dtype, world)  # active on CUDA only

    def _setup_cross_entropy(self) -> str:
        """--cross_entropy_impl: 'torch' keeps the logits; otherwise the head is fused into the loss."""
        from .head import fuse_head_into_loss, resolve_cross_entropy_impl
        device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')
        impl = resolve_cross_entropy_impl(getattr(self.args, 'cross_entropy_impl', 'auto'), device)
        if impl != 'torch':
            fuse_head_into_loss(self.models_unwrapped)
        logger.info('cross entropy: %s', impl)
        return impl

    def _build_metrics(self) -> None:
        self.metrics = build_eval_metrics(getattr(self.args, 'eval_metric', None) or [])

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {'global_step': self.state.global_step, 'max_steps': self.state.max_steps, 'epoch': self.state.epoch,
                'sampler': self.sampler.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'log_history': self.state.log_history, 'layout': _layout(),
                'use_distributed_optimizer': bool(self.args.use_distributed_optimizer),
                'args': {k: v for k, v in self.args.to_dict().items() if _jsonable(v)}}

    def load_state_dict(self, state: dict) -> None:
        self.state.global_step = int(state['global_step'])
        self.state.epoch = float(state.get('epoch', 0.0))
        self.state.log_history = list(state.get('log_history', []))
        self.sampler.load_state_dict(state['sampler'])
        sched = dict(state['scheduler'])
        self.scheduler.num_steps = int(sched['num_steps'])
        self.scheduler.step(0)  # re-apply the lr of that step to every parameter group

    # ------------------------------------------------------------------------------------------ steps
    def _forward_step(self, data_iterator, model, *, num_tokens, with_accuracy=False):
        batch = next(data_iterator)
        fused = self.ce_impl != 'torch'
        kwargs = {'fp32_output': False} if fused and self.dtype != torch.float32 else {}
        output = model(input_ids=batch['input_ids'], position_ids=batch['position_ids'], attention_mask=None,
                       packed_seq_params=batch['packed_seq_params'], **kwargs)
        weight = None
        if fused and self.is_last_stage:
            from ..megatron import unwrap_model
            from .head import head_weight
            chunk = unwrap_model(model)
            weight = head_weight(chunk) if chunk.post_process else None
        return output, partial(micro_batch_loss, batch=batch, num_tokens=num_tokens, vocab_size=self.vocab_size,
                               label_smoothing=float(self.args.label_smoothing), tp_group=self.tp_group,
                               with_accuracy=with_accuracy, head_weight=weight, impl=self.ce_impl)

    def _run_schedule(self, batches: list, num_tokens, forward_only: bool, with_accuracy: bool = False) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        iters = [iter(batches) for _ in self.models]
        seq = max(int(b['input_ids'].shape[1]) for b in batches)
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, num_tokens=num_tokens, with_accuracy=with_accuracy),
            data_iterator=iters if len(iters) > 1 else iters[0], model=self.models, num_microbatches=len(batches),
            seq_length=seq, micro_batch_size=int(batches[0]['input_ids'].shape[0]), forward_only=forward_only)

    def _reduce(self, outputs: list, key: str) -> torch.Tensor:
        """[sum, count] of ``key`` over this rank's micro-batches, all DP ranks and (from the last stage) PP."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        if self.is_last_stage:
            for out in outputs:
                total += out[key].detach().to(self.device, torch.float64)
        if self.dp_size > 1:
            torch.distributed.all_reduce(total, group=self.dp_group)
        if self.pp_group.size() > 1:
            torch.distributed.all_reduce(total, group=self.pp_group)
        return total.cpu()

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        step_items = self.sampler.next_step()
        mbs = self.args.micro_batch_size
        mine = rank_micro_batches(step_items, self.dp_rank, self.dp_size, mbs)
        batches = [to_device(b, self.device) for b in collate_micro_batches(self.data.collator, mine, self.fixed_shape)]
        num_tokens = global_token_count(sum(count_loss_tokens(b['labels']) for b in batches), self.dp_group,
                                        self.device)
        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run_schedule(batches, num_tokens, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        loss_sum, count = self._reduce(outputs, 'loss').tolist()
        elapsed = time.perf_counter() - start
        all_mbs = [mb for r in range(self.dp_size) for mb in rank_micro_batches(step_items, r, self.dp_size, mbs)]
        tokens = self.data.collator.num_tokens(step_items)
        flops = self.mfu_meter.step_flops(self.data.collator, step_items)  # 0.0 unless on CUDA
        return {'loss': loss_sum / max(count, 1.0), 'grad_norm': float(grad_norm) if grad_norm is not None else None,
                'num_tokens': int(count), 'tokens_per_sec': tokens / max(elapsed, 1e-9), 'flops': flops,
                'step_time': elapsed,
                'packing_efficiency': packing_efficiency(self.data.collator, step_items, self.args.packing,
                                                         self.data.collator.max_length, all_mbs),
                'skipped': not ok}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        data = self.data
        if data.val_collator is None or not data.val_num_items:
            return {}
        for cb in self.callbacks:
            _call(cb, 'on_eval_begin', self)
        for m in self.models:
            m.eval()
        mbs = eval_micro_batches(data.val_num_items, self.dp_rank, self.dp_size, self.args.micro_batch_size)
        outputs = []
        if mbs:
            batches = [to_device(b, self.device)
                       for b in collate_micro_batches(data.val_collator, mbs, self.fixed_shape)]
            outputs = self._run_schedule(batches, torch.ones(1, device=self.device), forward_only=True,
                                         with_accuracy=True)
        for m in self.models:
            m.train()
        loss_sum, count = self._reduce(outputs, 'loss').tolist()
        correct, _ = self._reduce(outputs, 'acc').tolist()
        metrics = {'eval_loss': loss_sum / max(count, 1.0), 'eval_acc': correct / max(count, 1.0),
                   'eval_tokens': int(count)}
        metrics.update(self._extra_metrics(outputs))
        for cb in self.callbacks:
            _call(cb, 'on_eval_end', self, metrics)
        return metrics

    def _extra_metrics(self, outputs: list) -> dict:
        """``--eval_metric``: updated on the last pipeline stage, all-reduced over DP inside ``compute``."""
        if not self.metrics:
            return {}
        result = {}
        if self.is_last_stage:
            generated = None
            for metric in self.metrics:
                metric.reset()
                if needs_generation(metric):  # greedy generation (pipeline parallelism is rejected in preflight)
                    generated = generated or self._generate_eval_texts()
                    _update(metric, **generated)
                else:
                    for out in outputs:
                        _update(metric, loss_sum=out['loss'][0], num_tokens=out['loss'][1], correct=out['acc'][0],
                                preds=out['pred'], labels=out['target'], token_loss=out['token_loss'])
                values = metric.compute(group=self.dp_group)
                result.update({k if k.startswith('eval_') else f'eval_{k}': _to_float(v) for k, v in values.items()})
                metric.reset()
        if self.pp_group.size() > 1:
            from megatron.core import parallel_state as ps
            box = [result]
            torch.distributed.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                                    group=self.pp_group)
            result = box[0]
        return result

    def _generate_eval_texts(self) -> dict:
        """Decoded greedy answers and references of this DP rank's validation samples; also written to
        ``<output_dir>/predict/step-<N>.jsonl``."""
        from .generate import generate_eval_texts, write_predictions
        generated = generate_eval_texts(self)
        write_predictions(self, generated)
        return generated

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainerState:
        args, state = self.args, self.state
        for cb in self.callbacks:
            _call(cb, 'on_train_begin', self)
        self._train_start = time.perf_counter()
        if not self.callbacks and self.is_main_process:
            from .checkpoint import truncate_log_file
            truncate_log_file(Path(args.output_dir) / 'logging.jsonl', state.global_step)
        window: list[dict] = []
        while state.global_step < state.max_steps:
            for cb in self.callbacks:
                _call(cb, 'on_step_begin', self)
            out = self.train_step()
            state.global_step += 1
            state.epoch = self.sampler.epoch
            window.append(out)
            for cb in self.callbacks:
                _call(cb, 'on_step_end', self)
            step, last = state.global_step, state.global_step == state.max_steps
            if step % args.logging_steps == 0 or last:
                self.log(self._step_logs(window))
                window = []
            if self.data.val_num_items and (step % args.eval_steps == 0 or last):
                self.log({'step': step, **self.evaluate()})
            if step % args.save_steps == 0 or (last and args.save_last):
                self.save()
        for cb in self.callbacks:
            _call(cb, 'on_train_end', self)
        return state

    def _step_logs(self, window: list[dict]) -> dict:
        from .optim import current_lr
        last = window[-1]
        n = sum(w['num_tokens'] for w in window)
        return {'step': self.state.global_step, 'epoch': round(self.state.epoch, 4),
                'loss': sum(w['loss'] * w['num_tokens'] for w in window) / max(n, 1) if n else last['loss'],
                'lr': current_lr(self.optimizer), 'grad_norm': last['grad_norm'],
                'tokens_per_sec': sum(w['tokens_per_sec'] for w in window) / len(window),
                **self._mfu_log(window),
                'packing_efficiency': sum(w['packing_efficiency'] for w in window) / len(window),
                'memory_mb': _memory_mb(), 'elapsed_s': round(time.perf_counter() - self._train_start, 3),
                **({'skipped_steps': sum(w['skipped'] for w in window)} if any(w['skipped'] for w in window) else {})}

    def _mfu_log(self, window: list[dict]) -> dict:
        """``{'mfu': ...}`` on CUDA (model FLOPs of the window's steps over their time, per GPU, over the peak)."""
        if not self.mfu_meter.active:
            return {}
        return {'mfu': self.mfu_meter.mfu(sum(w['flops'] for w in window), sum(w['step_time'] for w in window))}

    def log(self, logs: dict) -> None:
        self.state.log_history.append(logs)
        for cb in self.callbacks:
            _call(cb, 'on_log', self, logs)
        if not self.callbacks and self.is_main_process:  # without megaswift.callbacks: a plain line + jsonl
            parts = [f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in logs.items() if k != 'step']
            print(f'[megaswift {self.args.command}] step {logs["step"]}/{self.state.max_steps} ' + ' '.join(parts),
                  flush=True)
            path = Path(self.args.output_dir) / 'logging.jsonl'
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open('a', encoding='utf-8') as f:
                f.write(json.dumps(logs) + '\n')

    def save(self) -> str:
        from .checkpoint import save_checkpoint
        path = save_checkpoint(self)
        for cb in self.callbacks:
            _call(cb, 'on_save', self, path)
        return path


# ---------------------------------------------------------------------------------------------- helpers
EVAL_OUTPUTS = ('loss_sum', 'num_tokens', 'correct', 'preds', 'labels', 'token_loss')


def build_eval_metrics(names: list[str]) -> list:
    """``--eval_metric`` beyond the built-in eval loss and token accuracy (``megaswift.metrics``), checked against
    what a teacher-forced evaluation step produces (``EVAL_OUTPUTS``: per-token predictions and labels of the
    loss tokens, summed losses and counts) or greedy generation (``GENERATED_OUTPUTS``: decoded texts)."""
    from ..arguments.base import ArgumentError
    names = [n for n in names if n not in ('loss', 'acc')]
    if not names:
        return []
    try:
        from ..metrics import build_metrics
    except ImportError as e:
        raise ArgumentError(f'--eval_metric {names}: megaswift.metrics cannot be imported ({e})') from None
    try:
        built = build_metrics(names)
    except ValueError as e:
        raise ArgumentError(f'--eval_metric: {e}') from None
    metrics = dict(built) if isinstance(built, dict) else dict(zip(names, built))
    for name, metric in metrics.items():
        inputs = tuple(getattr(metric, 'inputs', ()) or ())
        generated = [k for k in inputs if k in GENERATED_OUTPUTS]
        missing = [k for k in inputs if k not in (GENERATED_OUTPUTS if generated else EVAL_OUTPUTS)]
        if missing:
            raise ArgumentError(f"--eval_metric {name}: needs {missing}, which evaluation on megatron-core does not "
                                f"produce (it has {', '.join(EVAL_OUTPUTS)} from teacher forcing, or "
                                f"{', '.join(GENERATED_OUTPUTS)} from generation, not both)")
    return list(metrics.values())


def _call(cb, name: str, *a) -> None:
    fn = getattr(cb, name, None)
    if fn is not None:
        fn(*a)


def _update(metric, **kw) -> None:
    if getattr(metric, 'inputs', None):
        metric.update_from(kw)
        return
    import inspect
    params = inspect.signature(metric.update).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    metric.update(**kw)


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean())
    return v


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _layout() -> dict:
    from ..megatron.checkpoint import current_layout
    return current_layout()


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        import psutil
        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except ImportError:  # pragma: no cover
        return 0.0


__all__ = ['Trainer', 'TrainerState', 'TrainData', 'build_eval_metrics']
