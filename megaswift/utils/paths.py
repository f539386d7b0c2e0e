"""Where megaswift keeps its caches, and atomic file/directory writes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ArgumentError


def cache_root() -> Path:
    """``$MEGASWIFT_CACHE`` or ``~/.cache/megaswift``."""
    root = os.environ.get('MEGASWIFT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'megaswift')
    return Path(root)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + '\n')


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike):
    """Yield a temporary sibling directory that becomes ``final`` only if the block succeeds.

    A crash inside the block leaves no directory at ``final`` that looks complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f'.{final.name}.', suffix='.partial'))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; the result is a normal output directory
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir_writable(path: str | os.PathLike, flag: str, replaced_whole: bool = False) -> None:
    """Fail fast, before any model is built, when the output folder ``path`` cannot be written.

    The check creates nothing: it writes an anonymous temporary file (never visible, gone when closed) in the
    nearest folder that exists: ``path`` itself or the ancestor under which it would be created. With
    ``replaced_whole`` the output is built as a sibling of ``path`` and renamed into place (``atomic_directory``),
    so its parent must be writable instead.
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    probe = target.parent if replaced_whole else target
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        what = f"'{probe}' is not a folder" if probe == target else f"'{probe}' in its path is a file, not a folder"
        raise ArgumentError(f"{flag} '{path}': {what}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ArgumentError(f"{flag} '{path}': cannot write in '{probe}' ({e.strerror or e})") from None
