"""megaswift.trainers.flops: the per-token model FLOPs against real HF models' parameter counts, the peak-FLOP/s
table and its override, and the MFU meter (CUDA only). (The CPU training logs without ``mfu`` are checked in
test_train_nlg.py.)"""
from __future__ import annotations

import pytest
import torch

from megaswift.trainers.flops import (PEAK_ENV, MfuMeter, dense_params, effective_seq_len, peak_flops, train_flops,
                                      train_flops_per_token)

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def hf_model(family: str, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
    cfg_cls, model_cls = {'llama': (LlamaConfig, LlamaForCausalLM), 'qwen2': (Qwen2Config, Qwen2ForCausalLM),
                          'qwen3': (Qwen3Config, Qwen3ForCausalLM)}[family]
    cfg = cfg_cls(**{**SMALL, **overrides})
    return cfg, model_cls(cfg)


def non_embedding_params(model) -> int:
    """Every parameter but the input embedding table (named_parameters lists a tied head once, as embed_tokens)."""
    return sum(p.numel() for n, p in model.named_parameters() if 'embed_tokens' not in n)


@pytest.mark.parametrize('family, overrides', [
    ('llama', {'tie_word_embeddings': False}),
    ('llama', {'tie_word_embeddings': True, 'num_key_value_heads': 4}),
    ('llama', {'tie_word_embeddings': False, 'attention_bias': True, 'mlp_bias': True}),
    ('qwen2', {'tie_word_embeddings': False}),                      # q/k/v biases
    ('qwen3', {'tie_word_embeddings': True, 'head_dim': 32}),       # q/k norms, heads * head_dim != hidden
])
def test_flops_per_token_counts_the_real_models_parameters(family, overrides):
    cfg, model = hf_model(family, **overrides)
    head = cfg.vocab_size * cfg.hidden_size
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == overrides['tie_word_embeddings']
    expected_params = non_embedding_params(model) + (head if tied else 0)  # the head GEMM runs either way
    assert dense_params(cfg) == expected_params
    attn_dim = cfg.num_attention_heads * getattr(cfg, 'head_dim', cfg.hidden_size // cfg.num_attention_heads)
    for seq in (1, 100, 2048):
        want = 6 * expected_params + 12 * cfg.num_hidden_layers * attn_dim * seq
        assert train_flops_per_token(cfg, [seq]) == pytest.approx(want, rel=1e-12)
        assert train_flops_per_token(cfg, seq) == pytest.approx(want, rel=1e-12)


def test_packed_rows_use_the_token_weighted_mean_sample_length():
    cfg, _ = hf_model('llama')
    assert effective_seq_len([10, 30]) == (100 + 900) / 40
    assert effective_seq_len([]) == 0.0
    # a packed row of two samples costs what the two samples cost on their own (attention stays inside each)
    assert train_flops(cfg, [10, 30]) == pytest.approx(train_flops(cfg, [10]) + train_flops(cfg, [30]), rel=1e-12)
    assert train_flops(cfg, [10, 30]) < train_flops(cfg, [40])
    assert train_flops(cfg, []) == 0.0


@pytest.mark.parametrize('name, dtype, tf32, tflops', [
    ('NVIDIA H100 80GB HBM3', torch.bfloat16, False, 989.0),
    ('NVIDIA H200', torch.bfloat16, False, 989.0),
    ('NVIDIA H100 PCIe', torch.float16, False, 756.0),
    ('NVIDIA A100-SXM4-80GB', torch.bfloat16, False, 312.0),
    ('NVIDIA A100-SXM4-40GB', torch.float32, True, 156.0),   # TF32 tensor cores
    ('NVIDIA A100-SXM4-40GB', torch.float32, False, 19.5),   # plain fp32
    ('NVIDIA H100 80GB HBM3', torch.float32, True, 494.5),
    ('NVIDIA A10G', torch.bfloat16, False, 70.0),
    ('NVIDIA L40S', None, False, 362.0),
])
def test_peak_table(monkeypatch, name, dtype, tf32, tflops):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    try:
        assert peak_flops(name, dtype) == pytest.approx(tflops * 1e12)
    finally:
        torch.set_float32_matmul_precision(before)


def test_peak_unknown_and_override(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_flops('Some Future GPU', torch.bfloat16) is None
    if not torch.cuda.is_available():
        assert peak_flops(None, torch.bfloat16) is None  # no GPU: nothing to look up
    monkeypatch.setenv(PEAK_ENV, '123.5')
    assert peak_flops('Some Future GPU', torch.bfloat16) == pytest.approx(123.5e12)
    assert peak_flops('NVIDIA H100 80GB HBM3', torch.bfloat16) == pytest.approx(123.5e12)  # the override wins
    for bad in ('fast', '0', '-3'):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ValueError, match=PEAK_ENV):
            peak_flops('NVIDIA H100 80GB HBM3', torch.bfloat16)


class _Encoded:
    def __init__(self, lengths):
        self.lengths = lengths


class _Collator:
    def __init__(self, lengths, items):
        self.encoded, self.items = _Encoded(lengths), items


def test_mfu_meter_is_cuda_only(monkeypatch):
    cfg, _ = hf_model('llama')
    monkeypatch.setenv(PEAK_ENV, '100')
    cpu = MfuMeter(cfg, torch.device('cpu'), torch.float32, 2)
    assert not cpu.active and cpu.step_flops(_Collator([5], [[0]]), [0]) == 0.0
    gpu = MfuMeter(cfg, torch.device('cuda'), torch.bfloat16, 2)  # the override: no device query
    assert gpu.active
    collator = _Collator([10, 30, 7], [[0, 1], [2]])  # item 0 is a packed row of samples 0 and 1
    flops = gpu.step_flops(collator, [0, 1, 0])
    assert flops == pytest.approx(train_flops(cfg, [10, 30, 7, 10, 30]), rel=1e-12)
    assert gpu.mfu(flops, 0.5) == pytest.approx(flops / 0.5 / (2 * 100e12))
