"""megatron-core dist-checkpoints (``torch_dist``) of megaswift models, written atomically.

Layout of a checkpoint directory (Megatron-SWIFT's, so ``--mcore_model`` points at the parent)::

    <output_dir>/
        latest_checkpointed_iteration.txt   'release' or the iteration; written last, the completion marker
        megaswift_meta.json                  HF config, the layout it was saved at, dtype, versions
        config.json, tokenizer files, ...    copied from the HF model so --to_hf needs nothing else
        release/ | iter_0000100/             dist_checkpointing.save output: metadata.json, .metadata,
                                             common.pt, __*_*.distcp

Training saves (``iteration=N``) add ``iter_000000N/`` (with its own ``megaswift_meta.json``) next to
the earlier ones and repoint the tracker. Tensors are stored by their global (layout-independent)
keys, so a checkpoint saved at one TP/PP/VPP loads at any other. All ranks write into a hidden
sibling directory that rank 0 renames into place after every rank succeeded: a crash never leaves
a directory that looks complete, and the tracker only ever names a finished checkpoint.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..utils.dist import any_rank, barrier, initialized_dist, rank
from ..utils.errors import UserError
from ..utils.paths import atomic_write_text
from .parallel import ParallelContext

logger = logging.getLogger(__name__)

META_FILE = 'megaswift_meta.json'
TRACKER_FILE = 'latest_checkpointed_iteration.txt'
FORMAT = 'megaswift-mcore-torch_dist'
FORMAT_VERSION = 1
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.gguf', '.h5', '.msgpack', '.ckpt', '.distcp')
_WEIGHT_INDEXES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')


class CheckpointError(UserError, RuntimeError):
    """A missing, incomplete or incompatible checkpoint; the message names the directory and what is wrong."""


def _broadcast(obj):
    dist = initialized_dist()
    if not dist or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sharded_state_dict(models) -> dict:
    if len(models) == 1:
        return {'model': models[0].sharded_state_dict()}
    return {f'model{i}': m.sharded_state_dict() for i, m in enumerate(models)}


def _config_dict(hf_config) -> dict:
    if hf_config is None:
        return {}
    if isinstance(hf_config, dict):
        return dict(hf_config)
    return hf_config.to_dict()


def copy_hf_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer and generation files (everything at the top level but weights)."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _WEIGHT_INDEXES \
                and p.name not in (META_FILE, TRACKER_FILE) and not p.name.startswith('.'):
            shutil.copy2(p, Path(dst) / p.name)
            copied.append(p.name)
    return copied


def apply_umask(path: str | os.PathLike, directory: bool = True) -> None:
    """Give ``path`` the permissions a plain mkdir/open would (temp files and dirs are private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _iteration_dir_name(iteration: int | None) -> str:
    return 'release' if iteration is None else f'iter_{int(iteration):07d}'


@contextlib.contextmanager
def distributed_atomic_directory(final: str | os.PathLike):
    """Every rank gets the same hidden temporary sibling of ``final``; it becomes ``final`` only if the
    block succeeded on every rank (rank 0 renames it after a barrier). Otherwise it is removed, every
    rank raises, and nothing at ``final`` looks complete. All ranks must enter and leave together.
    """
    final = Path(final).resolve()
    tmp = error = None
    if rank() == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=final.parent, prefix=f'.{final.name}.', suffix='.partial')
            apply_umask(tmp)  # mkdtemp makes it 0700; outputs are shared like any other file
        except OSError as e:
            error = f'cannot create a directory next to {final}: {e}'
    tmp, error = _broadcast((tmp, error))
    if error:
        raise CheckpointError(error)
    tmp = Path(tmp)
    raised = None
    try:
        yield tmp
    except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
        raised = e
    failed = any_rank([raised is not None])[0]
    commit_error = None
    if rank() == 0:
        try:
            if not failed:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except OSError as e:
            commit_error = f'cannot move the finished output to {final}: {e}'
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    commit_error = _broadcast(commit_error)
    if raised is not None:
        raise raised
    if failed:
        raise CheckpointError(f"writing '{final}' failed on another rank (see its error); nothing was written there")
    if commit_error:
        raise CheckpointError(commit_error)


def save_mcore_checkpoint(models, output_dir: str | os.PathLike, hf_config, extra_meta: dict | None = None, *,
                          hf_dir: str | os.PathLike | None = None, iteration: int | None = None,
                          parallel: ParallelContext | None = None) -> str:
    """Save ``models`` (one module per virtual pipeline chunk) as a ``torch_dist`` checkpoint; returns its root.

    Every rank must call this. ``hf_dir``: the HF model whose config/tokenizer files are copied alongside.
    ``iteration=None`` (a conversion): ``output_dir`` holds one ``release`` checkpoint and is replaced as a
    whole, only once the new one is complete. ``iteration=N`` (training): ``output_dir/iter_000000N`` is
    written atomically next to earlier iterations, then the tracker file is pointed at it. ``parallel``: the
    ``ParallelContext`` the models were built at, recorded as the layout (default: megatron-core's state).
    """
    from megatron.core import dist_checkpointing

    from . import cpu_compat
    cpu_compat.apply()  # dist_checkpointing.save synchronises CUDA streams; a no-op with CUDA
    root = Path(output_dir).resolve()
    sub = _iteration_dir_name(iteration)
    meta = _meta(models, hf_config, extra_meta, sub, (parallel or ParallelContext.from_megatron()).layout())
    with distributed_atomic_directory(root if iteration is None else root / sub) as tmp:
        ckpt = tmp / sub if iteration is None else tmp
        if rank() == 0:
            ckpt.mkdir(exist_ok=True)
        barrier()
        dist_checkpointing.save(_sharded_state_dict(models), str(ckpt), sharded_strategy=('torch_dist', 1))
        if rank() == 0:
            _write_meta(ckpt if iteration is not None else tmp, meta)
            if iteration is None:
                _write_side_files(tmp, hf_config, hf_dir)
                (tmp / TRACKER_FILE).write_text('release')  # the completion marker, written last
    if iteration is not None:
        if rank() == 0:
            _write_meta(root, meta)
            _write_side_files(root, hf_config, hf_dir)
            _atomic_text(root / TRACKER_FILE, str(int(iteration)))  # only now does the new iteration count
        barrier()
    logger.info('saved mcore checkpoint %s to %s', sub, root)
    return str(root)


def _meta(models, hf_config, extra_meta, sub, layout: dict) -> dict:
    import megaswift
    param = next(models[0].parameters())
    return {'format': FORMAT, 'format_version': FORMAT_VERSION, 'megaswift_version': megaswift.__version__,
            'megatron_core_version': _mcore_version(), 'iteration': sub,
            'saved_at': datetime.datetime.now().isoformat(timespec='seconds'),
            'layout': layout, 'dtype': str(param.dtype).replace('torch.', ''),
            'hf_config': _config_dict(hf_config), **(extra_meta or {})}


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    apply_umask(path, directory=False)  # its temp file was private


def _write_meta(directory: Path, meta: dict) -> None:
    _atomic_text(directory / META_FILE, json.dumps(meta, indent=2, default=str) + '\n')


def _write_side_files(directory: Path, hf_config, hf_dir) -> None:
    if hf_dir is not None:
        copy_hf_side_files(hf_dir, directory)
    if hasattr(hf_config, 'save_pretrained') and not (directory / 'config.json').exists():
        hf_config.save_pretrained(directory)


def _mcore_version() -> str:
    try:
        from importlib.metadata import version
        return version('megatron-core')
    except Exception:  # pragma: no cover
        return 'unknown'


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """The ``megaswift_meta.json`` of a checkpoint (its HF config, layout, dtype)."""
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"mcore checkpoint '{ckpt_dir}' does not exist or is not a directory")
    if not path.is_file():
        hint = ' (an unfinished save? its temporary directory starts with a dot)' if not (
            Path(ckpt_dir) / TRACKER_FILE).exists() else ''
        raise CheckpointError(f"'{ckpt_dir}' is not a megaswift mcore checkpoint: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{path}' is corrupt: {e}") from None
    for key in ('hf_config', 'layout', 'dtype'):
        if key not in meta:
            raise CheckpointError(f"'{path}' is corrupt: field '{key}' is missing")
    return meta


def resolve_checkpoint_dir(ckpt_dir: str | os.PathLike) -> Path:
    """The dist-checkpoint directory: ``ckpt_dir`` itself, or the one its tracker file names."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"mcore checkpoint '{ckpt_dir}' does not exist or is not a directory")
    tracker = root / TRACKER_FILE
    if tracker.is_file():
        value = tracker.read_text(encoding='utf-8').strip()
        sub = root / ('release' if value == 'release' else _iteration_dir_name(int(value)) if value.isdigit()
                      else value)
        if not sub.is_dir():
            raise CheckpointError(f"mcore checkpoint '{root}': {TRACKER_FILE} names '{value}' but '{sub}' is missing")
        return sub
    if (root / 'metadata.json').is_file():
        return root
    raise CheckpointError(f"'{root}' is not a complete mcore checkpoint: {TRACKER_FILE} is missing "
                          f"(and it is no dist-checkpoint directory either: no metadata.json)")


def verify_checkpoint_files(ckpt: Path) -> None:
    """Check that every file and byte range the checkpoint's index refers to is there."""
    for name in ('metadata.json', '.metadata', 'common.pt'):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"mcore checkpoint '{ckpt}' is incomplete: '{name}' is missing")
    from .data_only_checkpoint import UnsafeCheckpointError, check_data_only, read_metadata
    try:
        metadata = read_metadata(ckpt)
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"mcore checkpoint '{ckpt}' is corrupt: '.metadata' cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        path = ckpt / info.relative_path
        if info.relative_path not in sizes:
            sizes[info.relative_path] = path.stat().st_size if path.is_file() else -1
        size = sizes[info.relative_path]
        if size < 0:
            raise CheckpointError(f"mcore checkpoint '{ckpt}' is incomplete: file '{info.relative_path}' "
                                  f"(holding tensor '{index.fqn}') is missing")
        if info.offset + info.length > size:
            raise CheckpointError(f"mcore checkpoint '{ckpt}' is corrupt: file '{info.relative_path}' is truncated "
                                  f"({size} bytes; tensor '{index.fqn}' needs bytes {info.offset}.."
                                  f"{info.offset + info.length})")
    check_data_only(ckpt, metadata)


def verify_checkpoint_on_every_rank(ckpt: Path) -> None:
    """``verify_checkpoint_files`` on every rank (node-local copies included); all ranks fail together."""
    error = None
    try:
        verify_checkpoint_files(ckpt)
    except UserError as e:
        error = str(e)
    error = _first_error(error)
    if error:
        raise CheckpointError(error)


def load_mcore_checkpoint(models, ckpt_dir: str | os.PathLike) -> dict:
    """Load a checkpoint saved at any layout into ``models`` (built at the current layout); returns its meta."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(ckpt_dir)
    ckpt = resolve_checkpoint_dir(root)
    meta = read_meta(root) if (root / META_FILE).is_file() else {}
    verify_checkpoint_on_every_rank(ckpt)
    error = None
    try:
        loaded, in_ckpt_only, in_model_only = dist_checkpointing.load(
            _sharded_state_dict(models), str(ckpt), strict=StrictHandling.RETURN_ALL)
        if in_model_only:
            error = (f"mcore checkpoint '{ckpt}' lacks tensor '{sorted(in_model_only)[0]}' that the model needs"
                     + _more(in_model_only) + ' (a checkpoint of another model or architecture?)')
        elif in_ckpt_only:
            error = (f"mcore checkpoint '{ckpt}' holds tensor '{sorted(in_ckpt_only)[0]}' that the model does not "
                     f"have" + _more(in_ckpt_only) + ' (a checkpoint of another model or architecture?)')
        else:
            keys = ['model'] if len(models) == 1 else [f'model{i}' for i in range(len(models))]
            for key, model in zip(keys, models):
                result = model.load_state_dict(loaded[key], strict=False)
                missing = [k for k in result.missing_keys if not k.endswith('_extra_state')]
                if missing:
                    error = f"mcore checkpoint '{ckpt}' lacks tensor '{missing[0]}'" + _more(missing)
                    break
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        error = f"cannot load mcore checkpoint '{ckpt}': {_describe(e)}"
    error = _first_error(error)  # unexpected keys are per rank: every rank must fail together
    if error:
        raise CheckpointError(error)
    logger.info('loaded mcore checkpoint %s (saved at %s)', ckpt, meta.get('layout'))
    return meta


def _more(keys) -> str:
    return f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''


def _first_error(error: str | None) -> str | None:
    """The first rank's error, on every rank (a collective)."""
    dist = initialized_dist()
    if not dist or dist.get_world_size() == 1:
        return error
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _describe(e: BaseException) -> str:
    """One line for an exception; for torch's CheckpointException, the first failing rank's error."""
    failures = getattr(e, 'failures', None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc
        if isinstance(exc, BaseException):
            return _first_line(exc)
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return f'{type(e).__name__}: {line}'[:500]
    return type(e).__name__

