"""Turn ``--model`` (local dir, embedded hub id, or hub id) into a local HF directory; check its config and weights."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..utils.errors import UserError, one_line
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


class ModelFolderError(UserError, OSError):
    """An HF model folder whose config, tokenizer or weight files are missing or unreadable."""


class ModelWeightsError(ModelFolderError, FileNotFoundError):
    """An HF model folder whose weight files are missing, incomplete or unreadable."""


def read_model_config(model_dir: str | os.PathLike, flag: str = '--model'):
    """The HF config of ``model_dir``; an unreadable or unknown one is a one-line ``ModelFolderError``."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"{flag}: cannot read the HF config of '{model_dir}': {one_line(e)}") from None


# (index file, single file) of each weight format transformers loads; megatron-core loads safetensors only
SAFETENSORS = ('model.safetensors.index.json', 'model.safetensors')
PYTORCH_BIN = ('pytorch_model.bin.index.json', 'pytorch_model.bin')


def check_model_weights(model_dir: str | os.PathLike, safetensors_only: bool = False, flag: str = '--model') -> None:
    """Fail with one line naming the folder and what is missing when ``model_dir`` (an HF model folder with a
    config.json) has no usable weights: no weight file, a shard its index lists but the folder lacks, or a
    safetensors file whose header cannot be read; the message starts with ``flag``. Cheap (headers only), so
    every command runs it before any model is built."""
    root = Path(model_dir)
    formats = (SAFETENSORS,) if safetensors_only else (SAFETENSORS, PYTORCH_BIN)
    for index_name, single_name in formats:
        if (root / index_name).is_file():
            files = _indexed_weight_files(root, index_name, flag)
            break
        if (root / single_name).is_file():
            files = [single_name]
            break
    else:
        expected = ' or '.join(name for pair in formats for name in reversed(pair))
        only = '; only safetensors weights can be loaded here' if safetensors_only else ''
        extra = ' (it has pytorch_model.bin)' if safetensors_only and (root / PYTORCH_BIN[1]).is_file() else ''
        raise ModelWeightsError(f"{flag}: model folder '{root}' has a config.json but no weights{extra}: expected "
                                f'{expected}{only}')
    from safetensors import safe_open
    for file in files:
        if not file.endswith('.safetensors'):
            continue
        try:
            with safe_open(str(root / file), framework='pt') as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a torn or foreign file
            raise ModelWeightsError(f"{flag}: model folder '{root}': weight file '{file}' is corrupt or truncated "
                                    f'({type(e).__name__}: {one_line(e)})') from None


def _indexed_weight_files(root: Path, index_name: str, flag: str) -> list[str]:
    """The shard files ``root/index_name`` lists, each checked to exist."""
    index = root / index_name
    try:
        weight_map = json.loads(index.read_text(encoding='utf-8'))['weight_map']
        shards = {file: name for name, file in weight_map.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ModelWeightsError(f"{flag}: model folder '{root}': '{index_name}' is corrupt "
                                f'({type(e).__name__}: {e})') from None
    for file, name in sorted(shards.items()):
        if not (root / file).is_file():
            raise ModelWeightsError(f"{flag}: model folder '{root}' is incomplete: shard '{file}' (listed in "
                                    f"{index_name} for tensor '{name}') is missing")
    return sorted(shards)
