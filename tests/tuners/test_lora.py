"""Tuners on megatron-core models: LoRA exact under TP / SP / PP, PEFT export, merge, freeze.

One ``torchrun --nproc_per_node 2`` launch of ``dist_lora_cases.py`` (module fixture) runs every
layout on a tiny random Llama (4 heads, 2 KV groups: the fused-QKV interleave is non-trivial);
the PEFT checks then run here, on rank 0's artifacts. The megatron-core CPU compatibility layer
is applied only in that subprocess, never in pytest's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from testing_utils import build_tiny_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOL = 1e-5
LAYOUTS = ('tp1', 'tp2', 'tp2sp')
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope='module')
def run(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp('tuners')
    hf_dir = build_tiny_model(root / 'hf', 'llama', smollm2_dir, num_attention_heads=4, num_key_value_heads=2)
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    out = root / 'results.json'
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
                           str(HERE / 'dist_lora_cases.py'), str(out), hf_dir],
                          env=env, cwd=root, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f'dist_lora_cases.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}')
    return SimpleNamespace(results=json.loads(out.read_text()), hf_dir=hf_dir, work=root / 'work')


def entries(run, case):
    assert case in run.results, f'case {case} did not run: {sorted(run.results)}'
    for e in run.results[case]:
        if 'error' in e:
            pytest.fail(f'{case}: {e["error"]}\n{e.get("traceback", "")}')
    return run.results[case]


@pytest.mark.slow
@pytest.mark.parametrize('lay', LAYOUTS)
def test_lora_forward_init_merge_and_tp_parity(run, lay):
    for e in entries(run, f'{lay}/lora'):
        assert e['init_vs_base'] == 0.0, e  # B = 0: step 0 is the base model
        assert e['init_a_diff'] == 0.0, e
        assert e['lora_vs_base'] > 0.1 and e['lora_absmax'] > 0.5, e  # the random adapter matters
        assert e['merged_vs_lora'] <= TOL, e
        assert e['lora_vs_tp1'] <= TOL and e['merged_vs_tp1'] <= TOL, e
        assert e['lora_left_after_merge'] == [] and e['class_after_merge'] == 'ColumnParallelLinear', e


@pytest.mark.slow
@pytest.mark.parametrize('lay', LAYOUTS)
def test_only_lora_params_train_and_get_gradients_equal_to_tp1(run, lay):
    rank0, *others = entries(run, f'{lay}/lora')
    for e in (rank0, *others):
        assert len(e['trainable']) == 2 * 4 * 2 and all('.lora_' in n for n in e['trainable']), e['trainable']
        assert e['only_lora_grads'], e
        assert e['replica_grad_diff'] == 0.0, e  # replicated A/B: the same gradient on every TP rank
    assert rank0['grads']['keys_equal'] and rank0['grads']['min_absmax'] > 1.0, rank0['grads']
    assert rank0['grads']['rel_diff'] <= TOL, rank0['grads']
    assert rank0['state_dict'] == {'keys_equal': True, 'rel_diff': 0.0, 'min_absmax': pytest.approx(
        rank0['state_dict']['min_absmax'])}
    assert rank0['hf_export_count'] > 0  # merged models export through iter_hf_weights again


@pytest.mark.slow
@pytest.mark.parametrize('case', ['tp2sp/ddp', 'pp2/ddp'])
def test_training_loop_path_ddp_schedule_and_finalize_grads(run, case):
    """mcore DDP (grad buffers over the LoRA params only) + pipeline schedule + finalize_model_grads."""
    rank0 = entries(run, case)[0]
    assert rank0['keys_equal'] and rank0['rel_diff'] <= TOL and rank0['min_absmax'] > 1.0, rank0


@pytest.mark.slow
def test_gradient_check_is_sensitive_to_a_missing_tp_reduction(run):
    rank0 = entries(run, 'tp2sp/negative/no_grad_allreduce')[0]
    assert rank0['rel_diff'] > 1e-2, rank0


@pytest.mark.slow
def test_recompute_with_frozen_embedding_still_trains_lora(run):
    rank0 = entries(run, 'tp1/recompute')[0]
    assert rank0['only_lora'] and rank0['rel_diff'] <= TOL, rank0
    assert rank0['without_hook_requires_grad'] is False  # what the embedding hook is there for


@pytest.mark.slow
@pytest.mark.parametrize('lay', LAYOUTS)
def test_dropout_on_the_lora_input_only_and_only_in_training(run, lay):
    for e in entries(run, f'{lay}/dropout'):
        assert e['b0_train_diff'] == 0.0, e  # with B = 0 dropout changes nothing: base path untouched
        assert e['train_vs_train'] > 1e-3 and 0.4 < e['zeros_frac'] < 0.6, e
        assert e['eval_vs_nodrop'] <= TOL, e
        if lay != 'tp2sp':  # under SP each rank holds other tokens
            assert e['tp_ranks_same_mask'] == 0.0, e


@pytest.mark.slow
def test_lora_survives_dist_checkpoint_across_layouts(run):
    rank0 = entries(run, 'tp2sp_to_tp1/checkpoint')[0]
    assert rank0['keys_equal'] and rank0['rel_diff'] == 0.0, rank0


def _adapter(run, lay):
    from safetensors.torch import load_file
    d = run.work / f'adapter_{lay}'
    return json.loads((d / 'adapter_config.json').read_text()), load_file(d / 'adapter_model.safetensors')


@pytest.mark.slow
def test_peft_adapter_format_and_layout_independence(run):
    entries(run, 'pp2/export')
    cfg, ref = _adapter(run, 'tp1')
    assert cfg['peft_type'] == 'LORA' and cfg['r'] == RANK and cfg['lora_alpha'] == ALPHA
    assert cfg['target_modules'] == sorted(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                            'down_proj'])
    assert len(ref) == 2 * 7 * 2
    assert ref['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'].shape == (RANK, 128)
    assert ref['base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight'].shape == (64, RANK)
    assert ref['base_model.model.model.layers.0.mlp.down_proj.lora_A.weight'].shape == (RANK, 256)
    assert torch.equal(ref['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'],
                       ref['base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight'])
    for lay in ('tp2', 'tp2sp', 'pp2'):
        got_cfg, got = _adapter(run, lay)
        assert got_cfg == cfg and set(got) == set(ref)
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) == 0.0, lay


@torch.no_grad()
def _hf_logits(model):
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    return model(ids).logits


@pytest.mark.slow
def test_peft_applies_the_adapter_like_the_merged_mcore_model(run):
    peft = pytest.importorskip('peft')
    from transformers import AutoModelForCausalLM
    merged = torch.load(run.work / 'merged_logits.pt')
    for lay in ('tp1', 'tp2sp'):
        hf = AutoModelForCausalLM.from_pretrained(run.hf_dir, dtype=torch.float32).eval()
        model = peft.PeftModel.from_pretrained(hf, str(run.work / f'adapter_{lay}')).eval()
        ref = _hf_logits(model)
        assert (merged[..., :ref.shape[-1]] - ref).abs().max().item() <= TOL, lay
        unloaded = model.merge_and_unload().state_dict()
        mcore_merged = torch.load(run.work / 'merged_hf.pt')
        assert max((mcore_merged[k] - unloaded[k]).abs().max().item() for k in mcore_merged) <= 1e-6


@pytest.mark.slow
def test_peft_formula_by_hand_matches_merged_mcore_weights(run):
    """delta_W = lora_alpha / r * B @ A on each HF module, from the safetensors alone (no peft)."""
    from safetensors.torch import load_file
    cfg, adapter = _adapter(run, 'tp2')
    base = load_file(Path(run.hf_dir) / 'model.safetensors')
    merged = torch.load(run.work / 'merged_hf.pt')
    prefix, changed = 'base_model.model.', 0
    for name, w in base.items():
        module = name[:-len('.weight')]
        a = adapter.get(f'{prefix}{module}.lora_A.weight')
        expect = w if a is None else w + cfg['lora_alpha'] / cfg['r'] * adapter[f'{prefix}{module}.lora_B.weight'] @ a
        changed += a is not None
        assert (merged[name] - expect).abs().max().item() <= 1e-6, name
    assert changed == 2 * 7


@pytest.mark.slow
def test_freeze_and_full_tuners(run):
    e = entries(run, 'tp1/freeze')[0]
    layer0 = [n for n in e['all'] if n.startswith('decoder.layers.0.')]
    assert 'embedding.word_embeddings.weight' not in e['full']
    assert [n for n in e['full'] if n.startswith('decoder.layers.0.')] == ['decoder.layers.0.mlp.linear_fc2.weight']
    assert len(e['full']) == len(e['all']) - 1 - len(layer0) + 1
    assert e['freeze_only_trainable'] == ['decoder.final_layernorm.weight',
                                          'decoder.layers.1.self_attention.linear_proj.weight',
                                          'decoder.layers.1.self_attention.linear_qkv.weight']
    assert e['freeze_regex'] == [n for n in e['all'] if 'linear_fc1' not in n and 'embedding' not in n]
    assert e['lora_plus'][0] == 'decoder.final_layernorm.weight' and len(e['lora_plus']) == 17
    assert all(('linear_qkv.lora' in n or 'linear_fc2.lora' in n) for n in e['lora_qv']) and len(e['lora_qv']) == 8
    assert 'needs --freeze_parameters' in e['err_freeze_nothing']
    assert '--freeze_parameters matches no parameter' in e['err_no_match']
    assert "unknown module 'c_attn'" in e['err_target']
    assert '--lora_rank must be >= 1' in e['err_rank']
    assert "unknown tuner 'adalora'" in e['err_tuner']


def test_target_modules_and_patterns_without_a_model():
    from megaswift.tuners import resolve_target_modules
    from megaswift.tuners.base import _matcher
    assert resolve_target_modules('all-linear') == ('linear_qkv', 'linear_proj', 'linear_fc1', 'linear_fc2')
    assert resolve_target_modules(['v_proj', 'gate_proj', 'q_proj']) == ('linear_qkv', 'linear_fc1')
    assert resolve_target_modules(['linear_fc2', 'o_proj']) == ('linear_proj', 'linear_fc2')
    match = _matcher(['decoder.layers.1', 'embedding.'], None, 'freeze_parameters')
    assert match('decoder.layers.1.mlp.linear_fc1.weight') and match('embedding.word_embeddings.weight')
    assert not match('decoder.layers.10.mlp.linear_fc1.weight')
    assert _matcher([], None, 'x') is None
    assert _matcher(None, r'fc\d', 'x')('decoder.layers.0.mlp.linear_fc2.weight')
