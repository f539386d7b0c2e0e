"""``--test_convert_precision``: the same batch through the HF model and the mcore model, compared.

The batch is a fixed chat prompt tokenised with the model's own tokenizer plus a few rows of random
token ids of the same length. Both models run in fp32 by default (as ms-swift does), so the numbers
measure the conversion, not bf16 rounding. Reported: max and mean absolute logit difference and the
next-token cross-entropy of each model (same formula on both sides) and their difference. When the
mcore weights are stored in bf16 but the HF source is fp32, the numbers include that rounding.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn.functional as F

from ..megatron.parallel import ParallelContext

logger = logging.getLogger(__name__)

PROMPT = [{'role': 'user', 'content': 'Who are you? Answer in one short sentence, then count from one to five.'}]


def build_batch(tokenizer, vocab_size: int, num_random_rows: int = 2, seed: int = 0) -> torch.Tensor:
    """``[1 + num_random_rows, L]`` token ids: the tokenised prompt, then random rows of the same length."""
    ids = None
    if getattr(tokenizer, 'chat_template', None):
        try:
            out = tokenizer.apply_chat_template(PROMPT, tokenize=True, add_generation_prompt=True)
            ids = list(out['input_ids'] if isinstance(out, dict) or hasattr(out, 'keys') else out)
        except Exception:  # a template that needs extra context: fall back to plain text
            ids = None
    if not ids:
        ids = tokenizer(PROMPT[0]['content'])['input_ids']
    prompt = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    high = min(vocab_size, len(tokenizer))
    rand = torch.randint(0, high, (num_random_rows, prompt.size(1)), generator=gen)
    return torch.cat([prompt, rand], dim=0)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Mean cross-entropy of predicting token t+1 from position t, in fp32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1)).item()


def mcore_logits(models, input_ids: torch.Tensor, vocab_size: int, *,
                 parallel: ParallelContext | None = None) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, vocab_size]`` of ``models`` (any TP/PP/VPP) on global rank 0, else None.

    Every rank must call this; rows run as micro-batches of one through megatron-core's schedule.
    ``parallel``: the layout the models were built at (default: ``ParallelContext.from_megatron()``).
    """
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    from ..megatron.forward import model_forward, run_schedule

    parallel = parallel if parallel is not None else ParallelContext.from_megatron()
    seq = input_ids.size(1)
    position_ids = torch.arange(seq).unsqueeze(0)
    batches = [{'input_ids': row, 'position_ids': position_ids} for row in input_ids.split(1)]
    n_real = len(batches)
    pp = parallel.pp_size
    if len(models) > 1 and len(batches) % pp:  # the interleaved schedule needs a multiple of PP micro-batches
        batches += [batches[-1]] * (pp - len(batches) % pp)
    tp = parallel.tp_size

    def loss_func(output):
        logits = output
        if tp > 1 and logits.size(-1) * tp <= _padded_vocab(models, vocab_size):
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=parallel.tp_group)
        logits = logits[..., :vocab_size].float()
        return logits.sum() * 0.0, {'logits': logits.detach().clone()}

    def forward_step(data_iterator, model):
        return model_forward(model, next(data_iterator)), loss_func

    with torch.no_grad():
        out = run_schedule(models, batches, forward_step, forward_only=True)
    have = parallel.is_last_stage and parallel.tp_rank == 0 and parallel.dp_rank == 0
    mine = torch.cat([o['logits'] for o in out][:n_real]) if have and out else None
    if parallel.world_size == 1:
        return mine
    gathered = [None] * parallel.world_size if parallel.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if parallel.rank != 0:
        return None
    return next(t for t in gathered if t is not None)


def _padded_vocab(models, vocab_size: int) -> int:
    for m in models:
        inner = m
        while hasattr(inner, 'module') and not hasattr(inner, 'vocab_size'):
            inner = inner.module
        if getattr(inner, 'vocab_size', None):
            return int(inner.vocab_size)
    return vocab_size


@contextlib.contextmanager
def _as_dtype(models, dtype: torch.dtype):
    """Temporarily cast the mcore models' floating parameters to ``dtype`` (exactly restored afterwards)."""
    saved = []
    for m in models:
        for p in list(m.parameters()) + list(m.buffers()):
            if p.is_floating_point() and p.dtype != dtype:
                saved.append((p, p.data))
                p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def test_convert_precision(models, hf_dir: str | os.PathLike, *, compute_dtype: torch.dtype = torch.float32,
                           num_random_rows: int = 2, seed: int = 0, parallel: ParallelContext | None = None) -> dict:
    """Compare HF (``hf_dir``) and mcore logits on one batch; prints and returns the numbers on every rank.

    Every rank must call this; only global rank 0 loads the HF model. ``parallel``: the layout the models
    were built at (default: ``ParallelContext.from_megatron()``).
    """
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    parallel = parallel if parallel is not None else ParallelContext.from_megatron()

    hf_dir = str(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    vocab_size = int(config.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    input_ids = build_batch(tokenizer, vocab_size, num_random_rows, seed)
    weights_dtype = next(models[0].parameters()).dtype
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with _as_dtype(models, compute_dtype):
            mc_logits = mcore_logits(models, input_ids, vocab_size, parallel=parallel)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    result = None
    if parallel.rank == 0:
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=compute_dtype).eval()
        with torch.no_grad():
            hf_logits = hf(input_ids=input_ids).logits.float()
        del hf
        diff = (hf_logits - mc_logits).abs()
        hf_loss, mc_loss = next_token_loss(hf_logits, input_ids), next_token_loss(mc_logits, input_ids)
        result = {'dtype': str(compute_dtype).replace('torch.', ''), 'batch': list(input_ids.shape),
                  'weights_dtype': str(weights_dtype).replace('torch.', ''),
                  'max_abs_logit_diff': diff.max().item(), 'mean_abs_logit_diff': diff.mean().item(),
                  'hf_loss': hf_loss, 'mcore_loss': mc_loss, 'loss_diff': abs(hf_loss - mc_loss)}
        print(f"[test_convert_precision] dtype={result['dtype']} weights={result['weights_dtype']} "
              f"batch={'x'.join(map(str, result['batch']))} "
              f"max_abs_logit_diff={result['max_abs_logit_diff']:.3e} "
              f"mean_abs_logit_diff={result['mean_abs_logit_diff']:.3e} hf_loss={hf_loss:.6f} "
              f"mcore_loss={mc_loss:.6f} loss_diff={result['loss_diff']:.3e}", flush=True)
    if parallel.world_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result
test_convert_precision.__test__ = False  # not a pytest test, despite its (ms-swift) name
