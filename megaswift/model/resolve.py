"""Turn ``--model`` (local dir, embedded hub id, or hub id) into a local HF directory."""
from __future__ import annotations

import os
from pathlib import Path

from ..utils.errors import UserError
from .embedded import EMBEDDED_MODELS, embedded_model_dir, find_embedded


class ModelNotFoundError(UserError, FileNotFoundError):
    pass


def resolve_model_dir(model: str) -> str:
    """A local directory holding ``config.json`` for ``model``.

    Order: an existing local directory; a model embedded in a PyPI package; the local
    HF hub cache; the HF hub itself. Failing all of them raises a one-line error.
    """
    path = Path(os.path.expanduser(model))
    if path.exists():
        if path.is_dir() and (path / 'config.json').is_file():
            return str(path)
        raise ModelNotFoundError(f"model '{model}' is a local path but not an HF model directory (no config.json in it)")
    spec = find_embedded(model)
    if spec is not None:
        return str(embedded_model_dir(spec))
    if model.count('/') != 1 or model.startswith(('.', '/')):
        raise ModelNotFoundError(f"model '{model}' is not a local directory and not a hub id of the form 'org/name'")
    return _from_hub(model)


def _from_hub(model: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        snapshot_download = None
    reason = 'huggingface_hub is not installed'
    if snapshot_download is not None:
        try:
            return snapshot_download(model, local_files_only=True)
        except Exception:
            pass
        if os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0', 'false', 'False'):
            reason = 'HF_HUB_OFFLINE is set'
        else:
            try:
                return snapshot_download(model)
            except Exception as e:  # network errors come in many types; report the first line only
                reason = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    embedded = ', '.join(EMBEDDED_MODELS)
    raise ModelNotFoundError(
        f"model '{model}' is neither a local directory nor embedded ({embedded}), and the hub could not provide it ({reason})")
