"""megatron-core models built from HF configs: logits parity, weight round trips, packing, errors.

All cases run in two launches of ``dist_model_cases.py`` started together by one module fixture:
a plain ``python`` process (world size 1, no torchrun: TP=1) and one
``torchrun --nproc_per_node 2`` (TP=2, PP=2, TP=2+SP, DP=2, PP=2 x VPP=2). The megatron-core
CPU compatibility layer is applied only in those processes, never in pytest's.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mcore_tiny import build_all
from testing_utils import run_case_script

HERE = Path(__file__).resolve().parent
FAMILIES = ('llama_tied', 'llama_untied', 'qwen2', 'qwen3', 'mistral')
TOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp('mcore_models')
    build_all(root / 'hf')
    return run_case_script(HERE / 'dist_model_cases.py', root, root / 'hf' / 'manifest.json', timeout=400)


def _entries(results, case):
    if case not in results:
        load = results.get(case.rsplit('/', 1)[0] + '/load')
        detail = '\n'.join(e.get('traceback', e.get('error', '')) for e in load) if load else 'not run'
        pytest.fail(f'case {case} has no result: {detail}')
    entries = results[case]
    for e in entries:
        if 'error' in e:
            pytest.fail(f'{case}: {e["error"]}\n{e.get("traceback", "")}')
    return entries


def _values(results, case, key):
    vals = [e[key] for e in _entries(results, case) if key in e]
    assert vals, f'{case}: no rank reported {key!r}: {results[case]}'
    return vals


PARITY = ([f'tp1/{f}' for f in (*FAMILIES, 'qwen2_sharded')] + [f'tp2/{f}' for f in FAMILIES]
          + [f'pp2/{f}' for f in FAMILIES] + ['tp2sp/llama_tied', 'tp2sp/qwen3', 'pp2vpp2/llama_untied'])


@pytest.mark.parametrize('case', PARITY)
def test_logits_match_hf(results, case):
    for entry in _entries(results, f'{case}/parity'):
        if not entry:
            continue  # a pipeline stage without the output layer
        assert entry['max_abs_diff'] <= TOL, entry
        assert entry['ref_absmax'] > 0.1  # the comparison is not between near-zero logits
        assert entry['padded_vocab'] == 1024 and entry['padding_absmax'] == 0.0
    assert any(_entries(results, f'{case}/parity'))


ROUNDTRIP = ([f'tp1/{f}' for f in (*FAMILIES, 'qwen2_sharded')] + [f'tp2/{f}' for f in FAMILIES]
             + [f'pp2/{f}' for f in FAMILIES] + ['dp2/llama_tied', 'dp2/qwen3', 'pp2vpp2/llama_untied'])


@pytest.mark.parametrize('case', ROUNDTRIP)
def test_hf_roundtrip_is_exact_and_in_hf_order(results, case):
    rank0, *others = _entries(results, f'{case}/roundtrip')
    assert rank0['equal'], rank0
    assert rank0['order_ok'], rank0
    assert rank0['dtypes'] == ['torch.float32']
    assert all(e['count'] == 0 for e in others)  # only global rank 0 receives tensors


PACKED = ([f'tp1/{f}' for f in FAMILIES] + [f'tp2/{f}' for f in FAMILIES]
          + ['tp2sp/llama_tied', 'tp2sp/qwen3', 'pp2/llama_untied'])


@pytest.mark.parametrize('case', PACKED)
def test_packed_sequences_match_each_sequence_alone(results, case):
    entries = [e for e in _entries(results, f'{case}/packed') if e]
    assert entries
    for e in entries:
        assert e['vs_hf_alone'] <= TOL, e
        assert e.get('vs_mcore_alone', 0.0) <= TOL, e
        assert e['unmasked_diff'] > 1e-2, e  # the packing boundaries do change the result


def test_packed_also_matches_mcore_alone_at_tp1(results):
    assert all('vs_mcore_alone' in _entries(results, f'tp1/{f}/packed')[0] for f in FAMILIES)


def test_sequence_parallel_tags_norms(results):
    for case in ('tp2sp/llama_tied', 'tp2sp/qwen3'):
        assert all(e['tagged'] == [True] for e in _entries(results, f'{case}/sp_norms'))


GRADS = [f'tp1/{f}' for f in FAMILIES] + ['tp2/llama_tied', 'tp2/qwen3', 'tp2sp/llama_tied', 'tp2sp/qwen3']


@pytest.mark.parametrize('case', GRADS)
def test_gradients_match_hf(results, case):
    """Backward through mcore (DDP + finalize_model_grads), exported through the weight map."""
    rank0 = _entries(results, f'{case}/grads')[0]
    assert rank0['rel_diff'] <= 1e-5, rank0


def test_sequence_parallel_norm_grads_need_the_tag(results):
    rank0 = _entries(results, 'tp2sp/negative/untagged_norm_grads')[0]
    assert rank0['rel_diff'] > 1e-3, rank0


def test_wrong_qkv_interleave_breaks_parity(results):
    (entry,) = _entries(results, 'tp1/negative/wrong_qkv_interleave')
    assert entry['max_abs_diff'] > 0.1, entry


def _error(results, case):
    errs = [e for e in _entries(results, case) if e]
    assert errs and all(e['raised'] for e in errs), errs
    return errs[0]


def test_missing_tensor_is_named(results):
    e = _error(results, 'tp1/errors/missing_tensor')
    assert e['raised'] == 'WeightLoadError'
    assert "'model.layers.1.mlp.up_proj.weight'" in e['message'] and 'linear_fc1' in e['message']


def test_missing_shard_file_is_named(results):
    e = _error(results, 'tp1/errors/missing_shard')
    assert e['raised'] == 'WeightLoadError'
    assert 'shard file' in e['message'] and '.safetensors' in e['message'] and 'missing' in e['message']


def test_shape_mismatch_says_expected_and_found(results):
    e = _error(results, 'tp1/errors/shape_mismatch')
    assert e['raised'] == 'WeightLoadError'
    assert "'model.layers.0.mlp.gate_proj.weight'" in e['message']
    assert 'expected (256, 128), found (192, 128)' in e['message']


def test_tp_not_dividing_heads(results):
    e = _error(results, 'tp1/errors/tp_heads')
    assert e['raised'] == 'ParallelLayoutError'
    assert 'num_attention_heads (8)' in e['message'] and '--tensor_model_parallel_size (3)' in e['message']
    e = _error(results, 'tp2/errors/kv_heads')
    assert 'num_key_value_heads (1)' in e['message'] and '--tensor_model_parallel_size (2)' in e['message']


@pytest.mark.parametrize('lay, sizes, sp', [('tp2', [2, 1, 1, None], False), ('pp2', [1, 2, 1, None], False),
                                            ('tp2sp', [2, 1, 1, None], True), ('dp2', [1, 1, 2, None], False),
                                            ('pp2vpp2', [1, 2, 1, 2], False)])
def test_parallel_context_equals_megatron_state(results, lay, sizes, sp):
    """initialize_parallel's ParallelContext: every field as megatron-core's parallel_state says, on each rank."""
    entries = _entries(results, f'{lay}/context')
    assert len(entries) == 2
    for e in entries:
        assert e['mismatched'] == [] and e['sizes'] == sizes and e['sequence_parallel'] is sp, e


def test_world_size_not_divisible(results):
    e = _error(results, 'tp1/errors/world_size')
    assert e['raised'] == 'ParallelLayoutError'
    assert '1 process(es) cannot hold --tensor_model_parallel_size 2' in e['message']
