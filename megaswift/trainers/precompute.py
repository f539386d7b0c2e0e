"""``--precompute_ref_log_probs``: a frozen model's per-sequence outputs (the reference's log-probs) computed once
before training, so the frozen model never sits in memory while the policy trains.

The frozen model runs forward-only over every item of the training (and validation) set, split over the
data-parallel ranks; its ``frozen_outputs`` (one value per model sequence, e.g. DPO's ``ref_logps``) are gathered
into tables indexed by encoded sample, stored next to the encoded dataset's cache (keyed by the frozen model's
files and the objective), and copied into each micro-batch by its sample indices. Then the model is freed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional

from functools import partial

import numpy as np
import torch

from ..template.collator import collate_micro_batches, to_device
from ..utils.errors import UserError
from .data import eval_micro_batches

logger = logging.getLogger(__name__)


class PrecomputedOutputs:
    """``{key: [num_samples, sequences_per_sample] table}`` of one collator's encoded samples."""

    def __init__(self, tables: dict[str, np.ndarray]):
        self.tables = tables

    def fill(self, batch: dict) -> None:
        index = batch['sample_indices'].cpu().numpy()
        device = batch['input_ids'].device
        for key, table in self.tables.items():
            batch[key] = torch.from_numpy(np.ascontiguousarray(table[index].reshape(-1))).to(device)


def frozen_model_key(model_dir: str, objective, name: str) -> str:
    """What the stored outputs depend on: the frozen model's files (names, sizes, mtimes) and the objective."""
    files = []
    for p in sorted(Path(model_dir).glob('*')):
        if p.is_file() and p.suffix in ('.json', '.safetensors', '.bin', '.gguf'):
            st = p.stat()
            files.append((p.name, st.st_size, int(st.st_mtime)))
    settings = {k: v for k, v in vars(objective).items() if isinstance(v, (int, float, str, bool, type(None)))}
    payload = json.dumps([str(Path(model_dir).resolve()), files, type(objective).__name__, name, settings],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def precompute_frozen_outputs(run_frozen: Callable, collator, num_items: int, parallel, micro_batch_size: int,
                              device, fixed_shape: bool, cache_file: Optional[Path]) -> PrecomputedOutputs:
    """Run ``run_frozen(batches)`` (the frozen model's forward-only pass; it stores its outputs in the batches)
    over all ``num_items`` items of ``collator``, this DP rank's share, and gather the outputs of every rank."""
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as stored:
            logger.info('reference outputs loaded from %s', cache_file)
            return PrecomputedOutputs({k: stored[k] for k in stored.files})
    mbs = eval_micro_batches(num_items, parallel.dp_rank, parallel.dp_size, micro_batch_size)
    batches = [to_device(b, device) for b in collate_micro_batches(collator, mbs, fixed_shape)]
    for b, mb in zip(batches, mbs):
        b['sample_indices'] = torch.tensor(collator.sample_indices(mb), dtype=torch.long)
    keys_before = set(batches[0]) if batches else set()
    if batches:
        run_frozen(batches)
    rows = []  # (sample index, {key: values of its sequences})
    if parallel.is_last_stage and parallel.tp_rank == 0:
        for b in batches:
            per = int(b['sequences_per_sample'])
            for key in sorted(set(b) - keys_before):
                if b[key].numel() != int(b['num_sequences']):
                    raise UserError(f'--precompute_ref_log_probs: the frozen output {key!r} is not one value per '
                                    f'sequence; this objective cannot precompute it')
            values = {k: b[k].detach().float().cpu().numpy().reshape(-1, per) for k in sorted(set(b) - keys_before)}
            rows += [(int(i), {k: v[j] for k, v in values.items()}) for j, i in enumerate(b['sample_indices'])]
    gathered = [None] * parallel.world_size
    torch.distributed.all_gather_object(gathered, rows)
    tables: dict[str, np.ndarray] = {}
    n = len(collator.encoded)
    seen = np.zeros(n, dtype=bool)
    for part in gathered:
        for index, values in part:
            for key, v in values.items():
                tables.setdefault(key, np.full((n, v.size), np.nan, dtype=np.float32))[index] = v
            seen[index] = True
    used = sorted({int(i) for item in range(num_items) for i in collator.items[item]})
    if not seen[used].all():
        raise RuntimeError('--precompute_ref_log_probs: some samples got no reference output')
    if cache_file is not None and parallel.rank == 0:
        tmp = cache_file.with_name(cache_file.name + f'.tmp{os.getpid()}')
        with open(tmp, 'wb') as f:
            np.savez(f, **tables)
        os.replace(tmp, cache_file)
        logger.info('reference outputs of %d samples stored in %s', len(used), cache_file)
    return PrecomputedOutputs(tables)


def precompute_reference(trainer, name: str = 'ref') -> dict[str, PrecomputedOutputs]:
    """The frozen model ``name``'s outputs for the training and validation sets of ``trainer`` (set up, with its
    models built); the frozen model is built for this and freed after."""
    from .model import build_frozen_models
    fused = trainer.ce_impl != 'torch' and trainer.objective.head == 'lm'
    if trainer._reference_is_lora_base(name):
        models = None  # the trained model with adapters off (run_frozen_models does that)
    else:
        models = build_frozen_models(trainer.args, trainer.frozen_hf_config(name), trainer.frozen_model_dir(name),
                                     trainer.dtype, trainer.parallel, fused_lm_head=fused)
        trainer.frozen[name] = models
    key = frozen_model_key(trainer.frozen_model_dir(name), trainer.objective, name)
    data, out = trainer.data, {}
    try:
        for split, collator, num_items in (('train', data.collator, data.num_items),
                                           ('val', data.val_collator, data.val_num_items)):
            if collator is None or not num_items:
                continue
            out[split] = precompute_frozen_outputs(
                partial(trainer.run_frozen_models, only=name), collator, num_items, trainer.parallel,
                int(trainer.args.micro_batch_size), trainer.device, trainer.fixed_shape,
                cache_file_for(collator, f'{key}-{split}'))
    finally:
        trainer.frozen.pop(name, None)
        del models
    return out


def cache_file_for(collator, key: str) -> Optional[Path]:
    """Next to the encoded dataset's cache, when it has one."""
    path = getattr(collator.encoded, 'cache_path', None)
    return Path(path) / f'frozen-{key}.npz' if path else None


__all__ = ['PrecomputedOutputs', 'cache_file_for', 'frozen_model_key', 'precompute_frozen_outputs',
           'precompute_reference']
