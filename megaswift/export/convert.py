"""HF <-> megatron-core checkpoint conversion (``megaswift export --to_mcore / --to_hf``).

Both directions run on every rank of a torchrun launch (or in one process), build the model at the
requested TP/PP, and write their output atomically: a failure at any step leaves no output
directory that looks complete. Inputs are validated first, so a bad model, layout or checkpoint
fails in seconds with one line naming the field, tensor or file.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from ..utils.dist import world_size
from ..utils.errors import UserError

logger = logging.getLogger(__name__)


class ExportError(UserError, RuntimeError):
    """A conversion that cannot proceed; the message says which input is wrong."""


def resolve_dtype(name: str | None, fallback) -> torch.dtype:
    """``--torch_dtype`` (auto = ``fallback``: the HF config's or checkpoint's dtype) as a torch dtype."""
    from ..model import parse_dtype
    if name in (None, 'auto'):
        if isinstance(fallback, torch.dtype):
            return fallback
        text = str(fallback or 'float32').replace('torch.', '')
        return getattr(torch, text) if text in ('float32', 'bfloat16', 'float16') else torch.float32
    return parse_dtype(name)


def check_layout(hf_config, args) -> None:
    """The model must split over ``args``' TP/PP/VPP, and the launch's processes must hold TP x PP."""
    args.parallel_config(world_size=world_size(), hf_config=hf_config)


def _check_family(hf_config) -> None:
    from ..megatron import get_model_family
    try:
        get_model_family(hf_config)
    except UserError:
        raise
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ExportError(str(e).splitlines()[0]) from None


@contextlib.contextmanager
def parallel_session(args):
    """Process groups for ``args``' layout for the duration of a conversion; yields their ``ParallelContext``."""
    from ..megatron import destroy_parallel, initialize_parallel
    try:
        parallel = initialize_parallel(args.parallel_config(), seed=getattr(args, 'seed', 42))
    except UserError:
        raise
    except ValueError as e:
        raise ExportError(str(e)) from None
    try:
        yield parallel
    finally:
        destroy_parallel()


def _build(hf_config, dtype, parallel):
    from ..megatron import build_model
    try:
        # every weight is overwritten by the load (which fails on any it misses): skip the random init
        return build_model(hf_config, dtype=dtype, parallel=parallel,
                           config_overrides={'perform_initialization': False})
    except (ValueError, NotImplementedError, AssertionError) as e:
        raise ExportError(f'cannot build the mcore model: {str(e).splitlines()[0] if str(e) else type(e).__name__}') \
            from None


def hf_to_mcore(args) -> str:
    """Convert ``args.model`` (HF) to an mcore checkpoint at ``args.output_dir``; returns its path."""
    from ..megatron import load_hf_weights
    from ..megatron.checkpoint import save_mcore_checkpoint
    from ..model import check_model_weights, read_model_config, resolve_model_dir
    start = time.perf_counter()
    model_dir = resolve_model_dir(args.model)
    hf_config = read_model_config(model_dir)
    _check_family(hf_config)
    check_layout(hf_config, args)
    check_model_weights(model_dir, safetensors_only=True)
    dtype = resolve_dtype(args.torch_dtype, getattr(hf_config, 'dtype', None) or getattr(hf_config, 'torch_dtype',
                                                                                         None))
    with parallel_session(args) as parallel:
        models = _build(hf_config, dtype, parallel)
        try:
            load_hf_weights(models, model_dir, parallel=parallel)
        except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
            if isinstance(e, UserError):
                raise
            raise ExportError(f"cannot load the HF weights of '{model_dir}': "
                              f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
        extra = {'source_model': args.model, 'source_dir': str(model_dir),
                 'converted_by': 'megaswift export --to_mcore'}
        out = save_mcore_checkpoint(models, args.output_dir, hf_config, extra, hf_dir=model_dir, parallel=parallel)
        if parallel.rank == 0:
            print(f'[megaswift export] HF -> mcore: {out} ({time.perf_counter() - start:.1f} s, '
                  f'TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size}, {_dtype_name(dtype)})',
                  flush=True)
        if args.test_convert_precision:
            from .precision import test_convert_precision
            test_convert_precision(models, model_dir, parallel=parallel)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace('torch.', '')


def _checkpoint_hf_config(ckpt_dir: Path, meta: dict):
    from transformers import AutoConfig

    from ..model import read_model_config
    if (ckpt_dir / 'config.json').is_file():
        return read_model_config(ckpt_dir, '--mcore_model')
    cfg = dict(meta['hf_config'])
    model_type = cfg.pop('model_type', None)
    if not model_type:
        raise ExportError(f"'{ckpt_dir}': megaswift_meta.json field 'hf_config.model_type' is missing")
    return AutoConfig.for_model(model_type, **cfg)


def mcore_to_hf(args) -> str:
    """Convert ``args.mcore_model`` to HF safetensors at ``args.output_dir``; returns its path."""
    from ..megatron import iter_hf_weights
    from ..megatron.checkpoint import (copy_hf_side_files, distributed_atomic_directory, load_mcore_checkpoint,
                                       read_meta, resolve_checkpoint_dir)
    from .hf_writer import ShardedSafetensorsWriter
    start = time.perf_counter()
    ckpt_dir = Path(args.mcore_model)
    meta = read_meta(ckpt_dir)
    resolve_checkpoint_dir(ckpt_dir)
    hf_config = _checkpoint_hf_config(ckpt_dir, meta)
    _check_family(hf_config)
    check_layout(hf_config, args)
    ckpt_dtype = resolve_dtype('auto', meta.get('dtype'))
    out_dtype = resolve_dtype(args.torch_dtype, ckpt_dtype)
    tied = bool(getattr(hf_config, 'tie_word_embeddings', False))
    final = Path(args.output_dir)
    with parallel_session(args) as parallel:
        models = _build(hf_config, ckpt_dtype, parallel)  # the checkpoint's own dtype: loading is exact
        load_mcore_checkpoint(models, ckpt_dir)
        with distributed_atomic_directory(final) as tmp:
            writer = ShardedSafetensorsWriter(tmp, args.max_shard_bytes, out_dtype) if parallel.rank == 0 else None
            error = None
            # every rank iterates: collectives inside
            for name, tensor in iter_hf_weights(models, parallel=parallel):
                if writer is None or error is not None or (tied and name == 'lm_head.weight'):
                    continue
                try:
                    writer.add(name, tensor)
                except Exception as e:  # keep iterating so the other ranks' collectives complete
                    error = e
            if error is not None:
                raise error
            if writer is not None:
                files = writer.close()
                copy_hf_side_files(ckpt_dir, tmp)
                _write_configs(hf_config, out_dtype, tmp)
                logger.info('wrote %s (%.1f MB)', ', '.join(files), writer.total_bytes / 1e6)
        if parallel.rank == 0:
            print(f'[megaswift export] mcore -> HF: {final} ({time.perf_counter() - start:.1f} s, '
                  f'{_dtype_name(out_dtype)}, {len(files)} safetensors file(s))', flush=True)
        if args.test_convert_precision:
            from .precision import test_convert_precision
            test_convert_precision(models, final, parallel=parallel)
    return str(final)


def _write_configs(hf_config, dtype: torch.dtype, out_dir: Path) -> None:
    from transformers import GenerationConfig
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    if not (out_dir / 'generation_config.json').is_file():
        GenerationConfig.from_model_config(hf_config).save_pretrained(out_dir)

