"""Session-wide fixtures: the real embedded SmolLM2 and tiny random-init models built offline."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/testing_utils.py

from testing_utils import build_tiny_model  # noqa: E402
SMOLLM2 = 'HuggingFaceTB/SmolLM2-135M-Instruct'


@pytest.fixture(scope='session')
def smollm2_dir() -> str:
    from megaswift.model import resolve_model_dir
    return resolve_model_dir(SMOLLM2)


@pytest.fixture(scope='session')
def tok(smollm2_dir):
    """SmolLM2's tokenizer (its chat template included)."""
    from megaswift.model import load_tokenizer
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope='session')
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> str:
    return build_tiny_model(tmp_path_factory.mktemp('tiny_llama'), 'llama', smollm2_dir)


@pytest.fixture(scope='session')
def tiny_qwen2_dir(tmp_path_factory, smollm2_dir) -> str:
    return build_tiny_model(tmp_path_factory.mktemp('tiny_qwen2'), 'qwen2', smollm2_dir)


@pytest.fixture(scope='session')
def run_cli():
    """Run ``python -m megaswift.cli.main ARGS`` in a subprocess; returns CompletedProcess."""
    import subprocess

    def _run(args, cwd=None, env=None, timeout=600, check=True):
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env['PYTHONPATH'] = str(REPO) + os.pathsep + full_env.get('PYTHONPATH', '')
        proc = subprocess.run([sys.executable, '-m', 'megaswift.cli.main', *map(str, args)], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f'megaswift {" ".join(map(str, args))} failed ({proc.returncode}):\n'
                                 f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
        return proc
    return _run


@pytest.fixture(scope='session')
def run_main():
    """``megaswift ARGS`` in this process, for runs that must fail before any model is built (a subprocess costs
    ~2-5 s of imports each): returns a CompletedProcess with the exit code and what was printed (log lines go to
    the handlers set up at the first run, not into it). The environment is restored afterwards, and a run that
    initialised a process group fails the test (the next in-process run would inherit it)."""
    import contextlib
    import io
    import subprocess

    import torch.distributed

    from megaswift.cli.main import main

    def _run(args, env=None):
        saved = dict(os.environ)
        os.environ.update(env or {})
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert not torch.distributed.is_initialized(), 'the run got as far as its process group'
        return subprocess.CompletedProcess(['megaswift', *map(str, args)], code, out.getvalue(), err.getvalue())
    return _run

