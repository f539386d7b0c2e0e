"""The GRPO step driver: generation batches from a rollout engine, rewards, advantages, then optimizer steps on
megatron-core with ``objectives/grpo.py``'s loss.

A generation (every ``--steps_per_generation x --num_iterations`` steps):

1. push the policy's weights to the engine (``generation.py``: in place when colocated, over the weight-sync
   group to a ``megaswift rollout`` server);
2. draw ``generation_batch_size / num_generations`` prompts (the sampler's position is the resumable data
   position) and have global rank 0 generate ``--num_generations`` completions of each, every prompt with its own
   seed ``(--seed, draw, prompt index)``, so a resumed run generates the same completions from the same weights;
   with ``--multi_turn_scheduler`` each completion goes on as a conversation, turn by turn (``multi_turn.py``);
3. score them with ``--reward_funcs`` (weighted by ``--reward_weights``) and turn the rewards into advantages
   (``advantages.py``); ``--dynamic_sample`` drops groups whose rewards are all equal and draws more prompts, at
   most ``--max_resample_times`` times (then fills up with dropped groups);
4. broadcast the batch to every rank, cut it into ``steps_per_generation`` steps of ``--global_batch_size``
   completions (each rank takes its micro-batches of each step, as ``rank_micro_batches`` splits any step), and
   run the frozen passes once for all of them: the reference (``--beta`` > 0) and the old policy (when a batch
   trains more than one step).

``--async_generate``: generation k + 1 runs in a thread of rank 0 (the colocated engine or the server) while
generation k trains; it starts right after the weights are pushed, so it samples from the policy one generation
behind (verl's one-step-off; the loss's ratio is against the old log-probs the trainer computes when the batch
arrives). ``time/rollout_wait`` is how long training waited for it. A checkpoint taken with a generation under
way draws its prompts again on resume (generated from the resumed weights: not bit-exact across that resume).

Logged at the step that generated: reward mean/std (total and per function), advantage std, completion lengths
(mean/min/max) and the share cut by ``--max_completion_length``, groups dropped by dynamic sampling, and the time
split ``time/weight_sync``, ``time/rollout``, ``time/reward``, ``time/logps`` (frozen passes), ``time/train``.
Failures on rank 0 (a dead server, a reward function that raises) reach every rank as one error: no rank waits.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ...template.collator import to_device
from ...utils.constants import IGNORE_INDEX
from ..data import rank_micro_batches
from ..loop import Trainer
from ..nonfinite import strict_json
from ..rollout import sample_seed
from .advantages import compute_advantages, zero_std_groups
from ...rollout.weight_sync import RolloutError
from .generation import broadcast_from_rank0, build_source, generate_checked
from .multi_turn import BATCH_KEYS, build_multi_turn
from .rewards import RewardSet, reward_labels

logger = logging.getLogger(__name__)


class GrpoTrainer(Trainer):
    def __init__(self, *a, prompts, **kw):
        super().__init__(*a, **kw)
        self.prompts = prompts
        self.rewards = RewardSet(self.args.reward_funcs, self.args.reward_weights) if self.is_main_process else None
        self.multi_turn = build_multi_turn(self.args, self.data.tokenizer, self.data.collator.max_length //
                                           self.args.micro_batch_size) if self.is_main_process else None
        # this rank's micro-batches of each remaining step of the generation, with the step's prompt rows
        self.buffer: list[tuple[list[dict], list[int]]] = []
        self.generations = 0
        self.source = None
        self._inflight = None   # --async_generate: (prompt ids, rank 0's future) of the generation under way
        self._executor = None

    def setup(self, resume_dir=None) -> None:
        super().setup(resume_dir)
        rank0 = self.parallel.rank == 0
        source = self._on_rank0(lambda: build_source(self.args, self.model_dir, True), share=False)
        self.source = source if rank0 else build_source(self.args, self.model_dir, False)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**super().state_dict(), 'grpo': {'generations': self.generations, 'steps_left': len(self.buffer),
                                                 'inflight': self._inflight is not None}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        grpo = state.get('grpo', {})
        self.generations = int(grpo.get('generations', 0))
        if grpo.get('inflight'):  # its prompts are drawn again (and generated from the resumed weights)
            self.sampler.consumed -= self.args.prompts_per_generation
        if grpo.get('steps_left'):
            logger.warning('the checkpoint was saved %d steps before the end of a generation batch: training goes '
                           'on with the next generation batch', grpo['steps_left'])

    # ------------------------------------------------------------------------------------------ generation
    def _on_rank0(self, fn, share: bool = True):
        """``fn()`` on global rank 0; its error is raised on every rank (no rank is left waiting in a collective),
        its result is broadcast to every rank (``share``) or stays on rank 0."""
        status, value, error = None, None, None
        if self.parallel.rank == 0:
            try:
                value, status = fn(), 'ok'
            except Exception as e:  # noqa: BLE001 - raised below, on every rank
                status, error = f'{type(e).__name__}: {e}', e
        status = broadcast_from_rank0(status)
        if status != 'ok':
            if error is not None:
                raise error
            raise RolloutError(f'GRPO generation failed on rank 0: {status}')
        return broadcast_from_rank0(value) if share else value

    def _draw(self, draw: int, prompt_ids: list[int]) -> dict:
        """Rank 0: completions and rewards of one draw of prompts."""
        a = self.args
        requests = [{'prompt_token_ids': self.prompts.ids[i], 'n': a.num_generations, 'temperature': a.temperature,
                     'top_p': a.top_p, 'top_k': a.top_k, 'max_tokens': a.max_completion_length,
                     'seed': sample_seed(a.seed, draw, i)} for i in prompt_ids]
        t0 = time.perf_counter()
        results = generate_checked(self.source, requests)
        convs = self.multi_turn.run(self.source, self.prompts, prompt_ids, requests, results) if self.multi_turn \
            else None
        t1 = time.perf_counter()
        owners = [i for i, comps in zip(prompt_ids, results) for _ in comps]
        token_ids = [c['token_ids'] for comps in results for c in comps]
        texts = self.data.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        columns = self.prompts.reward_columns(owners, token_ids)
        if convs is not None:  # the final conversations (--multi_turn_scheduler)
            texts, columns = self.multi_turn.reward_inputs(convs, columns)
        per_func = self.rewards.score(texts, columns)
        return {'prompt_ids': prompt_ids, 'token_ids': token_ids, 'texts': texts,
                'logprobs': [c['logprobs'] for comps in results for c in comps],
                'finish': [c['finish_reason'] for comps in results for c in comps],
                'per_func': per_func.tolist(), 'total': self.rewards.total(per_func).tolist(),
                'time/rollout': t1 - t0, 'time/reward': time.perf_counter() - t1,
                **(self.multi_turn.batch_columns(convs) if convs is not None else {})}

    def _generate(self) -> tuple[dict, dict]:
        """The generation batch (on every rank) and its metrics."""
        a = self.args
        g, need = a.num_generations, a.prompts_per_generation
        kept, dropped, draws, timing = [], [], 0, {'time/rollout': 0.0, 'time/reward': 0.0}
        while True:
            draw = self.sampler.consumed // need
            prompt_ids = self.sampler.next_step()
            batch = self._on_rank0(lambda: self._draw(draw, prompt_ids))
            draws += 1
            for k in timing:
                timing[k] += batch[k]
            total = torch.tensor(batch['total'], dtype=torch.float64).reshape(len(prompt_ids), g)
            flat = zero_std_groups(total) if a.dynamic_sample else torch.zeros(len(prompt_ids), dtype=torch.bool)
            for p in range(len(prompt_ids)):
                (dropped if flat[p] else kept).append((batch, p))
            if len(kept) >= need or not a.dynamic_sample or draws > a.max_resample_times:
                break
        groups = (kept + dropped)[:need]
        return self._assemble(groups), {**timing, 'dynamic_sample/dropped_groups': float(len(dropped)),
                                        'dynamic_sample/draws': float(draws)}

    def _assemble(self, groups: list[tuple[dict, int]]) -> dict:
        g = self.args.num_generations
        keys = ('token_ids', 'texts', 'finish', 'per_func', 'total') + tuple(
            k for k in ('logprobs', *BATCH_KEYS) if k in groups[0][0])
        out = {k: [] for k in ('prompt',) + keys}
        for batch, p in groups:
            rows = range(p * g, (p + 1) * g)
            out['prompt'] += [batch['prompt_ids'][p]] * g
            for k in keys:
                out[k] += [batch[k][r] for r in rows]
        total = torch.tensor(out['total'], dtype=torch.float64).reshape(len(groups), g)
        out['advantages'] = compute_advantages(total, self.args.advantage_estimator,
                                               self.args.scale_rewards).reshape(-1).tolist()
        return out

    def _sequences(self, gen: dict) -> list[dict]:
        seqs = []
        masks = gen.get('gen_mask') or [None] * len(gen['token_ids'])  # multi-turn: 1 on generated tokens
        for prompt, ids, finish, mask in zip(gen['prompt'], gen['token_ids'], gen['finish'], masks):
            prompt_ids = self.prompts.ids[prompt]
            trained = not (self.args.overlong_filter and finish == 'length')
            labels = ids if trained else [IGNORE_INDEX] * len(ids)
            if mask is not None and trained:
                labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
            seqs.append({'input_ids': np.asarray(prompt_ids + ids, dtype=np.int64),
                         'labels': np.asarray([IGNORE_INDEX] * len(prompt_ids) + labels, dtype=np.int64)})
        return seqs

    def _sync(self) -> float:
        """Push the policy's weights to the engine (every rank takes part); returns the seconds it took."""
        t0 = time.perf_counter()
        self._on_rank0(lambda: None)  # every rank here before the weight push
        self.source.sync(self.models, self.parallel)
        return time.perf_counter() - t0

    def _launch(self) -> None:
        """--async_generate: draw the next prompts (every rank) and generate them in a thread of rank 0."""
        need = self.args.prompts_per_generation
        draw = self.sampler.consumed // need
        prompt_ids = self.sampler.next_step()
        future = None
        if self.parallel.rank == 0:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix='grpo-generate')
            future = self._executor.submit(self._draw, draw, prompt_ids)
        self._inflight = (prompt_ids, future)

    def _next_generation(self) -> tuple[dict, dict]:
        """The generation batch and its metrics. With ``--async_generate`` it is the batch generated in the background
        while the previous one trained (from the weights before that training: one generation off-policy; the
        loss's ratio is against the old log-probs the trainer computes now), and the next one is launched at once
        on the weights just pushed."""
        if not self.args.async_generate:
            t_sync = self._sync()
            gen, metrics = self._generate()
            return gen, {**metrics, 'time/weight_sync': t_sync}
        t_sync = 0.0
        if self._inflight is None:  # the first generation (or the first after a resume): nothing prefetched
            t_sync += self._sync()
            self._launch()
        prompt_ids, future = self._inflight
        t0 = time.perf_counter()
        batch = self._on_rank0(lambda: future.result())
        wait = time.perf_counter() - t0
        self._inflight = None
        t_sync += self._sync()
        self._launch()
        gen = self._assemble([(batch, p) for p in range(len(prompt_ids))])
        return gen, {'time/rollout': batch['time/rollout'], 'time/reward': batch['time/reward'],
                     'time/rollout_wait': wait, 'time/weight_sync': t_sync}

    def _refill(self) -> dict:
        """Generate the next batch and fill ``self.buffer``; returns the generation's metrics."""
        a, ctx = self.args, self.parallel
        gen, metrics = self._next_generation()
        self.generations += 1
        if a.log_completions and self.is_main_process:
            self._log_completions(gen)
        t1 = time.perf_counter()
        seqs = self._sequences(gen)
        engine = engine_logprobs(gen, self.prompts.ids) if 'logprobs' in gen and 'gen_mask' not in gen else None
        collator, gbs, mbs = self.data.collator, a.global_batch_size, a.micro_batch_size
        steps, prompts = [], []
        for s in range(a.steps_per_generation):
            step = list(range(s * gbs, (s + 1) * gbs))
            steps.append([to_device(collator.collate([seqs[i] for i in mb], batch_columns(gen, engine, mb)),
                                    self.device) for mb in rank_micro_batches(step, ctx.dp_rank, ctx.dp_size, mbs)])
            prompts.append(sorted({gen['prompt'][i] for i in step}))
        self.run_frozen_models([b for step in steps for b in step])
        self.buffer = [(step, p) for _ in range(a.num_iterations) for step, p in zip(steps, prompts)]
        metrics['time/logps'] = time.perf_counter() - t1
        return {**metrics, **generation_metrics(gen, reward_labels(self.args.reward_funcs))}

    def _log_completions(self, gen: dict) -> None:
        path = Path(self.args.output_dir) / 'completions.jsonl'
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = reward_labels(self.args.reward_funcs)
        with path.open('a', encoding='utf-8') as f:
            for k, text in enumerate(gen['texts']):
                prompt = self.prompts.prompts[gen['prompt'][k]]
                turns = {'conversation': gen['conversation'][k], 'turns': gen['turns'][k]} if 'turns' in gen else {}
                f.write(json.dumps(strict_json({
                    'step': self.state.global_step + 1, 'generation': self.generations, 'prompt': prompt.messages,
                    'completion': text, 'finish_reason': gen['finish'][k], **turns,
                    'rewards': dict(zip(labels, gen['per_func'][k])), 'reward': gen['total'][k],
                    'advantage': gen['advantages'][k]}), ensure_ascii=False) + '\n')

    # ------------------------------------------------------------------------------------------ step
    def train_step(self) -> dict:
        start = time.perf_counter()
        generated = self._refill() if not self.buffer else {}
        batches, prompts = self.buffer.pop(0)
        self.nonfinite.step_samples = lambda: prompts  # named by --on_nonfinite abort
        t_train = time.perf_counter()
        self._denominators(batches)
        reduced, grad_norm, ok = self.optimizer_step(batches)
        loss_sum, count = reduced.pop('loss')
        tokens = self._reduce_tokens(batches)
        reduced.update({k: (float(v), 1.0) for k, v in generated.items()})
        reduced['time/train'] = (time.perf_counter() - t_train, 1.0)
        elapsed = time.perf_counter() - start
        return {'loss': loss_sum / max(count, 1e-12), 'grad_norm': float(grad_norm) if grad_norm is not None else None,
                'num_tokens': tokens, 'tokens_per_sec': tokens / max(elapsed, 1e-9), 'flops': 0.0,
                'step_time': elapsed, 'objective': reduced, 'packing_efficiency': 1.0, 'skipped': not ok}

    def _reduce_tokens(self, batches: list[dict]) -> int:
        """The step's trained (completion) tokens over all data-parallel ranks."""
        local = sum(int(b['num_real_tokens']) for b in batches)
        t = torch.tensor([local], dtype=torch.float64, device=self.device)
        if self.parallel.dp_size > 1:
            torch.distributed.all_reduce(t, group=self.parallel.dp_group)
        return int(t.item())

    def train(self):
        try:
            return super().train()
        finally:
            if self._inflight is not None and self._inflight[1] is not None:
                self._inflight[1].cancel()
                try:
                    self._inflight[1].result()  # a generation under way finishes before the engine closes
                except Exception:  # noqa: BLE001 - the run is over; its error (if any) was not needed
                    pass
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self.source is not None:
                self.source.close()


def batch_columns(gen: dict, engine: list | None, samples: list[int]) -> dict:
    """The collator's extra columns of a micro-batch of ``samples``: ``advantages`` (one per completion) and, when
    known, ``rollout_logps`` (per token)."""
    columns = {'advantages': [('sample', gen['advantages'][i]) for i in samples]}
    if engine is not None:
        columns['rollout_logps'] = [('sequence', [engine[i]]) for i in samples]
    return columns


def engine_logprobs(gen: dict, prompt_ids: list[list[int]]) -> list[np.ndarray]:
    """Each sequence's rollout-engine log-probs laid out like the shifted labels (position t: the log-prob of token
    t + 1; 0 elsewhere), for the loss's ``rollout/logp_diff``."""
    return [np.asarray([0.0] * (len(prompt_ids[p]) - 1) + list(lp) + [0.0], dtype=np.float32)
            for p, lp in zip(gen['prompt'], gen['logprobs'])]


def generation_metrics(gen: dict, names: list[str]) -> dict[str, float]:
    total = torch.tensor(gen['total'], dtype=torch.float64)
    per_func = torch.tensor(gen['per_func'], dtype=torch.float64)
    lengths = torch.tensor([sum(m) for m in gen['gen_mask']] if 'gen_mask' in gen else  # generated tokens
                           [len(t) for t in gen['token_ids']], dtype=torch.float64)
    out = {'reward': total.mean().item(), 'reward_std': _std(total),
           'advantages/std': _std(torch.tensor(gen['advantages'], dtype=torch.float64)),
           'completions/mean_length': lengths.mean().item(), 'completions/min_length': lengths.min().item(),
           'completions/max_length': lengths.max().item(),
           'completions/clipped_ratio': sum(f == 'length' for f in gen['finish']) / max(len(gen['finish']), 1)}
    if 'turns' in gen:
        out['completions/mean_turns'] = sum(gen['turns']) / max(len(gen['turns']), 1)
    for k, name in enumerate(names):
        out[f'rewards/{name}/mean'] = per_func[:, k].mean().item()
        out[f'rewards/{name}/std'] = _std(per_func[:, k])
    return out


def _std(x: torch.Tensor) -> float:
    return x.std().item() if x.numel() > 1 else 0.0


__all__ = ['GrpoTrainer', 'generation_metrics']
