"""Session-wide fixtures: the real embedded SmolLM2 and tiny random-init models built offline."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = 'HuggingFaceTB/SmolLM2-135M-Instruct'


@pytest.fixture(scope='session')
def smollm2_dir() -> str:
    from megaswift.model import resolve_model_dir
    return resolve_model_dir(SMOLLM2)


def build_tiny_model(out: Path, family: str, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    """A random-init HF model of ``family`` (llama | qwen2 | qwen3) with SmolLM2's real tokenizer.

    head_dim is 64 so that vLLM's CPU attention accepts it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    common.update(overrides)
    if family == 'llama':
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif family == 'qwen2':
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif family == 'qwen3':
        from transformers import Qwen3Config, Qwen3ForCausalLM
        cfg, cls = Qwen3Config(head_dim=64, **common), Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope='session')
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> str:
    return build_tiny_model(tmp_path_factory.mktemp('tiny_llama'), 'llama', smollm2_dir)


@pytest.fixture(scope='session')
def tiny_qwen2_dir(tmp_path_factory, smollm2_dir) -> str:
    return build_tiny_model(tmp_path_factory.mktemp('tiny_qwen2'), 'qwen2', smollm2_dir)


@pytest.fixture
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
