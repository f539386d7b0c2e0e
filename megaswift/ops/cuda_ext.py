"""The loader of megaswift's CUDA ops (``csrc/``): row_stats, logit_grad_, position_ids, pack, unpack.

``load()`` tries, once per process (the result, module or failure, is cached):

1. the prebuilt extension ``megaswift._C`` (``setup.py`` builds it where CUDA is present);
2. a JIT build with ``torch.utils.cpp_extension.load`` from the csrc sources, only when
   ``torch.cuda.is_available()`` and a CUDA toolkit (nvcc) is found; it is compiled once into
   ``$MEGASWIFT_CACHE/torch_extensions`` (default ``~/.cache/megaswift/torch_extensions``) and reloaded from
   there afterwards (ranks of one job share the build through torch's file lock).

Nothing is imported or built when this module is imported: only the first ``load()``/``available()`` does.

Environment: ``MEGASWIFT_DISABLE_CUDA_EXT=1`` makes the ops unavailable (the torch paths run instead);
``MEGASWIFT_CUDA_JIT=0`` keeps the prebuilt module only (no JIT build); ``MEGASWIFT_VERBOSE_BUILD=1``
shows the compiler's output; ``TORCH_CUDA_ARCH_LIST`` picks the JIT build's architectures (default: those
of the visible GPUs).
"""
from __future__ import annotations

import importlib
import os
import re
import threading
from pathlib import Path
from types import ModuleType

SOURCES = ('bindings.cpp', 'linear_ce.cu', 'packing.cu')
HEADERS = ('ops.h',)
PREBUILT = 'megaswift._C'
JIT_NAME = 'megaswift_C'
OPS = ('row_stats', 'logit_grad_', 'position_ids', 'pack', 'unpack')

_lock = threading.Lock()
_state: tuple[ModuleType | None, str] | None = None  # (module or None, why not) after the first load()


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, '').strip().lower()
    if not value:
        return default
    return value not in ('0', 'false', 'no', 'off')


def source_dir() -> Path | None:
    """The folder holding the csrc sources: the repository's ``csrc/`` (checkout, editable install) or the
    copy an installed wheel ships as ``megaswift/_csrc``; None when neither is complete."""
    ops_dir = Path(__file__).resolve().parent
    for candidate in (ops_dir.parents[1] / 'csrc', ops_dir.parent / '_csrc'):
        if all((candidate / name).is_file() for name in SOURCES + HEADERS):
            return candidate
    return None


def cache_dir() -> Path:
    root = os.environ.get('MEGASWIFT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'megaswift')
    return Path(root) / 'torch_extensions'


def _import_prebuilt() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(PREBUILT), ''
    except ModuleNotFoundError as exc:
        if exc.name == PREBUILT:
            return None, f'{PREBUILT} is not built'
        return None, f'{PREBUILT} does not import ({exc})'
    except (ImportError, OSError) as exc:  # e.g. built against another torch: undefined symbols
        return None, f'{PREBUILT} does not load ({exc}); rebuild it against this torch'


def _jit_build() -> tuple[ModuleType | None, str]:
    import torch

    if not torch.cuda.is_available():
        built = f'CUDA {torch.version.cuda}' if torch.version.cuda else 'no CUDA'
        return None, f'torch.cuda.is_available() is False (torch {torch.__version__}, built with {built})'
    if not _env_flag('MEGASWIFT_CUDA_JIT', default=True):
        return None, 'the JIT build is disabled (MEGASWIFT_CUDA_JIT=0)'
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if not cuda_home or not (Path(cuda_home) / 'bin' / 'nvcc').is_file():
        return None, ('no CUDA toolkit to build the ops with (nvcc not found: set CUDA_HOME, or build '
                      f'{PREBUILT} with MEGASWIFT_BUILD_CUDA=1 pip install --no-build-isolation -e .)')
    src = source_dir()
    if src is None:
        return None, f'the CUDA sources ({", ".join(SOURCES)}) are not found next to the megaswift package'
    tag = re.sub(r'[^A-Za-z0-9_.]+', '_', f'torch{torch.__version__}_cu{torch.version.cuda}')
    build_dir = cache_dir() / f'{JIT_NAME}_{tag}'
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=JIT_NAME, sources=[str(src / name) for name in SOURCES], extra_include_paths=[str(src)],
            extra_cflags=['-O3'], extra_cuda_cflags=['-O3'], build_directory=str(build_dir),
            verbose=_env_flag('MEGASWIFT_VERBOSE_BUILD'))
    except Exception as exc:  # noqa: BLE001 - any build failure means "unavailable, with this reason"
        return None, f'the JIT build in {build_dir} failed: {type(exc).__name__}: {exc}'
    return module, ''


def _load() -> tuple[ModuleType | None, str]:
    if _env_flag('MEGASWIFT_DISABLE_CUDA_EXT'):
        return None, 'disabled by MEGASWIFT_DISABLE_CUDA_EXT'
    module, prebuilt_reason = _import_prebuilt()
    if module is not None:
        return module, ''
    module, jit_reason = _jit_build()
    if module is not None:
        return module, ''
    return None, f'{prebuilt_reason}; no JIT build: {jit_reason}'


def load(required: bool = False) -> ModuleType | None:
    """The extension module (functions ``row_stats``, ``logit_grad_``, ``position_ids``, ``pack``,
    ``unpack``), or None when it cannot be had; with ``required=True`` a RuntimeError saying why."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _load()
    module, reason = _state
    if module is None and required:
        raise RuntimeError(f'megaswift CUDA ops are unavailable: {reason}')
    return module


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str:
    """Why ``load()`` returns None ('' when the ops are available)."""
    load()
    return _state[1] if _state is not None else ''


def reset() -> None:
    """Forget the cached result, so that the next ``load()`` tries again (tests, or after installing)."""
    global _state
    with _lock:
        _state = None
