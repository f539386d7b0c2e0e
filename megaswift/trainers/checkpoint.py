"""Training checkpoints: model + optimizer + scheduler + RNG + data position + step, written atomically.

Layout (the model part is the ``megaswift export`` mcore format, so ``megaswift export --to_hf --mcore_model
<output_dir>`` converts the latest checkpoint without anything else)::

    <output_dir>/
        latest_checkpointed_iteration.txt   the newest complete step; rewritten (atomically) after each save
        megaswift_meta.json, config.json, tokenizer files
        iter_0000003/                        torch_dist model (global keys: loads at any TP/PP/VPP)
            optim/                           torch_dist optimizer state (megatron-core's sharded format)
            rng/rank_00000.pt ...            torch, numpy, python and megatron-core tracker RNG states per rank
            trainer_state.json               step, sampler position, scheduler state, log history, layout
        checkpoint-3/                        HF safetensors of the same step (--save_safetensors)

Every rank writes into one hidden temporary directory that becomes ``iter_0000003`` only after all ranks
succeeded; the tracker is updated after that, so a crash (even kill -9) never leaves a checkpoint that looks
complete. ``--save_total_limit N`` keeps the newest N.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..megatron.checkpoint import (FORMAT, FORMAT_VERSION, META_FILE, TRACKER_FILE, CheckpointError, apply_umask,
                                   copy_hf_side_files, distributed_atomic_directory,
                                   resolve_checkpoint_dir)
from ..megatron.build import unwrap_model
from ..utils.dist import barrier, rank
from .nonfinite import check_parameters_finite, strict_json
from ..utils.paths import atomic_write_text

logger = logging.getLogger(__name__)
STATE_FILE = 'trainer_state.json'
_ITER_RE = re.compile(r'^iter_(\d{7})$')
# The distributed optimizer's state as megatron-core saves it by default: one tensor per contiguous buffer,
# fully parallel, reshardable in DP only (a resume at another TP/PP needs the non-distributed optimizer).
OPTIM_METADATA = {'distrib_optim_sharding_type': 'dp_reshardable', 'chained_optim_avoid_prefix': True}


def _write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    apply_umask(path, directory=False)


def jsonable_items(values: dict) -> dict:
    """The entries of ``values`` that JSON can hold as they are (the trainer state keeps the flags it can read)."""
    out = {}
    for key, value in values.items():
        try:
            json.dumps(value)
            out[key] = value
        except (TypeError, ValueError):
            pass
    return out


def _model_sharded_state_dict(ddp_models) -> dict:
    from ..megatron import unwrap_model
    models = [unwrap_model(m) for m in ddp_models]
    if len(models) == 1:
        return {'model': models[0].sharded_state_dict()}
    return {f'model{i}': m.sharded_state_dict() for i, m in enumerate(models)}


def rng_state() -> dict:
    """Every random generator a training step draws from (torch CPU/CUDA, NumPy, Python, megatron-core's tracker),
    as tensors, numbers and tuples only: ``torch.load(..., weights_only=True)`` reads it back. A tracker state that is
    a ``torch.Generator`` (the CPU compatibility layer's) is stored as its state tensor."""
    from megatron.core import tensor_parallel
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tracker = {name: state.get_state() if isinstance(state, torch.Generator) else state.clone()
               for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    return {'torch': torch.get_rng_state(), 'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached),
            'python': random.getstate(), 'tracker': tracker,
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Put back what ``rng_state`` returned (a tracker Generator gets its state set in place)."""
    from megatron.core import tensor_parallel
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state['python'])
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    for name, saved in state['tracker'].items():
        if isinstance(states.get(name), torch.Generator):
            states[name].set_state(saved)
        else:
            states[name] = saved
    tracker.set_states(states)
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


@dataclass
class CheckpointParts:
    """What a training checkpoint is made of (the trainer hands these over; this module knows no trainer)."""
    models: list            # this rank's DDP-wrapped model chunks
    optimizer: Any          # megatron-core optimizer
    args: Any               # output_dir, save/load flags, model, command, tuner_type
    hf_config: Any
    model_dir: Optional[str]
    dtype: torch.dtype
    layout: dict            # ParallelContext.layout(): RNG states are restored only at the same layout
    head: str = 'lm'        # 'value': the HF weights are saved as a sequence classifier (score.weight)


def _meta(parts: CheckpointParts, step: int) -> dict:
    import megaswift
    return {'format': FORMAT, 'format_version': FORMAT_VERSION, 'megaswift_version': megaswift.__version__,
            'iteration': f'iter_{step:07d}', 'layout': parts.layout,
            'dtype': str(parts.dtype).replace('torch.', ''),
            'hf_config': parts.hf_config.to_dict(), 'source_model': parts.args.model,
            'trained_by': f'megaswift {parts.args.command}', 'tuner_type': parts.args.tuner_type}


def save_checkpoint(parts: CheckpointParts, step: int, trainer_state: dict) -> str:
    """Save step ``step`` (``trainer_state``: the loop's JSON state) under ``args.output_dir``; every rank must call
    this. Returns the dir."""
    from megatron.core import dist_checkpointing
    args = parts.args
    root = Path(args.output_dir).resolve()
    final = root / f'iter_{step:07d}'
    meta = _meta(parts, step)
    check_parameters_finite(parts.models, step)  # never a checkpoint of NaN/inf weights
    with distributed_atomic_directory(final) as tmp:
        model_sd = _model_sharded_state_dict(parts.models)
        dist_checkpointing.save(model_sd, str(tmp), sharded_strategy=('torch_dist', 1))
        if rank() == 0:
            for sub in ('optim', 'rng'):
                (tmp / sub).mkdir(exist_ok=True)
        barrier()
        if not args.no_save_optim:
            _init_optimizer_states(parts.optimizer)  # no-op after a successful step; else (fp16 skips) zeros
            # a fresh model state dict: saving applied its factories in place (the optimizer maps params by identity)
            optim_sd = parts.optimizer.sharded_state_dict(_model_sharded_state_dict(parts.models),
                                                            metadata=OPTIM_METADATA)
            dist_checkpointing.save(optim_sd, str(tmp / 'optim'), sharded_strategy=('torch_dist', 1))
        torch.save(rng_state(), tmp / 'rng' / f'rank_{rank():05d}.pt')
        if rank() == 0:
            _write_text(tmp / STATE_FILE, json.dumps(strict_json(trainer_state), indent=1, default=str) + '\n')
            _write_text(tmp / META_FILE, json.dumps(meta, indent=2, default=str) + '\n')
    if rank() == 0:
        _write_text(root / META_FILE, json.dumps(meta, indent=2, default=str) + '\n')
        if parts.model_dir:
            copy_hf_side_files(parts.model_dir, root)
        if not (root / 'config.json').exists():
            parts.hf_config.save_pretrained(root)
        _write_text(root / TRACKER_FILE, str(step))  # only now does this step count as the latest
    barrier()
    if args.save_safetensors:
        save_hf_weights(parts, root / f'checkpoint-{step}')
    if rank() == 0 and args.save_total_limit:
        rotate_checkpoints(root, args.save_total_limit)
    barrier()
    logger.info('saved checkpoint of step %d to %s', step, final)
    return str(final)


def save_hf_weights(parts: CheckpointParts, out_dir: Path) -> None:
    """HF safetensors + config + tokenizer of the current weights (every rank iterates: collectives inside);
    with LoRA, the PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``) instead."""
    from ..export.hf_writer import ShardedSafetensorsWriter
    from ..megatron import iter_hf_weights
    tied = bool(getattr(parts.hf_config, 'tie_word_embeddings', False))
    if getattr(unwrap_model(parts.models[0]), 'megaswift_lora', None) is not None:
        from ..tuners import export_peft_adapter
        with distributed_atomic_directory(out_dir) as tmp:
            export_peft_adapter(parts.models, tmp, parts.hf_config)
        return
    with distributed_atomic_directory(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, 5 * 10**9, parts.dtype) if rank() == 0 else None
        for name, tensor in iter_hf_weights(parts.models):
            if writer is not None and not (tied and name == 'lm_head.weight'):
                writer.add(name, tensor)
        if writer is not None:
            writer.close()
            if parts.model_dir:
                copy_hf_side_files(parts.model_dir, tmp)
            cfg = hf_config_to_save(parts)
            cfg.dtype = parts.dtype
            cfg.save_pretrained(tmp)


def hf_config_to_save(parts: CheckpointParts):
    """The HF config of the saved weights: the model's own, or (value head) a sequence classifier's."""
    from ..megatron.heads import sequence_classification_config
    if parts.head != 'value':
        return copy.copy(parts.hf_config)
    pad = getattr(parts.hf_config, 'pad_token_id', None)
    if pad is None and parts.model_dir:
        from ..model import load_tokenizer
        tok = load_tokenizer(parts.model_dir)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return sequence_classification_config(parts.hf_config, pad)



def list_checkpoints(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m[1]) for p in root.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name)))


def rotate_checkpoints(root: Path, limit: int) -> None:
    steps = list_checkpoints(root)
    tracker = root / TRACKER_FILE
    latest = int(tracker.read_text().strip()) if tracker.is_file() and tracker.read_text().strip().isdigit() else None
    for step in steps[:-limit] if len(steps) > limit else []:
        if step == latest:
            continue
        shutil.rmtree(root / f'iter_{step:07d}', ignore_errors=True)
        shutil.rmtree(root / f'checkpoint-{step}', ignore_errors=True)
        logger.info('removed old checkpoint of step %d (--save_total_limit %d)', step, limit)


def remove_partial_saves(root: Path) -> None:
    """Hidden temporary directories that an interrupted save left behind (rank 0, before training)."""
    if rank() != 0 or not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith('.') and p.name.endswith('.partial') and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            logger.warning('removed the unfinished save %s', p)


def resolve_resume_dir(value: str, output_dir: str) -> Path:
    """``true`` -> the latest checkpoint in ``output_dir``; else a checkpoint root or an ``iter_*`` directory."""
    if value.lower() == 'true':
        root = Path(output_dir)
        if not (root / TRACKER_FILE).is_file():
            raise CheckpointError(f"--resume_from_checkpoint true: no checkpoint in --output_dir '{output_dir}' "
                                  f'({TRACKER_FILE} is missing)')
        path = resolve_checkpoint_dir(root)
    else:
        path = resolve_checkpoint_dir(value)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"'{path}' is not a training checkpoint ({STATE_FILE} is missing); to start from "
                              f'its weights only, pass it as --mcore_model')
    return path


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{path / STATE_FILE}' cannot be read: {e}") from None


def _init_optimizer_states(optimizer) -> None:
    """Allocate torch Adam states (with their step counter) before a load fills them in place.

    megatron-core's distributed optimizer reads the step from the torch optimizer's state when it builds the
    state dict to load into; without Apex/TE's fused Adam, that state only exists after a first step.
    """
    for opt in getattr(optimizer, 'chained_optimizers', None) or [optimizer]:
        inner = getattr(opt, 'optimizer', None)
        if isinstance(inner, torch.optim.SGD) and getattr(opt, 'init_state_fn', None) is None:
            opt.init_state_fn = _init_sgd_states  # megatron-core leaves SGD without one; its load calls it
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group['params']:
                state = inner.state[p]
                if not state:
                    state['step'] = torch.tensor(0.0)
                    state['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state['exp_avg_sq'] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _init_sgd_states(opt, config=None) -> None:
    for group in opt.param_groups:
        if group.get('momentum', 0):
            for p in group['params']:
                opt.state[p].setdefault('momentum_buffer', torch.zeros_like(p))


def _restore_adam_steps(optimizer, loaded) -> None:
    """Give every torch Adam state its own step tensor with the checkpoint's step.

    megatron-core's distributed optimizer (without Apex/TE) keeps the step in its param groups and, on load,
    hands one shared tensor to every parameter's state; torch's AdamW increments ``state['step']`` in place,
    so a shared tensor would advance once per parameter per step (and the resumed bias correction differ).
    """
    opts = getattr(optimizer, 'chained_optimizers', None) or [optimizer]
    dicts = [loaded] if len(opts) == 1 else [loaded[k] for k in sorted(loaded)] if isinstance(loaded, dict) else loaded
    for opt, sd in zip(opts, dicts):
        inner = getattr(opt, 'optimizer', None)
        groups = (sd.get('optimizer') or {}).get('param_groups') if isinstance(sd, dict) else None
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or not groups:
            continue
        steps = {float(g['step']) for g in groups if g.get('step') is not None}
        if len(steps) != 1:
            continue
        step = steps.pop()
        for state in inner.state.values():
            if 'step' in state:
                state['step'] = torch.tensor(step, dtype=torch.float32)


def check_optimizer_compatible(state: dict, args, path: Path) -> None:
    """The distributed optimizer's state reshards across DP only: say so before loading anything
    (``pipelines/train.py`` calls this before any model is built)."""
    if getattr(args, 'no_load_optim', False) or not (path / 'optim' / 'metadata.json').is_file():
        return
    saved_dist = bool(state.get('use_distributed_optimizer'))
    keys = ('tensor_model_parallel_size', 'pipeline_model_parallel_size', 'virtual_pipeline_model_parallel_size')
    now, then = {k: getattr(args, k) for k in keys}, state.get('layout') or {}
    what = None
    if saved_dist != bool(args.use_distributed_optimizer):
        what = f'it was saved with --use_distributed_optimizer {str(saved_dist).lower()}'
    elif saved_dist and any(now.get(k) != then.get(k) for k in keys):
        what = ('its distributed-optimizer state was saved at ' + ', '.join(f'{k}={then.get(k)}' for k in keys)
                + ' and reshards across data parallelism only')
    if what:
        raise CheckpointError(f"cannot resume the optimizer of '{path}': {what}; resume at that setting, or pass "
                              f'--no_load_optim true to continue with a fresh optimizer')


def check_same_checkpoint_on_every_rank(path: Path) -> None:
    """Every rank resumes the same step: ``--resume_from_checkpoint true`` reads the tracker on each node, and a
    node whose view of a shared file system lags (or a node-local --output_dir) would otherwise pick another."""
    from ..utils.dist import initialized_dist
    dist = initialized_dist()
    if dist is None or dist.get_world_size() == 1:
        return
    import socket
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (str(Path(path).resolve()), socket.gethostname()))
    if len({p for p, _ in seen}) > 1:
        raise CheckpointError('the ranks would resume from different checkpoints: ' + '; '.join(
            f'rank {r} on {host}: {p}' for r, (p, host) in enumerate(seen)))


def load_checkpoint(parts: CheckpointParts, path: Path) -> dict:
    """Restore model, optimizer and RNG from ``path`` (an ``iter_*`` directory); returns the loop's saved state
    (step, scheduler, data position) for the trainer to apply."""
    from megatron.core import dist_checkpointing

    from ..megatron.checkpoint import load_mcore_checkpoint, verify_checkpoint_on_every_rank
    check_same_checkpoint_on_every_rank(path)
    state = read_trainer_state(path)
    check_optimizer_compatible(state, parts.args, path)
    load_mcore_checkpoint([unwrap_model(m) for m in parts.models], path)
    parts.optimizer.reload_model_params()
    if getattr(parts.args, 'no_load_optim', False):
        logger.warning('--no_load_optim: the optimizer starts fresh (model, scheduler and data position resume)')
    elif (path / 'optim' / 'metadata.json').is_file():
        model_sd = _model_sharded_state_dict(parts.models)
        _init_optimizer_states(parts.optimizer)
        optim_sd = parts.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIM_METADATA)
        verify_checkpoint_on_every_rank(path / 'optim')  # complete, and data only (no pickle that runs code)
        try:
            loaded = dist_checkpointing.load(optim_sd, str(path / 'optim'))
            with torch.no_grad():  # the distributed optimizer copies into views of its (leaf) main params
                parts.optimizer.load_state_dict(loaded)
            _restore_adam_steps(parts.optimizer, loaded)
        except Exception as e:  # noqa: BLE001 - one clear line instead of a stack from deep inside torch
            raise CheckpointError(f"cannot load the optimizer state of '{path}': {type(e).__name__}: "
                                  f'{str(e).splitlines()[0] if str(e) else ""} (--no_load_optim true resumes '
                                  f'without it)') from None
    else:
        logger.warning('%s has no optimizer state: the optimizer starts fresh', path)
    rng_file = path / 'rng' / f'rank_{rank():05d}.pt'
    if state.get('layout') == parts.layout and rng_file.is_file():
        try:
            saved = torch.load(rng_file, weights_only=True)
        except Exception as e:  # noqa: BLE001 - e.g. a file of a version that pickled objects
            raise CheckpointError(f"cannot read the RNG states '{rng_file}' as tensors ({type(e).__name__}); it may "
                                  f'come from an older megaswift: delete the rng/ folder to resume without them') from None
        set_rng_state(saved)
    else:
        logger.warning('the checkpoint was saved at layout %s (now %s): RNG states are not restored',
                       state.get('layout'), parts.layout)
    return state


def output_dir_has_checkpoint(output_dir: str) -> bool:
    return (Path(output_dir) / TRACKER_FILE).is_file() or bool(list_checkpoints(Path(output_dir)))


__all__ = ['CheckpointParts', 'save_checkpoint', 'load_checkpoint', 'resolve_resume_dir', 'rotate_checkpoints', 'list_checkpoints',
           'remove_partial_saves', 'output_dir_has_checkpoint', 'CheckpointError']
