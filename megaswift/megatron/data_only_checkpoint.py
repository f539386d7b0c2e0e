"""Read a megatron-core ``torch_dist`` checkpoint as data only: no pickle in it may name code to run.

A dist-checkpoint holds three kinds of pickles, and torch reads two of them without a guard:

- ``.metadata`` (the index of tensors and byte ranges): ``FileSystemReader.read_metadata`` calls
  ``pickle.load`` on it, so a crafted index runs any function it names;
- byte items inside ``__*_*.distcp`` (non-tensor state such as the optimizer's param groups or layers'
  ``_extra_state``): the default load planner reads them with ``torch.load`` with the weights-only guard off;
- ``common.pt``: ``torch.load`` with torch's default, which an environment variable can turn off.

``read_metadata`` unpickles the index with an allow-list of torch's own checkpoint-metadata types (and
dtypes, layouts, ``torch.Size``); ``check_data_only`` then reads every byte item and ``common.pt`` with
``torch.load(weights_only=True)``. A checkpoint that fails either is refused before megatron-core or torch
touch it, and nothing in it has run.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from ..utils.errors import UserError, one_line

# The modules whose classes (dataclasses and enums of torch.distributed.checkpoint) an index may name.
_METADATA_MODULES = ('torch.distributed.checkpoint.metadata', 'torch.distributed.checkpoint.planner')
_METADATA_GLOBALS = {('torch.distributed.checkpoint.filesystem', '_StorageInfo'),
                     ('torch.serialization', '_get_layout'), ('torch', 'Size'),
                     ('collections', 'OrderedDict')}


class UnsafeCheckpointError(UserError):
    """A checkpoint file that would run code (or holds objects that are not plain data) when read."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or (
            module in _METADATA_MODULES and _is_class_of(module, name)) or (
            module == 'torch' and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)))
        if not allowed:
            raise UnsafeCheckpointError(
                f"refusing to read '{self.source}': it names '{module}.{name}', which is not checkpoint metadata "
                f'(a crafted or foreign file would run code when unpickled); megaswift reads checkpoints as data only')
        return super().find_class(module, name)


def _is_class_of(module: str, name: str) -> bool:
    """``module.name`` is a class defined there (torch's checkpoint-metadata modules define dataclasses and enums,
    nothing that acts on the world when built from data; what they import from elsewhere is not allowed)."""
    import importlib
    obj = getattr(importlib.import_module(module), name, None)
    return isinstance(obj, type) and obj.__module__ == module


def read_metadata(ckpt: Path):
    """The checkpoint's ``.metadata`` index, unpickled with only torch's checkpoint-metadata types allowed."""
    path = Path(ckpt) / '.metadata'
    with open(path, 'rb') as f:
        metadata = _MetadataUnpickler(f, path).load()
    from torch.distributed.checkpoint.metadata import Metadata
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"'{path}' is not a dist-checkpoint index (it holds a {type(metadata).__name__})")
    return metadata


def _load_weights_only(data: io.BytesIO | Path, what: str) -> None:
    try:
        torch.load(data, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f'refusing to read {what}: it is not plain data (tensors, numbers, strings, '
                                    f'lists, dicts): {one_line(e)}') from None


def check_data_only(ckpt: Path, metadata) -> None:
    """Every non-tensor item of the checkpoint, and its ``common.pt``, reads with ``weights_only=True``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    ckpt = Path(ckpt)
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, 'transform_descriptors', None):
            raise UnsafeCheckpointError(f"refusing to read '{ckpt}': item '{index.fqn}' is stored transformed "
                                        f'({info.transform_descriptors}), which megaswift does not read')
        with open(ckpt / info.relative_path, 'rb') as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        _load_weights_only(io.BytesIO(raw), f"item '{index.fqn}' of '{ckpt / info.relative_path}'")
    common = ckpt / 'common.pt'
    if common.is_file():
        _load_weights_only(common, f"'{common}'")
