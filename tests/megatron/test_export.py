"""megaswift export and the mcore checkpoint helpers: layout changes, HF round trips, precision, bad input.

Distributed cases run in one torchrun launch (``dist_export_cases.py``); CLI cases in subprocesses,
so megatron-core's process-wide CPU layer never enters the pytest process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testing_utils import build_tiny_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PRECISION_RE = re.compile(r'\[test_convert_precision\] dtype=(\S+) weights=\S+ batch=(\S+) max_abs_logit_diff=(\S+) '
                          r'mean_abs_logit_diff=(\S+) hf_loss=(\S+) mcore_loss=(\S+) loss_diff=(\S+)')


def precision_numbers(text: str) -> list[dict]:
    return [{'dtype': m[0], 'max': float(m[2]), 'mean': float(m[3]), 'hf_loss': float(m[4]), 'loss_diff': float(m[6])}
            for m in PRECISION_RE.findall(text)]


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if 'megaswift export: error:' in line]


def assert_clean_failure(proc, out_dir: Path, *needles: str) -> str:
    """Non-zero exit, one error line naming what is wrong, no traceback, and no output directory."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert len(set(lines)) == 1, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f'.{out_dir.name}.')]
    return lines[0]


@pytest.fixture(scope='module')
def tiny_qwen2(tmp_path_factory, smollm2_dir) -> str:
    """4 layers (PP2 x VPP2), 2 KV heads (TP2), QKV bias, tied embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp('q2') / 'tiny-qwen2', 'qwen2', smollm2_dir, seed=3,
                            num_hidden_layers=4, num_key_value_heads=2)


@pytest.fixture(scope='module')
def tiny_llama2kv(tmp_path_factory, smollm2_dir) -> str:
    return build_tiny_model(tmp_path_factory.mktemp('l2') / 'tiny-llama', 'llama', smollm2_dir, seed=5,
                            num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope='module')
def dist_results(tiny_qwen2, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp('dist_export')
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                           str(HERE / 'dist_export_cases.py'), tiny_qwen2, str(work)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((work / 'results.json').read_text())


def test_tp2_checkpoint_loads_at_other_layouts_with_identical_loss(dist_results):
    losses = dist_results['losses']
    ref = losses['tp2_from_hf']
    assert abs(ref - losses['hf']) < 1e-5, losses
    for name in ('tp1_dp2', 'pp2', 'pp2_vpp2', 'tp2', 'tp2_from_pp2', 'tp2_from_train_iter7'):
        assert abs(losses[name] - ref) < 1e-5, (name, losses)
        # the random init before loading was different: the load really replaced the weights
        if f'{name}_before_load' in losses:
            assert abs(losses[f'{name}_before_load'] - ref) > 1e-3, (name, losses)
    assert losses['pp2'] == losses['tp1_dp2'] == losses['pp2_vpp2']  # same arithmetic: bitwise equal
    assert dist_results['meta_layout']['tensor_model_parallel_size'] == 2
    assert dist_results['export_tp2_names_equal'] and dist_results['export_tp2_tensors_equal']


def test_training_style_iterations(dist_results):
    listing = dist_results['train_dir']
    assert {'iter_0000003', 'iter_0000007', 'latest_checkpointed_iteration.txt', 'megaswift_meta.json',
            'config.json', 'tokenizer.json'} <= set(listing), listing
    assert not [n for n in listing if n.startswith('.')], listing
    assert dist_results['train_tracker'] == '7' and dist_results['train_meta_iteration'] == 'iter_0000007'


def test_missing_checkpoint_fails_on_every_rank(dist_results):
    errors = dist_results['errors']
    assert {'missing_rank0', 'missing_rank1'} <= set(errors)
    assert errors['missing_rank0'] == errors['missing_rank1']
    assert 'does_not_exist' in errors['missing_rank0'] and 'does not exist' in errors['missing_rank0']


def test_failed_save_fails_every_rank_and_leaves_nothing(dist_results):
    errors = dist_results['errors']
    assert errors['failed_save_rank0'].startswith('FileNotFoundError')
    assert 'no_such_hf_dir' in errors['failed_save_rank0']
    assert errors['failed_save_rank1'].startswith('CheckpointError') and 'failed on another rank' in \
        errors['failed_save_rank1']
    assert dist_results['failed_save_leftovers'] == []


def _load_hf(path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_hf_model(original: str, converted: str):
    import torch
    a, b = _load_hf(original), _load_hf(converted)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.tensor([[1, 5, 42, 7, 99, 3, 1000, 2]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_cli_roundtrip_tp2_relaunch_and_sharded_export(run_cli, tiny_llama2kv, tmp_path):
    """NPROC_PER_NODE=2 -> torchrun relaunch, TP2 save; single-process TP1 load -> 3 HF shards + index."""
    mcore, hf = tmp_path / 'llama-mcore', tmp_path / 'llama-hf'
    proc = run_cli(['export', '--model', tiny_llama2kv, '--to_mcore', 'true', '--tensor_model_parallel_size', '2',
                    '--output_dir', mcore, '--test_convert_precision', 'true'], env={'NPROC_PER_NODE': '2'})
    (numbers,) = precision_numbers(proc.stdout)
    assert numbers['dtype'] == 'float32' and numbers['max'] < 1e-4 and numbers['loss_diff'] < 1e-5, numbers
    meta = json.loads((mcore / 'megaswift_meta.json').read_text())
    assert meta['layout']['tensor_model_parallel_size'] == 2 and meta['layout']['world_size'] == 2
    assert (mcore / 'latest_checkpointed_iteration.txt').read_text() == 'release'
    assert (mcore / 'tokenizer.json').is_file() and (mcore / 'config.json').is_file()
    assert not list((mcore).glob('*.safetensors'))
    run_cli(['export', '--mcore_model', mcore, '--to_hf', 'true', '--output_dir', hf, '--max_shard_size', '12MB'])
    index = json.loads((hf / 'model.safetensors.index.json').read_text())
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) >= 2, shards
    for s in shards:  # at most 12 MB, unless one tensor alone is bigger (as save_pretrained does)
        names = [k for k, v in index['weight_map'].items() if v == s]
        assert (hf / s).stat().st_size <= 12e6 + 1e5 or len(names) == 1, (s, names)
    assert {'config.json', 'generation_config.json', 'tokenizer.json'} <= {p.name for p in hf.iterdir()}
    assert not [p for p in hf.iterdir() if p.name.startswith('.')]
    _assert_same_hf_model(tiny_llama2kv, hf)


@pytest.fixture(scope='module')
def qwen2_mcore(tiny_qwen2, tmp_path_factory) -> tuple[Path, str]:
    """tiny_qwen2 converted by the CLI (with --test_convert_precision): (checkpoint dir, stdout)."""
    out = tmp_path_factory.mktemp('qm') / 'ckpt'
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', 'megaswift.cli.main', 'export', '--model', tiny_qwen2, '--to_mcore',
                           'true', '--output_dir', str(out), '--test_convert_precision', 'true'],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_cli_roundtrip_qwen2_with_precision_both_ways(run_cli, tiny_qwen2, qwen2_mcore, tmp_path):
    mcore, out = qwen2_mcore
    hf = tmp_path / 'q-hf'
    out += run_cli(['export', '--mcore_model', mcore, '--to_hf', 'true', '--output_dir', hf,
                    '--test_convert_precision', 'true']).stdout
    numbers = precision_numbers(out)
    assert len(numbers) == 2, out
    for n in numbers:
        assert n['max'] < 1e-4 and n['mean'] < 1e-5 and n['loss_diff'] < 1e-5, n
    assert (hf / 'model.safetensors').is_file() and not (hf / 'model.safetensors.index.json').exists()
    _assert_same_hf_model(tiny_qwen2, hf)
    # --exist_ok replaces a finished output only after the new one is complete
    proc = run_cli(['export', '--mcore_model', mcore, '--to_hf', 'true', '--output_dir', hf], check=False)
    assert proc.returncode == 2 and '--exist_ok' in proc.stderr


# ---- bad input: one clear line, non-zero exit, nothing that looks complete -----------------------

def test_unsupported_architecture(run_main, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    src = tmp_path / 'gpt2'
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(src)
    out = tmp_path / 'out'
    proc = run_main(['export', '--model', src, '--to_mcore', 'true', '--output_dir', out])
    assert_clean_failure(proc, out, 'gpt2')


def test_tp_size_not_dividing_heads(run_main, tiny_llama2kv, tmp_path):
    out = tmp_path / 'out'
    proc = run_main(['export', '--model', tiny_llama2kv, '--to_mcore', 'true', '--output_dir', out,
                     '--tensor_model_parallel_size', '4'])
    assert_clean_failure(proc, out, 'num_attention_heads (2)', '--tensor_model_parallel_size (4)')


def test_missing_safetensors_shard(run_main, tiny_qwen2, tmp_path):
    src = tmp_path / 'sharded'
    shutil.copytree(tiny_qwen2, src)
    for p in src.glob('*.safetensors*'):
        p.unlink()
    _load_hf(tiny_qwen2).save_pretrained(src, max_shard_size='10MB')
    index = json.loads((src / 'model.safetensors.index.json').read_text())
    victim = sorted(set(index['weight_map'].values()))[-1]
    (src / victim).unlink()
    out = tmp_path / 'out'
    proc = run_main(['export', '--model', src, '--to_mcore', 'true', '--output_dir', out])
    assert_clean_failure(proc, out, victim, 'missing')


def test_truncated_mcore_checkpoint(run_cli, qwen2_mcore, tmp_path):
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(qwen2_mcore[0], ckpt)
    victim = sorted((ckpt / 'release').glob('*.distcp'))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = tmp_path / 'out'
    proc = run_cli(['export', '--mcore_model', ckpt, '--to_hf', 'true', '--output_dir', out], check=False)
    line = assert_clean_failure(proc, out, victim.name, 'truncated')
    assert re.search(r"tensor '[\w.]+'", line), line


def test_checkpoint_file_checks(qwen2_mcore, tmp_path):
    """Cheap in-process checks of the validation helpers (no process group needed)."""
    from megaswift.megatron.checkpoint import (CheckpointError, read_meta, resolve_checkpoint_dir,
                                               verify_checkpoint_files)
    ckpt = tmp_path / 'ckpt'
    shutil.copytree(qwen2_mcore[0], ckpt)
    verify_checkpoint_files(resolve_checkpoint_dir(ckpt))
    assert read_meta(ckpt)['dtype'] == 'float32'
    (ckpt / 'release' / 'common.pt').unlink()
    with pytest.raises(CheckpointError, match="'common.pt' is missing"):
        verify_checkpoint_files(resolve_checkpoint_dir(ckpt))
    (ckpt / 'latest_checkpointed_iteration.txt').unlink()
    with pytest.raises(CheckpointError, match='latest_checkpointed_iteration.txt is missing'):
        resolve_checkpoint_dir(ckpt)
    (ckpt / 'megaswift_meta.json').write_text('{"hf_config": {}')
    with pytest.raises(CheckpointError, match='megaswift_meta.json.* is corrupt'):
        read_meta(ckpt)


def test_streaming_safetensors_writer(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megaswift.export.hf_writer import ShardedSafetensorsWriter
    g = torch.Generator().manual_seed(0)
    tensors = {'a.weight': torch.randn(40, 30, generator=g), 'b.bias': torch.randn(7, generator=g).bfloat16(),
               'c.ids': torch.arange(5), 'd.scalar': torch.tensor(3.5), 'e.empty': torch.zeros(0, 4),
               'f.mask': torch.tensor([True, False])}
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=4000, header_reserve=160)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) >= 3  # a.weight alone is 4800 bytes; the 160-byte header room splits the rest
    index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
    assert index['metadata']['total_size'] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
        with safe_open(str(tmp_path / f), framework='pt') as h:
            assert h.metadata() == {'format': 'pt'}
    assert sorted(loaded) == sorted(tensors) == sorted(index['weight_map'])
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    with pytest.raises(ValueError, match="'a.weight' was produced twice"):
        writer.add('a.weight', tensors['a.weight'])


def test_arguments_validation(tmp_path, tiny_llama2kv):
    from megaswift.arguments.base import ArgumentError
    from megaswift.arguments.export import ExportArguments, parse_size
    assert parse_size('5GB') == 5 * 10**9 and parse_size('2GiB') == 2 * 2**30 and parse_size('300kb') == 300_000
    with pytest.raises(ArgumentError, match='max_shard_size'):
        parse_size('lots')
    with pytest.raises(ArgumentError, match='exactly one of --to_mcore'):
        ExportArguments(model=tiny_llama2kv)
    with pytest.raises(ArgumentError, match='exactly one of --to_mcore'):
        ExportArguments(model=tiny_llama2kv, to_mcore=True, to_hf=True)
    with pytest.raises(ArgumentError, match='--to_hf needs --mcore_model'):
        ExportArguments(to_hf=True)
    with pytest.raises(ArgumentError, match='--mcore_model: .* does not exist'):
        ExportArguments(to_hf=True, mcore_model=str(tmp_path / 'nope'))
    (tmp_path / 'taken').mkdir()
    with pytest.raises(ArgumentError, match='already exists; pass --exist_ok true'):
        ExportArguments(model=tiny_llama2kv, to_mcore=True, output_dir=str(tmp_path / 'taken'))
    args = ExportArguments(model=tiny_llama2kv, to_mcore=True, output_dir=str(tmp_path / 'taken'), exist_ok=True)
    assert args.max_shard_bytes == 5 * 10**9
    assert ExportArguments(model=tiny_llama2kv, to_mcore=True).output_dir == 'tiny-llama-mcore'
    assert ExportArguments(mcore_model=str(tmp_path / 'taken'), to_hf=True).output_dir == str(tmp_path / 'taken-hf')


@pytest.mark.slow
def test_smollm2_to_mcore_precision(run_cli, smollm2_dir, tmp_path):
    """The real embedded model, named by its hub id (resolved offline like any --model)."""
    out = tmp_path / 'smollm2-mcore'
    proc = run_cli(['export', '--model', 'HuggingFaceTB/SmolLM2-135M-Instruct', '--to_mcore', 'true',
                    '--output_dir', out,
                    '--torch_dtype', 'float32', '--test_convert_precision', 'true'])
    (numbers,) = precision_numbers(proc.stdout)
    assert numbers['max'] < 1e-3 and numbers['mean'] < 1e-4 and numbers['loss_diff'] < 1e-4, numbers
    assert (out / 'release' / 'metadata.json').is_file()
