"""Run megatron-core on CPU (gloo): the one place megaswift redirects mcore's hard-coded CUDA calls.

megatron-core assumes CUDA in ~200 places (``torch.empty(..., device=torch.cuda.current_device())``,
CUDA RNG trackers, streams, ``param.type() == 'torch.cuda.FloatTensor'`` asserts). On a machine
without a CUDA device, ``apply()`` redirects exactly the names listed in ``PATCHED_CUDA_ATTRS``
to CPU equivalents and installs a TorchFunctionMode that maps ``device='cuda'`` to CPU. It is
called explicitly by the engine (never at import time), is idempotent, and does nothing when
CUDA is available, so laptops, CI and GPU clusters run the same engine code.

``tests/megatron/test_cpu_compat.py`` scans every megatron-core module our paths import and
fails when one uses a ``torch.cuda`` name that is neither patched nor listed as harmless here.
"""
from __future__ import annotations

import contextlib
import logging
import queue

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# torch.cuda names replaced by CPU equivalents (or no-ops) while the layer is active.
PATCHED_CUDA_ATTRS = (
    'current_device', 'synchronize', 'current_stream', 'default_stream', 'stream', 'Stream', 'Event',
    'empty_cache', 'get_rng_state', 'set_rng_state', 'manual_seed', 'manual_seed_all', 'set_device',
    'memory_allocated', 'memory_reserved', 'max_memory_allocated', 'nvtx',
)
# torch.cuda names that are safe on CPU as they are (checks, type names, exceptions, or only
# reached on features megaswift does not enable on CPU: CUDA graphs, memory pools, fp8, ...).
HARMLESS_CUDA_ATTRS = (
    'is_available', 'device_count', 'FloatTensor', 'HalfTensor', 'BFloat16Tensor', 'BFloat', 'OutOfMemoryError',
    'amp', 'is_bf16_supported', 'get_device_properties', 'get_device_capability', 'CUDAGraph', 'graph',
    'graph_pool_handle', 'MemPool', 'use_mem_pool', 'ExternalStream', 'set_stream', 'memory_stats', 'memory',
    'default_generators', 'random', 'utilization', 'temperature', 'power_draw', 'clock_rate', 'mem_get_info',
    'ipc_collect', 'cudart', 'reset_peak_memory_stats', 'max_memory_reserved',
)

_applied = False


class _NoStream:
    """Stands in for torch.cuda.Stream / Event: every operation is a no-op on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Nvtx:
    @staticmethod
    def range_push(*a, **k):
        pass

    @staticmethod
    def range_pop(*a, **k):
        pass

    @staticmethod
    def range(*a, **k):
        return contextlib.nullcontext()

    @staticmethod
    def mark(*a, **k):
        pass


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == 'cuda'
    if isinstance(device, str):
        return device.startswith('cuda')
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


class _CudaToCpuMode(TorchFunctionMode):
    """Maps ``device='cuda'`` / ``.to('cuda')`` / ``.cuda()`` to CPU; ``Tensor.type()`` reports CUDA names
    (mcore's clip_grads and distributed optimizer assert on them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if 'device' in kwargs and _is_cuda(kwargs['device']):
            kwargs['device'] = 'cpu'
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], 'cpu', *args[2:])
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(result, str):
            return result.replace('torch.', 'torch.cuda.', 1) if '.cuda.' not in result else result
        return result


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))  # torch.manual_seed would recurse into torch.cuda


def apply() -> bool:
    """Patch for CPU when no CUDA device exists. Returns True when the layer is (now) active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    cuda = torch.cuda
    cuda.current_device = lambda: 'cpu'
    for name in ('synchronize', 'empty_cache', 'set_device'):
        setattr(cuda, name, lambda *a, **k: None)
    for name in ('memory_allocated', 'memory_reserved', 'max_memory_allocated'):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.Stream = cuda.Event = _NoStream
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = cuda.manual_seed_all = _cpu_manual_seed
    cuda.nvtx = _Nvtx
    _patch_megatron()
    mode = _CudaToCpuMode()
    mode.__enter__()  # process-wide for this thread; the engine runs its loop on the main thread
    _applied = True
    logger.info('megatron-core CPU compatibility layer applied (%d torch.cuda names redirected)',
                len(PATCHED_CUDA_ATTRS))
    return True


def _patch_megatron() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import random as mcore_random
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # The first async save would start a spawn-context multiprocessing.Manager (3.6 s, and a hang
    # in scripts without a __main__ guard); an in-process queue serves the synchronous CPU path.
    filesystem_async._results_queue = queue.Queue()
    logging.getLogger('megatron.core.tensor_parallel.random').setLevel(logging.ERROR)
