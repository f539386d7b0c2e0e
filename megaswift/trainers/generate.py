"""Generation on the model being trained: greedy for ``--eval_metric nlg`` (ROUGE / BLEU of generated text),
sampled for objectives that train on the model's own completions (GKD on-policy, ``trainers/rollout.py``).

At an evaluation every validation sample (the val collator's encoded samples, packed or not) becomes a prompt
(its tokens before the first trained label) and a reference (its trained tokens). Each data-parallel rank
generates greedily for its share (samples ``dp_rank, dp_rank + dp, ...``) with megatron-core forward passes on
the current weights: no KV cache, the whole prefix is recomputed at every new token, several prompts per
forward as one padding-free row (``PackedSeqParams``, each prompt attends only to itself). The next token is
the global argmax over the vocab-parallel head, so all tensor-parallel ranks of a group run the same forwards
and pick the same ids. A sequence stops at a stop token (the tokenizer's EOS, the template's end-of-turn
token, the generation config's EOS ids) or after ``--max_new_tokens``.

Predictions and references are decoded without special tokens. The models are put in eval mode for the
duration and every random number generator (torch CPU/CUDA, megatron-core's tracker, Python, NumPy) is
restored afterwards, so a run with generation trains exactly like one without. Pipeline parallelism is not
supported (``check_generation_layout`` rejects it before any model is built).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ..utils.constants import IGNORE_INDEX
from ..utils.errors import ArgumentError

logger = logging.getLogger(__name__)

#: metric inputs produced by generation (``Metric.inputs``): decoded generated texts and reference texts
GENERATED_OUTPUTS = ('predictions', 'references')


def needs_generation(metric) -> bool:
    return any(k in GENERATED_OUTPUTS for k in getattr(metric, 'inputs', ()) or ())


def check_generation_layout(metrics: Iterable, args) -> None:
    """One clear error, before any model is built, for a layout generation cannot run on."""
    names = [type(m).__name__ for m in metrics if needs_generation(m)]
    if not names:
        return
    pp = int(getattr(args, 'pipeline_model_parallel_size', 1) or 1)
    if pp > 1:
        metric = ','.join(getattr(args, 'eval_metric', None) or []) or 'nlg'
        raise ArgumentError(f'--eval_metric {metric} generates text during evaluation, which needs every layer on '
                            f'each rank: --pipeline_model_parallel_size {pp} is not supported with it (use '
                            f'--tensor_model_parallel_size and data parallelism, or leave generated-text metrics '
                            f'to megaswift sample / infer)')


# ---------------------------------------------------------------------------------------------- prompts
@dataclass
class EvalPrompt:
    index: int              # the sample's position in the validation set
    prompt: list[int]       # the tokens before the first trained label (at least one token)
    reference: list[int]    # the trained tokens


def eval_prompts(encoded, dp_rank: int = 0, dp_size: int = 1) -> list[EvalPrompt]:
    """This DP rank's share of the validation samples as prompts + references (samples without any trained
    token are left out; a sample trained from its first token keeps that token as its prompt)."""
    out = []
    for i in range(dp_rank, len(encoded), dp_size):
        arrays = encoded.arrays(int(i))
        ids = np.asarray(arrays['input_ids']).reshape(-1).tolist()
        trained = np.flatnonzero(np.asarray(arrays['labels']).reshape(-1) != IGNORE_INDEX)
        first = prompt_length(arrays)
        reference = [ids[j] for j in trained.tolist() if j >= first]
        if not reference:
            continue
        out.append(EvalPrompt(int(i), ids[:first], reference))
    return out


def prompt_length(arrays: dict) -> int:
    """The prompt of an encoded sample: its tokens before the first trained label (at least one token; all of
    them when nothing is trained)."""
    trained = np.flatnonzero(np.asarray(arrays['labels']).reshape(-1) != IGNORE_INDEX)
    return max(int(trained[0]), 1) if trained.size else int(np.asarray(arrays['input_ids']).size)


def stop_token_ids(tokenizer, encoder=None, hf_config=None, model_dir: Optional[str] = None) -> list[int]:
    """The ids that end a generated answer: the tokenizer's EOS, the template's end-of-turn token
    (``<|im_end|>``, ``<|eot_id|>``) and the model's (generation) config EOS ids."""
    ids: set[int] = set()

    def add(value):
        if value is None:
            return
        for v in (value if isinstance(value, (list, tuple, set)) else [value]):
            if isinstance(v, int) and v >= 0:
                ids.add(int(v))
    add(getattr(tokenizer, 'eos_token_id', None))
    add(getattr(hf_config, 'eos_token_id', None))
    if model_dir:
        try:
            from transformers import GenerationConfig
            add(GenerationConfig.from_pretrained(model_dir).eos_token_id)
        except Exception:  # noqa: BLE001 - no generation_config.json is fine
            pass
    for attr in ('end', 'eot'):
        text = getattr(encoder, attr, None)
        if isinstance(text, str) and text:
            tok = tokenizer(text, add_special_tokens=False)['input_ids']
            if len(tok) == 1:
                add(int(tok[0]))
    return sorted(ids)


# ---------------------------------------------------------------------------------------------- state
@contextlib.contextmanager
def preserved_rng_state():
    """Every generator the training step may draw from is put back as it was (bit-exact resume)."""
    from .checkpoint import rng_state, set_rng_state
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


@contextlib.contextmanager
def generation_mode(models: list):
    """``eval()`` + ``no_grad`` for the duration, each model's own mode restored afterwards."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad(), preserved_rng_state():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


# ---------------------------------------------------------------------------------------------- decoding
@dataclass
class GenerationSpec:
    max_new_tokens: int
    stop_ids: list[int]
    pad_to_multiple_of: int = 1     # the row length multiple sequence parallelism needs
    pad_token_id: int = 0
    max_total_length: Optional[int] = None  # prompt + answer at most (the model's max_position_embeddings)
    tokens_per_forward: int = 4096  # prompts batched into one padding-free row up to about this many tokens
    temperature: float = 0.0        # 0: greedy; > 0: sampled from softmax(logits / temperature)


def _next_tokens(forward: Callable, sequences: list[list[int]], spec: GenerationSpec,
                 generators: Optional[list] = None) -> list[int]:
    """The next id of every sequence, from one forward pass over them as one padding-free row (``forward``: a
    batch -> the last stage's ``ModelOutput``): the greedy one, or with ``spec.temperature > 0`` a sample."""
    from ..template.packing import padding_free_collate
    row = padding_free_collate([{'input_ids': s} for s in sequences], spec.pad_to_multiple_of, spec.pad_token_id)
    output = forward({'input_ids': row.input_ids, 'position_ids': row.position_ids,
                      'packed_seq_params': row.packed_seq_params()})
    last = torch.zeros(row.input_ids.shape, dtype=torch.bool, device=output.output.device)
    last[0, torch.as_tensor(np.cumsum([len(s) for s in sequences]) - 1, device=last.device)] = True
    if spec.temperature <= 0:
        return output.masked(last).argmax().view(-1).tolist()
    return _sample(output.masked(last), spec.temperature, generators).tolist()


def _sample(output, temperature: float, generators: list) -> torch.Tensor:
    """One id per row of ``output`` drawn from softmax(logits / temperature), by the Gumbel-max trick: the global
    argmax of ``logits / T + g`` with ``g`` standard Gumbel noise. Row k's noise over the whole (padded) vocabulary
    comes from ``generators[k]``, so every tensor-parallel rank adds the same noise to its shard and the draw does
    not depend on the layout, only on the generator's seed."""
    from .loss import _tp_info, vocab_parallel_argmax
    logits = output.vocab_parallel_logits() / temperature          # [n, V/tp], padded entries hugely negative
    shard = logits.size(-1)
    _, tp, rank = _tp_info(output.tp_group)
    noise = torch.stack([_gumbel(shard * tp, g)[rank * shard:(rank + 1) * shard] for g in generators])
    return vocab_parallel_argmax(logits + noise.to(logits.device), None, output.tp_group)


def _gumbel(n: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64).clamp_(1e-20, 1.0 - 1e-16)
    return (-torch.log(-torch.log(u))).float()


def sequence_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sequence, seeded (the draws of a sequence depend only on its seed)."""
    out = []
    for seed in seeds:
        g = torch.Generator()
        g.manual_seed(int(seed) % (2 ** 63))
        out.append(g)
    return out


def generate(forward: Callable, prompts: list[list[int]], spec: GenerationSpec,
             seeds: Optional[list[int]] = None) -> tuple[list[list[int]], list[Optional[int]]]:
    """The answers (without their stop token) of ``prompts`` and, per answer, the stop token that ended it (None:
    cut at the token budget). Greedy, or with ``spec.temperature > 0`` sampled, prompt k's draws from a generator
    seeded with ``seeds[k]``. Call under ``generation_mode``; every tensor-parallel rank of a group must call this
    with the same prompts and seeds."""
    if spec.temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError('sampling (temperature > 0) needs one seed per prompt')
    stops = set(spec.stop_ids)
    answers: list[list[int]] = [[] for _ in prompts]
    ended: list[Optional[int]] = [None] * len(prompts)
    generators = sequence_generators(seeds) if spec.temperature > 0 else None
    budget = [spec.max_new_tokens if spec.max_total_length is None
              else max(0, min(spec.max_new_tokens, spec.max_total_length - len(p))) for p in prompts]
    pending = [k for k in range(len(prompts)) if budget[k] > 0]
    while pending:
        group, tokens = [], 0  # the next prompts that fit one row at their full length
        for k in pending:
            need = len(prompts[k]) + budget[k]
            if group and tokens + need > spec.tokens_per_forward:
                break
            group.append(k)
            tokens += need
        active = list(group)
        while active:
            ids = _next_tokens(forward, [prompts[k] + answers[k] for k in active], spec,
                               [generators[k] for k in active] if generators else None)
            still = []
            for k, tok in zip(active, ids):
                if tok in stops:
                    ended[k] = int(tok)
                    continue
                answers[k].append(int(tok))
                if len(answers[k]) < budget[k]:
                    still.append(k)
            active = still
        done = set(group)
        pending = [k for k in pending if k not in done]
    return answers, ended


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalGeneration:
    """What generation at an evaluation needs from the trainer."""
    forward: Callable               # a collated batch -> the last stage's ModelOutput (first model chunk)
    models: list                    # put in eval mode for the duration
    collator: Any                   # the validation collator (its encoded samples, padding multiple, pad id)
    tokenizer: Any
    stop_ids: list
    hf_config: Any
    model_dir: Optional[str]
    max_new_tokens: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1


def generate_eval_texts(job: EvalGeneration) -> dict[str, Any]:
    """This DP rank's ``{'predictions': [...], 'references': [...], 'indices': [...]}`` for the validation set,
    generated with the current weights (all ranks of the run call this together)."""
    collator, tokenizer = job.collator, job.tokenizer
    if tokenizer is None:
        from ..model import load_tokenizer
        tokenizer = load_tokenizer(job.model_dir)
    stops = job.stop_ids or stop_token_ids(tokenizer, None, job.hf_config, job.model_dir)
    max_pos = int(getattr(job.hf_config, 'max_position_embeddings', 0) or 0) or None
    spec = GenerationSpec(max_new_tokens=job.max_new_tokens, stop_ids=list(stops),
                          pad_to_multiple_of=max(1, int(collator.pad_to_multiple_of)),
                          pad_token_id=int(collator.pad_token_id), max_total_length=max_pos,
                          tokens_per_forward=max(int(collator.max_length or 0) * job.micro_batch_size, 1024))
    prompts = eval_prompts(collator.encoded, job.dp_rank, job.dp_size)
    start = time.perf_counter()
    with generation_mode(job.models):
        answers, _ = generate(job.forward, [p.prompt for p in prompts], spec)
    logger.info('nlg: %d answers (%d tokens) generated on this rank in %.1f s', len(answers),
                sum(map(len, answers)), time.perf_counter() - start)
    decode = _decoder(tokenizer)
    return {'predictions': [decode(a) for a in answers], 'references': [decode(p.reference) for p in prompts],
            'indices': [p.index for p in prompts]}


def _decoder(tokenizer):
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)
    return decode


def write_predictions(generated: dict[str, Any], output_dir: Path, step: int, dp_group=None,
                      is_main: bool = True) -> Optional[Path]:
    """``<output_dir>/predict/step-<N>.jsonl`` (written by the main process; every rank calls it): one line per
    validation sample in dataset order, ``{'index', 'response', 'labels'}`` (ms-swift's names for the generated
    and reference text)."""
    dist = torch.distributed
    rows = [{'index': i, 'response': p, 'labels': r}
            for i, p, r in zip(generated['indices'], generated['predictions'], generated['references'])]
    dp_size = dp_group.size() if dp_group is not None and dist.is_available() and dist.is_initialized() else 1
    if dp_size > 1:
        parts: list = [None] * dp_size
        dist.all_gather_object(parts, rows, group=dp_group)
        rows = [r for part in parts for r in part]
    if not is_main:
        return None
    rows.sort(key=lambda r: r['index'])
    path = Path(output_dir) / 'predict' / f'step-{step}.jsonl'
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', encoding='utf-8') as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + '\n')
    return path


__all__ = ['GENERATED_OUTPUTS', 'EvalGeneration', 'EvalPrompt', 'GenerationSpec', 'check_generation_layout', 'eval_prompts',
           'generate_eval_texts', 'generation_mode', 'generate', 'prompt_length', 'needs_generation', 'preserved_rng_state',
           'stop_token_ids', 'write_predictions']
