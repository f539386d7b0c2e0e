"""Arguments of ``megaswift export``: HF <-> megatron-core checkpoint conversion (ms-swift's flag names)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .base import ArgumentError, ArgumentsBase, ModelArguments, ParallelArguments, PluginArguments

_SIZE_UNITS = {'': 1, 'b': 1, 'kb': 10**3, 'mb': 10**6, 'gb': 10**9, 'tb': 10**12,
               'kib': 2**10, 'mib': 2**20, 'gib': 2**30, 'tib': 2**40}


def parse_size(value: str | int, flag: str = 'max_shard_size') -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, 1000 -> 1000 (HF's convention)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*', str(value))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ArgumentError(f"--{flag}: expected a size such as '5GB', '500MB' or '2GiB', got {value!r}")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if size <= 0:
        raise ArgumentError(f'--{flag}: must be positive, got {value!r}')
    return size


@dataclass
class ExportArguments(ArgumentsBase, PluginArguments, ParallelArguments, ModelArguments):
    mcore_model: str | None = None     # an mcore checkpoint (the directory with latest_checkpointed_iteration.txt)
    to_mcore: bool = False
    to_hf: bool = False
    output_dir: str | None = None      # default: <model name>-mcore (to_mcore) or <mcore_model>-hf (to_hf)
    exist_ok: bool = False             # replace an existing --output_dir (only once the new one is complete)
    test_convert_precision: bool = False
    max_shard_size: str = '5GB'        # HF safetensors shard size for --to_hf
    seed: int = 42

    def _check(self):
        if self.to_mcore == self.to_hf:
            raise ArgumentError('pass exactly one of --to_mcore true (HF -> mcore) and --to_hf true (mcore -> HF)')
        if self.to_mcore:
            if not self.model:
                raise ArgumentError('--to_mcore needs --model (an HF model directory or hub id)')
            if self.mcore_model:
                raise ArgumentError('--to_mcore converts --model; --mcore_model is not used (drop it)')
        else:
            if not self.mcore_model:
                raise ArgumentError('--to_hf needs --mcore_model (a checkpoint written by megaswift export '
                                    '--to_mcore or by training)')
            if self.model:
                raise ArgumentError('--to_hf reads the config and tokenizer stored in --mcore_model; '
                                    '--model is not used (drop it)')
            if not os.path.isdir(self.mcore_model):
                raise ArgumentError(f"--mcore_model: '{self.mcore_model}' does not exist or is not a directory")
        self.max_shard_bytes = parse_size(self.max_shard_size)
        if self.output_dir is None:
            if self.to_mcore:
                self.output_dir = os.path.basename(os.path.normpath(self.model)) + '-mcore'
            else:
                self.output_dir = os.path.normpath(self.mcore_model) + '-hf'
        if os.path.exists(self.output_dir) and not self.exist_ok:
            raise ArgumentError(f"--output_dir: '{self.output_dir}' already exists; pass --exist_ok true to replace "
                                f'it or choose another directory')
        src = self.model if self.to_mcore else self.mcore_model
        if src and os.path.exists(src) and os.path.realpath(src) == os.path.realpath(self.output_dir):
            raise ArgumentError('--output_dir must differ from the input checkpoint')
