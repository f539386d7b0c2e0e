"""Tiny random HF checkpoints of every megatron family, shared by the pytest tests and dist_model_cases.py.

Norm weights and biases are randomised (HF initialises them to ones / zeros, which would hide a
swapped norm or a dropped bias from the parity checks). No tokenizer: vocab 1000 is not a
multiple of 128, so the megatron-core vocab padding (to 1024) is exercised.
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = 1000
_BASE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)

# name -> (model_type, overrides)
TINY = {
    'llama_tied': ('llama', dict(tie_word_embeddings=True, head_dim=32)),
    'llama_untied': ('llama', dict(num_hidden_layers=4,
                                   rope_parameters={'rope_type': 'default', 'rope_theta': 500000.0})),
    'qwen2': ('qwen2', dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2)),  # head_dim 32, 4 q/group
    'qwen3': ('qwen3', dict(head_dim=64, tie_word_embeddings=True)),  # 4 x 64 = 256 != hidden 128
    'mistral': ('mistral', dict(head_dim=32, sliding_window=6)),  # window shorter than the test sequences
}
SEQ = 16


def hf_classes(model_type: str):
    import transformers
    names = {'llama': 'Llama', 'qwen2': 'Qwen2', 'qwen3': 'Qwen3', 'mistral': 'Mistral'}[model_type]
    return getattr(transformers, names + 'Config'), getattr(transformers, names + 'ForCausalLM')


def make_tiny(out: Path, model_type: str, seed: int = 0, max_shard_size=None, **overrides) -> str:
    import torch
    cfg_cls, model_cls = hf_classes(model_type)
    kwargs = dict(_BASE)
    kwargs.update(overrides)
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if 'norm' in name else 0.0))
    extra = {'max_shard_size': max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **extra)
    return str(out)


def build_all(root: Path) -> dict:
    """Every TINY model (plus a sharded copy of one) under ``root``; returns and writes the manifest."""
    root = Path(root)
    manifest = {name: make_tiny(root / name, mt, seed=k, **ov) for k, (name, (mt, ov)) in enumerate(TINY.items())}
    mt, ov = TINY['qwen2']
    manifest['qwen2_sharded'] = make_tiny(root / 'qwen2_sharded', mt, seed=2, max_shard_size='200KB', **ov)
    (root / 'manifest.json').write_text(json.dumps(manifest))
    return manifest
