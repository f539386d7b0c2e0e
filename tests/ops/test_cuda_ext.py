"""The loader of the CUDA ops (megaswift.ops.cuda_ext), on any machine: without CUDA it reports why the ops
are unavailable and never builds; importing megaswift.ops builds nothing anywhere."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from megaswift.ops import cuda_ext

REPO = Path(__file__).resolve().parents[2]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason='checks the behaviour without CUDA')


@pytest.fixture
def fresh(monkeypatch):
    """A loader that has not tried yet (and is forgotten again afterwards); no stray env settings."""
    for var in ('MEGASWIFT_DISABLE_CUDA_EXT', 'MEGASWIFT_CUDA_JIT'):
        monkeypatch.delenv(var, raising=False)
    cuda_ext.reset()
    yield
    cuda_ext.reset()


def _no_build(*args, **kwargs):
    raise AssertionError('a CUDA extension build was started')


@needs_no_cuda
def test_unavailable_without_cuda_says_why(fresh, monkeypatch):
    monkeypatch.setattr(cpp_extension, 'load', _no_build)
    assert cuda_ext.available() is False
    assert cuda_ext.load() is None
    reason = cuda_ext.unavailable_reason()
    assert 'megaswift._C is not built' in reason
    assert 'torch.cuda.is_available() is False' in reason


@needs_no_cuda
def test_load_required_raises_a_clear_error(fresh, monkeypatch):
    monkeypatch.setattr(cpp_extension, 'load', _no_build)
    with pytest.raises(RuntimeError, match=r'megaswift CUDA ops are unavailable: .*torch\.cuda\.is_available\(\) '
                                           r'is False'):
        cuda_ext.load(required=True)


def test_disabled_by_env(fresh, monkeypatch):
    monkeypatch.setenv('MEGASWIFT_DISABLE_CUDA_EXT', '1')
    assert not cuda_ext.available()
    assert 'MEGASWIFT_DISABLE_CUDA_EXT' in cuda_ext.unavailable_reason()
    with pytest.raises(RuntimeError, match='MEGASWIFT_DISABLE_CUDA_EXT'):
        cuda_ext.load(required=True)


def test_the_first_result_is_cached(fresh, monkeypatch):
    calls = []
    monkeypatch.setattr(cuda_ext, '_load', lambda: calls.append(1) or (None, 'nope'))
    assert cuda_ext.load() is None and not cuda_ext.available() and cuda_ext.unavailable_reason().endswith('nope')
    assert len(calls) == 1
    cuda_ext.reset()
    cuda_ext.load()
    assert len(calls) == 2


def test_sources_are_found():
    src = cuda_ext.source_dir()
    assert src is not None
    for name in cuda_ext.SOURCES + cuda_ext.HEADERS:
        assert (src / name).is_file()


def _pretend_cuda(monkeypatch, tmp_path):
    """torch.cuda.is_available() True and a CUDA_HOME with an nvcc, to drive the JIT path without a GPU."""
    home = tmp_path / 'cuda'
    (home / 'bin').mkdir(parents=True)
    (home / 'bin' / 'nvcc').write_text('')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(cpp_extension, 'CUDA_HOME', str(home))
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))


def test_jit_build_arguments(fresh, monkeypatch, tmp_path):
    _pretend_cuda(monkeypatch, tmp_path)
    seen = {}
    fake = SimpleNamespace(**{name: object() for name in cuda_ext.OPS})
    monkeypatch.setattr(cpp_extension, 'load', lambda **kwargs: seen.update(kwargs) or fake)
    assert cuda_ext.load(required=True) is fake and cuda_ext.available() and cuda_ext.unavailable_reason() == ''
    assert seen['name'] == 'megaswift_C'
    assert [Path(s).name for s in seen['sources']] == list(cuda_ext.SOURCES)
    assert all(Path(s).is_file() for s in seen['sources'])
    build = Path(seen['build_directory'])
    assert build.is_dir() and build.parent == tmp_path / 'cache' / 'torch_extensions'


def test_jit_build_failure_is_reported(fresh, monkeypatch, tmp_path):
    _pretend_cuda(monkeypatch, tmp_path)

    def broken(**kwargs):
        raise RuntimeError('nvcc exploded')
    monkeypatch.setattr(cpp_extension, 'load', broken)
    assert cuda_ext.load() is None
    assert 'nvcc exploded' in cuda_ext.unavailable_reason()
    with pytest.raises(RuntimeError, match='nvcc exploded'):
        cuda_ext.load(required=True)


def test_no_toolkit_no_build(fresh, monkeypatch, tmp_path):
    _pretend_cuda(monkeypatch, tmp_path)
    monkeypatch.setattr(cpp_extension, 'CUDA_HOME', None)
    monkeypatch.setattr(cpp_extension, 'load', _no_build)
    assert not cuda_ext.available()
    assert 'nvcc not found' in cuda_ext.unavailable_reason()


def test_jit_can_be_switched_off(fresh, monkeypatch, tmp_path):
    _pretend_cuda(monkeypatch, tmp_path)
    monkeypatch.setenv('MEGASWIFT_CUDA_JIT', '0')
    monkeypatch.setattr(cpp_extension, 'load', _no_build)
    assert not cuda_ext.available()
    assert 'MEGASWIFT_CUDA_JIT=0' in cuda_ext.unavailable_reason()


def test_importing_megaswift_ops_builds_nothing():
    code = textwrap.dedent('''
        import importlib, pkgutil, sys
        import torch.utils.cpp_extension as cpp_extension

        def no_build(*args, **kwargs):
            raise AssertionError('a CUDA extension build was started at import time')
        cpp_extension.load = cpp_extension.load_inline = no_build

        import megaswift.ops
        for info in pkgutil.iter_modules(megaswift.ops.__path__):
            importlib.import_module('megaswift.ops.' + info.name)
        from megaswift.ops import cuda_ext
        assert cuda_ext._state is None, 'the loader ran at import time'
        assert 'megaswift._C' not in sys.modules and 'megaswift_C' not in sys.modules
        print('imports ok')
    ''')
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'imports ok' in proc.stdout
