"""The sampling loop: prompts -> engine -> rewards -> selection -> resumable output."""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from ..dataset import load_dataset
from ..infer_engine import RequestConfig, get_infer_engine
from ..model import check_model_weights, resolve_model_dir
from ..rewards import get_orm, get_prm, score_completions
from ..utils import dist
from ..utils.errors import ArgumentError, UserError, one_line
from ..utils.paths import check_output_dir_writable
from .cache import load_cached_samples
from .output import OutputError, SampleOutput, default_output_file, find_resumable
from .prompts import Prompt, build_prompt, output_row
from .selection import Candidate, select

logger = logging.getLogger(__name__)


def shard_bounds(num_rows: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Contiguous [start, end) of a shard; sizes differ by at most one and no row is dropped."""
    if shard is None:
        return 0, num_rows
    index, count = shard
    base, extra = divmod(num_rows, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def load_reward(getter, name: str | None, kwargs: dict, flag: str):
    """``getter(name, **kwargs)`` (``get_orm`` / ``get_prm``), or None without ``name``; a reward model folder that
    cannot be loaded (no weights, an unsupported architecture) or kwargs its class refuses fail in one line."""
    if not name:
        return None
    try:
        return getter(name, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise ArgumentError(f"{flag} '{name}': {one_line(e)}") from None


class Sampler:
    def __init__(self, args):
        """``args``: a ``SamplingArguments`` (``megaswift.arguments.sampling``) or any object with its fields."""
        self.args = args
        if not args.data_range:
            rank, world = dist.rank(), dist.world_size()  # under torchrun every rank samples its own shard
            if world > 1:
                args.data_range = [rank, world]
        self.shard = tuple(args.data_range) if args.data_range else None
        self.cached = load_cached_samples(args.cache_files) if args.cache_files else {}
        self.prompts = self._load_prompts()
        start, end = shard_bounds(len(self.prompts), self.shard)
        self.prompts = self.prompts[start:end]
        self.row_offset = start
        bs = args.num_sampling_batch_size
        self.num_batches = -(-len(self.prompts) // bs)
        if args.num_sampling_batches is not None and args.num_sampling_batches < self.num_batches:
            logger.info('--num_sampling_batches %d: sampling %d of %d prompts in this shard',
                        args.num_sampling_batches, args.num_sampling_batches * bs, len(self.prompts))
            self.num_batches = args.num_sampling_batches
            self.prompts = self.prompts[:self.num_batches * bs]

    # ------------------------------------------------------------------ inputs
    def _load_prompts(self) -> list[Prompt]:
        a = self.args
        if a.dataset:
            ds = load_dataset(a.dataset, seed=a.data_seed, shuffle=a.dataset_shuffle)
            return [build_prompt(row, str(src), a.system) for row, src in zip(ds.rows, ds.sources)]
        # --sampler_engine no without --dataset: the prompts are the cached rows themselves
        prompts = []
        for sid, group in self.cached.items():
            row = dict(group['row'], messages=group['row']['messages'][:-1], id=sid)
            prompts.append(build_prompt(row, group['source'], a.system))
        return prompts

    def _responses_from_cache(self, prompt: Prompt) -> list[str] | None:
        group = self.cached.get(prompt.id)
        n = self.args.num_return_sequences
        if group is None:
            return None
        if self.args.sampler_engine == 'no':
            return group['responses']
        return group['responses'][:n] if len(group['responses']) >= n else None

    # ------------------------------------------------------------------ main loop
    def run(self) -> str:
        a = self.args
        # the prompts themselves, so resuming against an edited dataset is refused
        fingerprint = dict(a.fingerprint(), prompts_md5=hashlib.md5(
            ''.join(p.id for p in self.prompts).encode()).hexdigest())
        check_output_dir_writable(a.output_dir, '--output_dir')
        output_file = a.output_file
        if output_file is None and a.resume:
            output_file = find_resumable(Path(a.output_dir), self.shard, fingerprint)
            if output_file is None:
                raise OutputError(f'--resume: no unfinished run in {a.output_dir} matches these arguments; '
                                 f'pass --output_file to name it')
        output = SampleOutput(a.output_dir, output_file or default_output_file(self.shard), fingerprint,
                              resume=a.resume, override=a.override_exist_file)
        if a.sampler_engine == 'no':
            missing = [p for p in self.prompts if p.id not in self.cached]
            if missing:
                raise OutputError(f'--sampler_engine no: {len(missing)} prompts have no cached samples in '
                                 f'{a.cache_files} (first: {missing[0].source}, id {missing[0].id})')
        # rewards first: a wrong reward name fails before the policy is loaded
        orm = load_reward(get_orm, a.orm_model, a.orm_kwargs, '--orm_model')
        prm = load_reward(get_prm, a.prm_model, a.prm_kwargs, '--prm_model')
        engine = None
        if a.sampler_engine != 'no' and any(self._responses_from_cache(p) is None for p in self.prompts):
            if a.sampler_engine != 'client':  # every local backend: one line before it starts (client: a server)
                check_model_weights(resolve_model_dir(a.model))
            kwargs = dict(a.engine_kwargs)
            if a.sampler_engine == 'transformers':
                kwargs.setdefault('max_batch_size', a.max_batch_size)
            engine = get_infer_engine(a.sampler_engine, a.model, a.torch_dtype, **kwargs)
        stats = {'prompts': 0, 'samples': 0, 'lines': 0, 'no_passing_sample': 0, 'easy_query': 0, 'from_cache': 0,
                 **output.stats}
        try:
            output.open()  # inputs, output folder and model are all valid: only now are files made
            self._loop(output, engine, orm, prm, stats)
        except BaseException:
            output.abandon()
            raise
        finally:
            if engine is not None:
                engine.close()
        path = output.finish({'args': a.to_dict(), 'shard': self.shard})
        logger.info('wrote %s: %d lines for %d prompts (%d samples; skipped: %d without a passing sample, %d easy)',
                    path, stats['lines'], stats['prompts'], stats['samples'], stats['no_passing_sample'],
                    stats['easy_query'])
        return str(path)

    def _loop(self, output: SampleOutput, engine, orm, prm, stats: dict[str, int]) -> None:
        from tqdm import tqdm
        a = self.args
        bs = a.num_sampling_batch_size
        expected = sum(len(self._responses_from_cache(p) or []) if a.sampler_engine == 'no'
                       else a.num_return_sequences for p in self.prompts)
        bar = tqdm(total=expected, initial=stats['samples'], unit='sample', desc='sampling', dynamic_ncols=True,
                   disable=None)
        started, done_before = time.perf_counter(), stats['samples']
        for b in range(output.next_batch, self.num_batches):
            batch = self.prompts[b * bs:(b + 1) * bs]
            responses = self._generate(batch, engine, seed=a.seed + self.row_offset + b * bs, stats=stats)
            lines = self._score_and_select(batch, responses, orm, prm, stats)
            stats['prompts'] += len(batch)
            stats['samples'] += sum(len(r) for r in responses)
            stats['lines'] += len(lines)
            output.commit(lines, b + 1, stats)
            bar.update(sum(len(r) for r in responses))
            rate = (stats['samples'] - done_before) / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(samples_per_s=f'{rate:.2f}', kept=stats['lines'])
        bar.close()

    def _generate(self, batch: list[Prompt], engine, seed: int, stats: dict[str, int]) -> list[list[dict[str, Any]]]:
        """Per prompt: a list of {'text', 'token_ids'} samples (cached ones first looked up)."""
        a = self.args
        out: list[list[dict] | None] = []
        todo = []
        for i, p in enumerate(batch):
            cached = self._responses_from_cache(p)
            if cached is not None:
                stats['from_cache'] += len(cached)
                out.append([{'text': t, 'token_ids': None} for t in cached])
            else:
                out.append(None)
                todo.append(i)
        if todo:
            cfg = RequestConfig(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                n=a.num_return_sequences, seed=seed, stop=a.stop_words or None, stream=a.stream,
                                repetition_penalty=a.repetition_penalty)
            results = engine.infer([batch[i].request for i in todo], cfg)
            for i, response in zip(todo, results):
                if len(response.choices) != a.num_return_sequences:
                    raise RuntimeError(f'{batch[i].source}: the engine returned {len(response.choices)} samples, '
                                       f'{a.num_return_sequences} were asked for')
                out[i] = [{'text': self._response_text(c), 'token_ids': c.token_ids} for c in response.choices]
        return out

    def _response_text(self, choice) -> str:
        reasoning = choice.message.reasoning_content
        if self.args.sampler_type == 'distill' and reasoning:
            return f'<think>{reasoning}</think>\n\n<answer>{choice.message.content}</answer>'
        return choice.message.content

    def _score_and_select(self, batch: list[Prompt], responses: list[list[dict]], orm, prm,
                          stats: dict[str, int]) -> list[dict]:
        a = self.args
        completions, columns = [], {}
        owners = []
        for p, samples in zip(batch, responses):
            for s in samples:
                completions.append(s['text'])
                owners.append(p)
        if orm is not None or prm is not None:
            keys = {'messages', 'response_token_ids'} | {k for p in batch for k in p.columns}
            columns = {k: [] for k in keys}
            for p, samples in zip(batch, responses):
                for s in samples:
                    for k in keys:
                        columns[k].append(p.messages if k == 'messages' else s['token_ids'] if k == 'response_token_ids'
                                          else p.columns.get(k))
        orm_scores = self._rewards(orm, completions, columns, 'ORM')
        prm_scores = self._rewards(prm, completions, columns, 'PRM')
        lines, pos = [], 0
        for p, samples in zip(batch, responses):
            cands = [Candidate(k, s['text'], None if orm_scores is None else orm_scores[pos + k],
                               None if prm_scores is None else prm_scores[pos + k]) for k, s in enumerate(samples)]
            pos += len(samples)
            sel = select(cands, a.n_best_to_keep, a.orm_threshold, a.prm_threshold, a.easy_query_threshold)
            if sel.skipped:
                stats[sel.skipped] += 1
                continue
            rejected = sel.rejected.text if sel.rejected is not None else None
            lines += [output_row(p, c.text, rejected) for c in sel.kept]
        return lines

    @staticmethod
    def _rewards(fn, completions: list[str], columns: dict, kind: str) -> list[float] | None:
        if fn is None:
            return None
        return score_completions(fn, completions, columns, kind)
