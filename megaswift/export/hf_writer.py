"""Stream (name, tensor) pairs into HF safetensors shards of at most ``max_shard_bytes`` each.

Each tensor goes to disk as it arrives, so exporting holds no more than the tensor in hand (a
buffered shard would cost up to ``max_shard_size`` of memory on rank 0). The file names follow
``save_pretrained``: a single ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``) when the weights need more
than one shard.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..megatron.checkpoint import apply_umask

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


_ST_DTYPES = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.float64: 'F64',
              torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
              torch.bool: 'BOOL', torch.float8_e4m3fn: 'F8_E4M3', torch.float8_e5m2: 'F8_E5M2'}
HEADER_RESERVE = 1 << 18  # bytes kept for each shard's JSON header (a shard closes early rather than overflow it)


class _Shard:
    """One safetensors file written tensor by tensor: the data goes straight to disk after a reserved header
    region; ``close`` writes the header there, padded with spaces (which the format allows)."""

    def __init__(self, path: Path, reserve: int):
        self.path, self.reserve = path, reserve
        self.file = open(path, 'wb')
        self.file.seek(8 + reserve)
        self.entries: dict[str, dict] = {}
        self.header_len = len('{"__metadata__":{"format":"pt"}}')
        self.data_bytes = 0

    def entry_len(self, name: str, tensor: torch.Tensor) -> int:
        return len(json.dumps({name: self._entry(tensor, 0)}, separators=(',', ':'))) + 1

    def _entry(self, tensor, offset):
        nbytes = tensor.numel() * tensor.element_size()
        return {'dtype': _ST_DTYPES[tensor.dtype], 'shape': list(tensor.shape),
                'data_offsets': [offset, offset + nbytes]}

    def fits(self, name, tensor) -> bool:
        return self.header_len + self.entry_len(name, tensor) <= self.reserve

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        self.header_len += self.entry_len(name, tensor)
        self.entries[name] = self._entry(tensor, self.data_bytes)
        if tensor.numel():
            self.file.write(memoryview(tensor.detach().to('cpu').contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.data_bytes += tensor.numel() * tensor.element_size()

    def close(self) -> None:
        header = json.dumps({'__metadata__': {'format': 'pt'}, **self.entries}, separators=(',', ':')).encode()
        if len(header) > self.reserve:  # pragma: no cover - fits() keeps this from happening
            raise RuntimeError(f'safetensors header of {self.path.name} overflows its reserved space')
        self.file.seek(0)
        self.file.write(struct.pack('<Q', self.reserve) + header + b' ' * (self.reserve - len(header)))
        self.file.close()


class ShardedSafetensorsWriter:
    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int, dtype: torch.dtype | None = None,
                 header_reserve: int = HEADER_RESERVE):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = int(max_shard_bytes)
        self.dtype = dtype
        self.header_reserve = header_reserve
        self._current: _Shard | None = None
        self._shards: list[tuple[str, list[str]]] = []   # (temporary file name, tensor names)
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` to the current shard (a new one if it would pass the size limit); holds no copy."""
        if name in self._seen:
            raise ValueError(f"tensor '{name}' was produced twice")
        self._seen.add(name)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        cur = self._current
        if cur is not None and cur.entries and (cur.data_bytes + nbytes > self.max_shard_bytes
                                                or not cur.fits(name, tensor)):
            self._finish()
        if self._current is None:
            tmp_name = f'.shard-{len(self._shards) + 1:05d}.safetensors.tmp'
            self._current = _Shard(self.out_dir / tmp_name, self.header_reserve)
            self._shards.append((tmp_name, []))
        self._current.write(name, tensor)
        self._shards[-1][1].append(name)
        self.total_bytes += nbytes

    def _finish(self) -> None:
        self._current.close()
        apply_umask(self._current.path, directory=False)
        self._current = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the weight files written."""
        if self._current is None and not self._shards:
            raise ValueError('no tensors were written')
        if self._current is not None:
            self._finish()
        n = len(self._shards)
        if n == 1:
            os.replace(self.out_dir / self._shards[0][0], self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self._shards, start=1):
            final = f'model-{i:05d}-of-{n:05d}.safetensors'
            os.replace(self.out_dir / tmp_name, self.out_dir / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {'metadata': {'total_size': self.total_bytes}, 'weight_map': dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + '\n', encoding='utf-8')
        return files
