"""The training loop on megatron-core: DDP-wrapped chunks, megatron-core optimizer and scheduler,
``get_forward_backward_func`` over the step's micro-batches, per-step logs, evaluation, checkpoints, callbacks.

One optimizer step = ``global_batch_size`` items = ``num_microbatches`` micro-batches of ``micro_batch_size``
items on each of the ``dp`` data-parallel ranks (gradient accumulation is the micro-batch loop inside the
pipeline schedule). The loss is normalised by the step's global token count (``loss.py``), so a run at any
layout follows the single-process trajectory.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from ..megatron.forward import model_forward, run_schedule
from ..template.collator import Collator, collate_micro_batches, packing_efficiency, to_device
from .data import StepSampler, eval_micro_batches, rank_micro_batches
from .eval_metrics import build_eval_metrics, compute_eval_metrics
from .loss import global_token_count
from .nonfinite import NonFinitePolicy, training_rows
from .objectives import ModelOutput, Objective, build_objective
from .preemption import Preemption
from .rollout import Rollout

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
    """Runs an ``Objective`` (``--loss_type``, default 'sft') on megatron-core at the layout of ``parallel``."""

    def __init__(self, args, hf_config, model_dir: Optional[str], data: TrainData, max_steps: int, callbacks=None,
                 parallel=None, objective: Optional[Objective] = None):
        self.args, self.hf_config, self.model_dir, self.data = args, hf_config, model_dir, data
        self.parallel = parallel
        self.objective = objective if objective is not None else build_objective(objective_name(args), args)
        self.state = TrainerState(max_steps=int(max_steps))
        self.sampler = data.sampler if data.sampler is not None else StepSampler(
            data.num_items, args.global_batch_size, args.data_seed, args.train_dataloader_shuffle)
        self.callbacks = list(callbacks or [])
        self.nonfinite = NonFinitePolicy(getattr(args, 'on_nonfinite', 'abort'))
        self.models = self.optimizer = self.scheduler = None
        self.frozen: dict[str, list] = {}
        self.precomputed: dict = {}  # split -> PrecomputedOutputs (--precompute_ref_log_probs)
        self.metrics = []
        self._train_start = None

    # ------------------------------------------------------------------------------------------ setup
    @property
    def is_main_process(self) -> bool:
        if self.parallel is not None:
            return self.parallel.rank == 0
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    @property
    def models_unwrapped(self) -> list:
        from ..megatron import unwrap_model
        return [unwrap_model(m) for m in self.models]

    def setup(self, resume_dir: Optional[Path] = None) -> None:
        """Build the model (weights from --model / --mcore_model, or a training checkpoint), the objective's frozen
        models, the optimizer and the scheduler."""
        from ..megatron import ParallelContext
        from .model import (attach_schedule_hooks, build_frozen_models, build_train_models, resolve_cross_entropy_impl,
                            resolve_train_dtype, trainable_parameter_count)
        from .optim import build_optimizer, build_scheduler
        if self.parallel is None:
            self.parallel = ParallelContext.from_megatron()
        ctx, objective = self.parallel, self.objective
        self.dtype = resolve_train_dtype(self.args)
        self.device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device('cpu')
        # --cross_entropy_impl: 'torch' keeps the logits; otherwise the LM head is fused into the loss
        self.ce_impl = resolve_cross_entropy_impl(getattr(self.args, 'cross_entropy_impl', 'auto'), self.device)
        fused = self.ce_impl != 'torch' and objective.head == 'lm'
        logger.info('objective: %s; head: %s; cross entropy: %s', type(objective).__name__, objective.head,
                    self.ce_impl)
        init_from = 'none' if resume_dir else ('mcore' if self.args.mcore_model else 'hf')
        self.models = build_train_models(self.args, self.hf_config, self.model_dir, self.dtype, ctx, init_from,
                                         head=objective.head, fused_lm_head=fused)
        precompute = ('ref',) if getattr(self.args, 'precompute_ref_log_probs', False) else ()
        for name in objective.frozen_models:
            if name == 'policy' or self._reference_is_lora_base(name) or name in precompute:
                continue  # the trained model itself (forward-only; adapters off for the reference); precomputed
            self.frozen[name] = build_frozen_models(self.args, self.frozen_hf_config(name),
                                                    self.frozen_model_dir(name), self.dtype, ctx,
                                                    fused_lm_head=fused)
        self.optimizer = build_optimizer(self.args, self.models, self.dtype)
        self.scheduler = build_scheduler(self.args, self.optimizer, self.state.max_steps)
        attach_schedule_hooks(self.models, self.optimizer)
        self.vocab_size = self.models_unwrapped[0].megaswift_info.vocab_size
        self.fixed_shape = bool(ctx.vpp_size)  # the interleaved schedule needs one shape for all micro-batches
        if resume_dir is not None:
            from .checkpoint import load_checkpoint
            self.load_state_dict(load_checkpoint(self.checkpoint_parts(), resume_dir))
        if precompute:
            from .precompute import precompute_reference
            self.precomputed = precompute_reference(self)
        trainable, total = trainable_parameter_count(self.models)
        logger.info('model: %d parameters on this rank, %d trainable; dtype %s; layout TP=%d PP=%d VPP=%s DP=%d',
                    total, trainable, self.dtype, ctx.tp_size, ctx.pp_size, ctx.vpp_size, ctx.dp_size)
        self.metrics = build_eval_metrics(getattr(self.args, 'eval_metric', None) or [])
        from .flops import MfuMeter
        self.mfu_meter = MfuMeter(self.hf_config, self.device, self.dtype, ctx.world_size)  # active on CUDA only

    def frozen_model_dir(self, name: str) -> str:
        """Where the frozen model ``name`` comes from: ``--ref_model`` / ``--teacher_model`` (a folder or an embedded
        model's id, resolved as ``--model`` is), else ``--model``."""
        from ..model import resolve_model_dir
        given = getattr(self.args, f'{name}_model', None)
        return resolve_model_dir(given) if given else self.model_dir

    def frozen_hf_config(self, name: str):
        if self.frozen_model_dir(name) == self.model_dir:
            return self.hf_config
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(self.frozen_model_dir(name))

    def _reference_is_lora_base(self, name: str) -> bool:
        """The reference of a LoRA run without ``--ref_model`` is the trained model with its adapters off."""
        return name == 'ref' and self.args.tuner_type == 'lora' and not getattr(self.args, 'ref_model', None)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        from .checkpoint import jsonable_items
        return {'global_step': self.state.global_step, 'max_steps': self.state.max_steps, 'epoch': self.state.epoch,
                'sampler': self.sampler.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'log_history': self.state.log_history, 'layout': self.parallel.layout(),
                'use_distributed_optimizer': bool(self.args.use_distributed_optimizer),
                **self.nonfinite.state_dict(), 'args': jsonable_items(self.args.to_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.state.global_step = int(state['global_step'])
        self.state.epoch = float(state.get('epoch', 0.0))
        self.state.log_history = list(state.get('log_history', []))
        self.sampler.load_state_dict(state['sampler'])
        self.nonfinite.load_state_dict(state)
        sched = dict(state['scheduler'])
        self.scheduler.num_steps = int(sched['num_steps'])
        self.scheduler.step(0)  # re-apply the lr of that step to every parameter group

    # ------------------------------------------------------------------------------------------ forward
    def model_output(self, model, output: torch.Tensor) -> ModelOutput:
        """The last stage's ``output`` of chunk ``model`` with the means to compute token-level losses from it."""
        weight = None
        if self.ce_impl != 'torch' and self.objective.head == 'lm':
            from ..megatron import unwrap_model
            from ..megatron.heads import head_weight
            weight = head_weight(unwrap_model(model))
        return ModelOutput(output, weight, self.vocab_size, self.parallel.tp_group, self.ce_impl)

    def forward(self, model, batch: dict) -> torch.Tensor:
        keep_dtype = self.ce_impl != 'torch' and self.dtype != torch.float32
        return model_forward(model, batch, keep_dtype=keep_dtype)

    def _forward_step(self, data_iterator, model, *, evaluate=False):
        batch = next(data_iterator)
        output = self.forward(model, batch)

        def loss_func(out):
            return self.objective.loss(self.model_output(model, out), batch, evaluate=evaluate)
        return output, loss_func

    def _frozen_step(self, data_iterator, model, *, name: str):
        batch = next(data_iterator)
        output = self.forward(model, batch)

        def store(out):
            batch.update(self.objective.frozen_outputs(name, self.model_output(model, out), batch))
            return out.sum() * 0.0, torch.zeros((), dtype=torch.int), {}
        return output, store

    def run_frozen_models(self, batches: list[dict], split: str = 'train', only: Optional[str] = None) -> None:
        """Each frozen model's forward-only pass over ``batches`` (``frozen_outputs`` adds its results to them; a
        precomputed one copies its stored outputs), then the objective's step preparation (not with ``only``:
        one model's pass)."""
        import contextlib
        if split in self.precomputed and only is None:
            for b in batches:
                self.precomputed[split].fill(b)
        for name in self.objective.frozen_models if batches else ():
            if (only is not None and name != only) or (only is None and split in self.precomputed and name == 'ref'):
                continue
            models, switch = self.frozen.get(name), contextlib.nullcontext()
            if models is None:  # 'policy', or the LoRA base as the reference
                models = self.models
                if name == 'ref':
                    from ..tuners.lora import adapters_disabled
                    switch = adapters_disabled(self.models)
            with torch.no_grad(), switch:
                run_schedule(models, batches, partial(self._frozen_step, name=name), forward_only=True)
        if only is None:
            self.objective.prepare_step(batches, self.parallel)

    def _collate(self, collator: Collator, micro_batches: list[list[int]]) -> list[dict]:
        batches = [to_device(b, self.device) for b in collate_micro_batches(collator, micro_batches, self.fixed_shape)]
        if self.precomputed:  # the encoded samples of each micro-batch: precomputed outputs are looked up by them
            for b, mb in zip(batches, micro_batches):
                b['sample_indices'] = torch.tensor(collator.sample_indices(mb), dtype=torch.long)
        return batches

    def _denominators(self, batches: list[dict]) -> None:
        """``batch['loss_denominator']``: the objective's counts summed over the step (all micro-batches and
        data-parallel ranks; every rank calls this, with or without micro-batches): a tensor, or a dict of
        tensors named by ``objective.normalisers``."""
        names = self.objective.normalisers
        counts = [self.objective.count(b) for b in batches]
        local = [sum(c[n] for c in counts) for n in names] if names else [sum(counts)]
        totals = global_token_count(local, self.parallel.dp_group, self.device)
        denominator = {n: totals[i] for i, n in enumerate(names)} if names else totals
        for b in batches:
            b['loss_denominator'] = denominator

    def _reduce(self, outputs: list, names: tuple) -> dict[str, tuple[float, float]]:
        """``{name: (sum, count)}`` over this rank's micro-batches, all DP ranks and (from the last stage) PP."""
        ctx = self.parallel
        total = torch.zeros(len(names), 2, dtype=torch.float64, device=self.device)  # NCCL: device tensors
        if ctx.is_last_stage:
            for out in outputs:
                for i, name in enumerate(names):
                    total[i] += out[name].detach().to(self.device, torch.float64)
        if ctx.dp_size > 1:
            torch.distributed.all_reduce(total, group=ctx.dp_group)
        if ctx.pp_size > 1:
            torch.distributed.all_reduce(total, group=ctx.pp_group)
        return {name: tuple(row) for name, row in zip(names, total.cpu().tolist())}

    def optimizer_step(self, batches: list[dict]) -> tuple[dict, Optional[float], bool]:
        """One optimizer step over this rank's ``batches`` (denominators set, frozen outputs in them): the schedule's
        forwards and backwards, the optimizer, the scheduler. Returns the reduced metrics, grad norm and whether the
        step was taken."""
        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_schedule(self.models, batches, self._forward_step, forward_only=False)
        reduced = self._reduce(outputs, self.objective.metric_names(evaluate=False))
        ok, grad_norm = self.nonfinite.optimizer_step(self, *reduced['loss'])  # --on_nonfinite abort|skip
        if ok:
            self.scheduler.step(increment=1)
        return reduced, grad_norm, ok

    def train_step(self) -> dict[str, Any]:
        start = time.perf_counter()
        ctx = self.parallel
        step_items = self.sampler.next_step()
        mbs = self.args.micro_batch_size
        mine = rank_micro_batches(step_items, ctx.dp_rank, ctx.dp_size, mbs)
        batches = self.objective.rollout(self._collate(self.data.collator, mine),
                                         Rollout(self, mine, self.state.global_step + 1))
        self._denominators(batches)
        self.run_frozen_models(batches)
        all_mbs = [mb for r in range(ctx.dp_size) for mb in rank_micro_batches(step_items, r, ctx.dp_size, mbs)]
        self.nonfinite.step_samples = partial(training_rows, self.data, all_mbs)
        reduced, grad_norm, ok = self.optimizer_step(batches)
        loss_sum, count = reduced.pop('loss')
        elapsed = time.perf_counter() - start
        tokens = self.data.collator.num_tokens(step_items)
        flops = self.mfu_meter.step_flops(self.data.collator, step_items)  # 0.0 unless on CUDA
        return {'loss': loss_sum / max(count, 1.0), 'grad_norm': float(grad_norm) if grad_norm is not None else None,
                'num_tokens': int(count), 'tokens_per_sec': tokens / max(elapsed, 1e-9), 'flops': flops,
                'step_time': elapsed, 'objective': reduced,
                'packing_efficiency': packing_efficiency(self.data.collator, step_items, self.args.packing,
                                                         self.data.collator.max_length, all_mbs),
                'skipped': not ok}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        data, ctx = self.data, self.parallel
        if data.val_collator is None or not data.val_num_items:
            return {}
        for cb in self.callbacks:
            _call(cb, 'on_eval_begin', self)
        for m in self.models:
            m.eval()
        mbs = eval_micro_batches(data.val_num_items, ctx.dp_rank, ctx.dp_size, self.args.micro_batch_size)
        outputs = []
        batches = self._collate(data.val_collator, mbs)
        self._denominators(batches)  # on every DP rank, also one without validation micro-batches
        self.run_frozen_models(batches, split='val')
        if mbs:
            outputs = run_schedule(self.models, batches, partial(self._forward_step, evaluate=True),
                                   forward_only=True)
        for m in self.models:
            m.train()
        reduced = self._reduce(outputs, self.objective.metric_names(evaluate=True))
        loss_sum, count = reduced.pop('loss')
        metrics = {'eval_loss': loss_sum / max(count, 1.0)}
        metrics.update({f'eval_{name}': s / max(c, 1.0) for name, (s, c) in reduced.items()})
        metrics['eval_tokens'] = int(count)
        metrics.update(self._extra_metrics(outputs))
        for cb in self.callbacks:
            _call(cb, 'on_eval_end', self, metrics)
        return metrics

    def _extra_metrics(self, outputs: list) -> dict:
        """``--eval_metric``: updated on the last pipeline stage, all-reduced over DP inside ``compute``."""
        if not self.metrics:
            return {}
        ctx = self.parallel
        result = {}
        if ctx.is_last_stage:
            result = compute_eval_metrics(self.metrics, outputs, self._generate_eval_texts, ctx.dp_group)
        if ctx.pp_size > 1:
            box = [result]
            torch.distributed.broadcast_object_list(box, src=ctx.pp_last_rank, group=ctx.pp_group)
            result = box[0]
        return result

    def _generate_eval_texts(self) -> dict:
        """Decoded greedy answers and references of this DP rank's validation samples; also written to
        ``<output_dir>/predict/step-<N>.jsonl``."""
        from .generate import EvalGeneration, generate_eval_texts, write_predictions
        ctx = self.parallel
        model = self.models[0]
        job = EvalGeneration(forward=lambda b: self.model_output(model, self.forward(model, to_device(b, self.device))),
                             models=self.models, collator=self.data.val_collator,
                             tokenizer=self.data.tokenizer, stop_ids=self.data.stop_token_ids,
                             hf_config=self.hf_config, model_dir=self.model_dir,
                             max_new_tokens=int(getattr(self.args, 'max_new_tokens', 64) or 64),
                             micro_batch_size=int(self.args.micro_batch_size), dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        generated = generate_eval_texts(job)
        write_predictions(generated, Path(self.args.output_dir), self.state.global_step, ctx.dp_group,
                          self.is_main_process)
        return generated

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainerState:
        args, state = self.args, self.state
        for cb in self.callbacks:
            _call(cb, 'on_train_begin', self)
        self._train_start = time.perf_counter()
        window: list[dict] = []
        with Preemption() as preemption:
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
                if saved := step % args.save_steps == 0 or (last and args.save_last):
                    self.save()
                if preemption.stop_now(self, saved):  # SIGTERM / SIGUSR1 on any rank: checkpoint, stop
                    break
        for cb in self.callbacks:
            _call(cb, 'on_train_end', self)
        return state

    def _step_logs(self, window: list[dict]) -> dict:
        from .optim import current_lr
        last = window[-1]
        n = sum(w['num_tokens'] for w in window)
        return {'step': self.state.global_step, 'epoch': round(self.state.epoch, 4),
                'loss': sum(w['loss'] * w['num_tokens'] for w in window) / max(n, 1) if n else last['loss'],
                **_window_metrics(window),
                'lr': current_lr(self.optimizer), 'grad_norm': last['grad_norm'],
                'tokens_per_sec': sum(w['tokens_per_sec'] for w in window) / len(window),
                **self._mfu_log(window),
                'packing_efficiency': sum(w['packing_efficiency'] for w in window) / len(window),
                'memory_mb': _memory_mb(), 'elapsed_s': round(time.perf_counter() - self._train_start, 3),
                **self.nonfinite.logs(),
                **({'skipped_steps': sum(w['skipped'] for w in window)} if any(w['skipped'] for w in window) else {})}

    def _mfu_log(self, window: list[dict]) -> dict:
        """``{'mfu': ...}`` on CUDA (model FLOPs of the window's steps over their time, per GPU, over the peak)."""
        if not self.mfu_meter.active:
            return {}
        return {'mfu': self.mfu_meter.mfu(sum(w['flops'] for w in window), sum(w['step_time'] for w in window))}

    def log(self, logs: dict) -> None:
        """Record ``logs`` and hand them to the callbacks (``megaswift.callbacks``: log lines, logging.jsonl)."""
        self.state.log_history.append(logs)
        for cb in self.callbacks:
            _call(cb, 'on_log', self, logs)

    def checkpoint_parts(self):
        from .checkpoint import CheckpointParts
        return CheckpointParts(self.models, self.optimizer, self.args, self.hf_config, self.model_dir, self.dtype,
                               self.parallel.layout(), self.objective.head)

    def save(self) -> str:
        from .checkpoint import save_checkpoint
        path = save_checkpoint(self.checkpoint_parts(), self.state.global_step, self.state_dict())
        for cb in self.callbacks:
            _call(cb, 'on_save', self, path)
        return path


# ---------------------------------------------------------------------------------------------- helpers
def objective_name(args) -> str:
    """The ``losses`` entry a command trains: ``rlhf``'s ``--rlhf_type``; ``sft``'s ``--loss_type``, else 'sft'."""
    return getattr(args, 'rlhf_type', None) or getattr(args, 'loss_type', None) or 'sft'


def _window_metrics(window: list[dict]) -> dict:
    """The objective's own metrics (beyond the loss) over the logging window: sum / count of each."""
    totals: dict[str, list] = {}
    for w in window:
        for name, (s, c) in w.get('objective', {}).items():
            totals[name] = [t + v for t, v in zip(totals.get(name, (0.0, 0.0)), (s, c))]
    return {name: s / max(c, 1.0) for name, (s, c) in totals.items()}


def _call(cb, name: str, *a) -> None:
    getattr(cb, name, lambda *_: None)(*a)


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        import psutil
        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except ImportError:  # pragma: no cover
        return 0.0


__all__ = ['Trainer', 'TrainerState', 'TrainData', 'objective_name']
