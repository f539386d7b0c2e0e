"""The CPU compatibility layer covers every torch.cuda name on the megatron-core paths megaswift uses.

A megatron-core upgrade that adds, say, ``torch.cuda.mem_get_info()`` on one of these paths fails
here with the module and the name, instead of as an obscure CUDA assertion on a CPU machine.
"""
import importlib
import re
import subprocess
import sys
from pathlib import Path

from megaswift.megatron.cpu_compat import HARMLESS_CUDA_ATTRS, PATCHED_CUDA_ATTRS

# the entry points of every megatron-core path megaswift drives: model, schedules, DDP, optimizer, checkpoints
ENTRY_MODULES = ['megaswift.megatron.build', 'megaswift.megatron.convert', 'megaswift.megatron.checkpoint',
                 'megatron.core.pipeline_parallel.schedules', 'megatron.core.distributed',
                 'megatron.core.optimizer', 'megatron.core.dist_checkpointing', 'megatron.core.tensor_parallel']
CUDA_NAME = re.compile(r'torch\.cuda\.([A-Za-z_]+)')


def megatron_modules_in_use() -> dict[str, Path]:
    script = ('import importlib, json, sys\n'
              f'for m in {ENTRY_MODULES!r}: importlib.import_module(m)\n'
              'print(json.dumps({k: getattr(v, "__file__", None) for k, v in sys.modules.items() '
              'if k.startswith("megatron.core")}))')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, check=True)
    import json
    return {k: Path(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items() if v}


def test_every_torch_cuda_name_on_our_paths_is_covered():
    covered = set(PATCHED_CUDA_ATTRS) | set(HARMLESS_CUDA_ATTRS)
    modules = megatron_modules_in_use()
    assert len(modules) > 50, 'the entry modules should pull in most of megatron-core'
    uncovered = {}
    for name, path in modules.items():
        for attr in set(CUDA_NAME.findall(path.read_text(encoding='utf-8'))) - covered:
            uncovered.setdefault(attr, []).append(name)
    assert not uncovered, ('megatron-core uses torch.cuda names the CPU layer neither patches nor lists as harmless '
                           f'(megaswift/megatron/cpu_compat.py): {uncovered}')


def test_the_scan_would_catch_a_new_name(tmp_path):
    """Negative control: a module using an unknown torch.cuda name is reported."""
    fake = tmp_path / 'fake.py'
    fake.write_text('import torch\nx = torch.cuda.brand_new_api()\n')
    found = set(CUDA_NAME.findall(fake.read_text())) - set(PATCHED_CUDA_ATTRS) - set(HARMLESS_CUDA_ATTRS)
    assert found == {'brand_new_api'}


def test_apply_is_explicit_not_at_import():
    """Importing megaswift's megatron layer must not patch torch.cuda (only the engine calls apply())."""
    script = ('import torch; before = torch.cuda.current_device\n'
              'import megaswift.megatron, megaswift.megatron.cpu_compat as c\n'
              'assert torch.cuda.current_device is before, "patched at import"\n'
              'assert c.apply() is True and torch.cuda.current_device() == "cpu"\n'
              'assert c.apply() is True  # idempotent\n'
              'print("ok")')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert out.stdout.strip().endswith('ok'), out.stderr[-2000:]
    importlib.import_module('megaswift.megatron.cpu_compat')
