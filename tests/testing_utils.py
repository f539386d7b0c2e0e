"""Helpers shared by test modules (importable by name; conftest.py files are not, there are several)."""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


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


def run_case_script(script: Path, root: Path, setup_file: Path, timeout: float = 420,
                    env_per_world: dict[int, dict] | None = None) -> dict:
    """Run a distributed case script once per world size, concurrently, and merge their JSON results.

    World size 1 runs as a plain process and world size 2 under torchrun (gloo); each writes
    ``root/world{N}.json``. megatron-core cases run in subprocesses because the CPU compatibility
    layer is process-wide. A failed launch fails the test with the end of its output.
    """
    import os
    import subprocess
    import sys

    import pytest
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'NPROC_PER_NODE')}
    env['PYTHONPATH'] = str(repo) + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    cmds = {1: [sys.executable, str(script)],
            2: [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', str(script)]}
    procs = {w: subprocess.Popen([*cmd, str(root / f'world{w}.json'), str(setup_file)],
                                 env={**env, **(env_per_world or {}).get(w, {})}, cwd=root,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for w, cmd in cmds.items()}
    merged = {}
    for w, proc in procs.items():
        out, _ = proc.communicate(timeout=timeout)
        path = root / f'world{w}.json'
        if proc.returncode != 0 or not path.exists():
            pytest.fail(f'world size {w} run failed ({proc.returncode}):\n{out[-8000:]}')
        merged.update(json.loads(path.read_text()))
    return merged


def write_case_results(results: dict, out_path) -> None:
    """Gather every rank's ``{case: entry}`` and write ``{case: [entry of rank 0, rank 1, ...]}`` from rank 0."""
    import torch.distributed as dist
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {case: [g.get(case, {}) for g in gathered] for case in sorted({c for g in gathered for c in g})}
        Path(out_path).write_text(json.dumps(merged, indent=1))


def template_in_mode(tokenizer, mode: str, **kwargs):
    """``get_template(tokenizer, **kwargs)`` set to ``mode`` ('train', 'infer', 'rlhf', 'kto')."""
    from megaswift.template import get_template
    template = get_template(tokenizer, **kwargs)
    template.set_mode(mode)
    return template


def start_rollout_server(model_dir: str, log_path: Path, *flags: str, env: dict | None = None):
    """``megaswift rollout --model model_dir --port 0 --torch_dtype float32 FLAGS`` in a process of its own; returns
    ``(process, url)`` once it listens (its stderr goes to ``log_path``). The caller kills it."""
    import os
    import subprocess
    import sys

    import pytest
    repo = Path(__file__).resolve().parents[1]
    env = env or dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get('PYTHONPATH', '')]),
                      PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    with open(log_path, 'w') as err:
        proc = subprocess.Popen([sys.executable, '-m', 'megaswift.cli.main', 'rollout', '--model', model_dir,
                                 '--port', '0', '--torch_dtype', 'float32', *flags],
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    if ' at http://' not in line:
        proc.kill()
        pytest.fail(f'megaswift rollout did not start: {line!r}\n{Path(log_path).read_text()[-4000:]}')
    return proc, line.split(' at ')[1].strip()
