"""Pure-tensor checks of the weight maps, registry and parallel-config validation (no process groups)."""
from __future__ import annotations

import pytest
import torch

from megaswift.megatron import weights as W
from megaswift.megatron.layout import ParallelLayoutError, validate_layout
from megaswift.megatron.model import UnsupportedModelError, get_model_family, model_families
from megaswift.megatron.parallel import ParallelConfig


def _ctx(heads=4, groups=2, d=2, vocab=10, padded=16):
    return W.WeightContext(heads, groups, d, vocab, padded)


def test_qkv_layout_is_grouped_per_kv_head():
    ctx = _ctx()
    # one row per head (head_dim 2 -> two rows), labelled by head: q0..q3, k0..k1, v0..v1
    q = torch.arange(4).repeat_interleave(2).float().unsqueeze(1)
    k = 10 + torch.arange(2).repeat_interleave(2).float().unsqueeze(1)
    v = 20 + torch.arange(2).repeat_interleave(2).float().unsqueeze(1)
    fused = W.fuse_qkv(q, k, v, ctx)
    heads = fused[::2, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]  # [q of group 0, k0, v0 | q of group 1, k1, v1]
    assert all(torch.equal(a, b) for a, b in zip(W.split_qkv(fused, ctx), (q, k, v)))
    bias = W.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], ctx)  # 1-D biases use the same layout
    assert torch.equal(bias, fused[:, 0])


@pytest.mark.parametrize('mode', [None, 'col', 'row', 'vocab', 'gate_up'])
def test_shard_unshard_round_trip(mode):
    full = torch.randn(8, 6)
    parts = [W.shard(full, mode, r, 2) for r in range(2)]
    assert torch.equal(W.unshard(parts, mode), full)


def test_gate_up_shards_hold_their_half_of_each():
    gate, up = torch.arange(4.).unsqueeze(1), 10 + torch.arange(4.).unsqueeze(1)
    fc1 = torch.cat([gate, up])
    assert W.shard(fc1, 'gate_up', 1, 2)[:, 0].tolist() == [2, 3, 12, 13]


def test_vocab_padding():
    assert W.padded_vocab_size(1000, 1) == 1024
    assert W.padded_vocab_size(1000, 4) == 1024
    assert W.padded_vocab_size(151936, 1) == 151936
    assert W.padded_vocab_size(151936, 8) == 152576  # 149 x (128 x 8)
    assert W.padded_vocab_size(49152, 2) == 49152
    ctx = _ctx()
    rule = W.WeightRule('embedding.word_embeddings.weight', ('model.embed_tokens.weight',), tp='vocab')
    emb = torch.randn(10, 3)
    padded = W.to_mcore(rule, [emb], ctx)
    assert padded.shape == (16, 3) and torch.equal(padded[10:], torch.zeros(6, 3))
    assert torch.equal(W.to_hf(rule, padded, ctx)[0], emb)


def test_weight_map_matches_local_and_te_names():
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    wmap = get_model_family(cfg).weight_map(cfg)
    rule, layer = wmap.match('decoder.layers.1.self_attention.linear_qkv.layer_norm_weight')
    assert rule.mcore == 'decoder.layers.{i}.input_layernorm.weight' and layer == 1
    assert wmap.match('decoder.layers.0.mlp.linear_fc1.layer_norm_weight')[0].hf == (
        'model.layers.{i}.post_attention_layernorm.weight',)
    rule, _ = wmap.match('decoder.layers.0.self_attention.linear_qkv.bias')
    assert rule.hf_names(0) == [f'model.layers.0.self_attn.{p}_proj.bias' for p in 'qkv']
    assert wmap.match('decoder.layers.0.self_attention.q_layernorm.weight') == (None, None)  # qwen2: no q norm
    names = ['lm_head.weight', 'model.layers.0.self_attn.k_proj.bias', 'model.norm.weight',
             'model.layers.0.self_attn.q_proj.bias', 'model.layers.0.self_attn.q_proj.weight',
             'model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
    assert sorted(names, key=wmap.hf_sort_key)[:3] == ['model.embed_tokens.weight', 'model.norm.weight',
                                                       'lm_head.weight']
    assert sorted(names, key=wmap.hf_sort_key)[3:] == [
        'model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.q_proj.bias',
        'model.layers.0.self_attn.k_proj.bias', 'model.layers.0.input_layernorm.weight']


def test_tied_output_layer_is_loaded_from_embedding_and_not_exported():
    rules = W.standard_rules(tie_word_embeddings=True)
    (out,) = [r for r in rules if r.mcore == 'output_layer.weight']
    assert out.hf == ('model.embed_tokens.weight',) and not out.export


def test_unsupported_model_type_lists_supported():
    from transformers import GPT2Config
    with pytest.raises(UnsupportedModelError) as e:
        get_model_family(GPT2Config())
    assert "'gpt2'" in str(e.value)
    for name in ('llama', 'mistral', 'qwen2', 'qwen3'):
        assert name in model_families and name in str(e.value)


def test_layout_validation_names_field_and_sizes():
    from transformers import LlamaConfig
    cfg = LlamaConfig(num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, hidden_size=256,
                      intermediate_size=512)
    validate_layout(2, 3, hf_config=cfg)
    with pytest.raises(ParallelLayoutError, match=r'num_key_value_heads \(2\) is not divisible by '
                                                  r'--tensor_model_parallel_size \(4\)'):
        validate_layout(4, 1, hf_config=cfg)
    with pytest.raises(ParallelLayoutError, match=r'num_hidden_layers \(6\) is not divisible by '
                                                  r'--pipeline_model_parallel_size \(2\) x '
                                                  r'--virtual_pipeline_model_parallel_size \(2\) = 4'):
        validate_layout(1, 2, 2, hf_config=cfg)


def test_parallel_config_validation():
    with pytest.raises(ValueError, match='--tensor_model_parallel_size'):
        ParallelConfig(tensor_model_parallel_size=0)
    with pytest.raises(ValueError, match='--pipeline_model_parallel_size >= 2'):
        ParallelConfig(virtual_pipeline_model_parallel_size=2)
    assert ParallelConfig(sequence_parallel=True).sequence_parallel is False  # needs TP > 1


def test_config_features_that_cannot_be_mapped_are_refused():
    from transformers import LlamaConfig, Qwen2Config
    from megaswift.megatron.model.registry import gpt_model_kwargs
    with pytest.raises(UnsupportedModelError, match='attention_bias'):
        get_model_family(LlamaConfig(attention_bias=True)).transformer_config_kwargs(LlamaConfig(attention_bias=True))
    with pytest.raises(UnsupportedModelError, match='rope_type'):
        gpt_model_kwargs(LlamaConfig(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}))
    mixed = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if len(set(mixed.layer_types)) > 1:
        with pytest.raises(UnsupportedModelError, match='sliding-window'):
            get_model_family(mixed).transformer_config_kwargs(mixed)
