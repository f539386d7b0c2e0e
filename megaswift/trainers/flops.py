"""Model FLOPs of a training step and the model FLOPs utilisation (MFU) in the step logs.

Per trained token (forward + backward, as PaLM / Megatron-LM count it, without recomputation):

    6 * (parameters of the transformer layers + the LM head)  +  12 * layers * (heads * head_dim) * L

The first term is the matrix multiplications against the weights (2 FLOPs per multiply-add forward, 4 backward);
the embedding lookup is free, the LM head is a ``hidden x vocab`` GEMM. The second is the attention scores
``Q K^T`` and their product with ``V`` over a sequence of ``L`` tokens (causal masking not subtracted, the usual
convention; ``heads * head_dim`` is the hidden size for most models). For packed or padding-free rows the
attention only spans each sample, so ``L`` is the token-weighted mean sample length ``sum(s^2) / sum(s)``:
then ``tokens * per_token`` is exactly the step's total. Padding is not counted (only real tokens are).

MFU = achieved model FLOP/s per GPU / the GPU's peak dense FLOP/s for the training dtype (``PEAK_TFLOPS``,
by ``torch.cuda.get_device_name()``; ``MEGASWIFT_PEAK_TFLOPS`` overrides it). It is reported on CUDA only.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

logger = logging.getLogger(__name__)

PEAK_ENV = 'MEGASWIFT_PEAK_TFLOPS'

# Dense (no sparsity) peak TFLOP/s: (bf16/fp16, tf32, fp32). Matched in order as substrings of the lower-cased
# device name, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ('gb200', (2500.0, 1250.0, 80.0)),
    ('b200', (2250.0, 1100.0, 80.0)),
    ('h200 nvl', (835.0, 417.5, 60.0)),
    ('h100 nvl', (835.0, 417.5, 60.0)),
    ('h100 pcie', (756.0, 378.0, 51.0)),
    ('gh200', (989.0, 494.5, 67.0)),
    ('h200', (989.0, 494.5, 67.0)),
    ('h100', (989.0, 494.5, 67.0)),
    ('h800', (989.0, 494.5, 67.0)),
    ('h20', (148.0, 74.0, 44.0)),
    ('a100', (312.0, 156.0, 19.5)),
    ('a800', (312.0, 156.0, 19.5)),
    ('l40s', (362.0, 183.0, 91.6)),
    ('l40', (181.0, 90.5, 90.5)),
    ('a10g', (70.0, 35.0, 31.2)),  # AWS A10G: before 'a10'
    ('a10', (125.0, 62.5, 31.2)),
    ('l4', (121.0, 60.0, 30.3)),
    ('4090', (165.2, 82.6, 82.6)),
    ('v100', (125.0, 15.7, 15.7)),  # fp16 tensor cores; no bf16 / tf32
)


# ---------------------------------------------------------------------------------------------- FLOPs
def _get(cfg, *names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def transformer_layer_params(hf_config) -> int:
    """Parameters of one decoder layer of a Llama-style model (q/k/v/o, gated MLP, two norms; QKV bias for
    qwen2 or ``attention_bias``, q/k norm for qwen3)."""
    h = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    kv = int(_get(hf_config, 'num_key_value_heads', default=heads))
    hd = int(_get(hf_config, 'head_dim', default=h // heads))
    ffn = int(hf_config.intermediate_size)
    model_type = getattr(hf_config, 'model_type', '')
    qkv_bias = model_type == 'qwen2' or bool(getattr(hf_config, 'attention_bias', False))
    o_bias = bool(getattr(hf_config, 'attention_bias', False)) and model_type != 'qwen2'
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if qkv_bias:
        attn += heads * hd + 2 * kv * hd
    if o_bias:
        attn += h
    mlp = 3 * h * ffn + (2 * ffn + h if getattr(hf_config, 'mlp_bias', False) else 0)
    norms = 2 * h + (2 * hd if model_type == 'qwen3' else 0)
    return attn + mlp + norms


def dense_params(hf_config) -> int:
    """Parameters every token multiplies: the transformer layers, the final norm and the LM head (not the
    embedding table, a lookup; the head counts even when it is tied to the embedding)."""
    h, vocab = int(hf_config.hidden_size), int(hf_config.vocab_size)
    return int(hf_config.num_hidden_layers) * transformer_layer_params(hf_config) + h + vocab * h


def effective_seq_len(seq_lens: Iterable[int]) -> float:
    """The token-weighted mean sample length ``sum(s^2) / sum(s)`` (the length itself for one sample)."""
    lens = [int(s) for s in seq_lens]
    total = sum(lens)
    return sum(s * s for s in lens) / total if total else 0.0


def train_flops_per_token(hf_config, seq_lens) -> float:
    """Model FLOPs (forward + backward) per trained token for samples of lengths ``seq_lens`` (an int: one
    sequence length)."""
    lens = [int(seq_lens)] if isinstance(seq_lens, (int, float)) else list(seq_lens)
    heads = int(hf_config.num_attention_heads)
    attn_dim = heads * int(_get(hf_config, 'head_dim', default=int(hf_config.hidden_size) // heads))
    return 6.0 * dense_params(hf_config) + 12.0 * int(hf_config.num_hidden_layers) * attn_dim * effective_seq_len(lens)


def train_flops(hf_config, seq_lens) -> float:
    """Model FLOPs of one training pass over samples of lengths ``seq_lens``."""
    lens = [int(s) for s in seq_lens]
    return train_flops_per_token(hf_config, lens) * sum(lens) if lens else 0.0


# ---------------------------------------------------------------------------------------------- peak
def peak_flops(device_name: Optional[str] = None, dtype=None) -> Optional[float]:
    """Peak dense FLOP/s of one GPU: ``MEGASWIFT_PEAK_TFLOPS`` (TFLOP/s) when set, else the table entry for
    ``device_name`` (default: the current CUDA device) and ``dtype`` (bf16/fp16 unless float32: TF32 when
    ``torch.get_float32_matmul_precision()`` allows it); None for an unknown GPU."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f'{PEAK_ENV}={override!r}: expected a number of TFLOP/s') from None
        if value <= 0:
            raise ValueError(f'{PEAK_ENV}={override!r}: must be > 0')
        return value * 1e12
    import torch
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.lower()
    for key, (half, tf32, fp32) in PEAK_TFLOPS:
        if key in name:
            if dtype is None or dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (tf32 if torch.get_float32_matmul_precision() != 'highest' else fp32) * 1e12
    return None


class MfuMeter:
    """``mfu`` of a window of steps: ``sum(model FLOPs) / sum(seconds) / (GPUs * peak)``. Active on CUDA only
    (and for a known GPU or with ``MEGASWIFT_PEAK_TFLOPS``)."""

    def __init__(self, hf_config, device, dtype, num_gpus: int):
        self.hf_config, self.num_gpus = hf_config, max(int(num_gpus), 1)
        self.peak = None
        if getattr(device, 'type', str(device)) == 'cuda':
            self.peak = peak_flops(dtype=dtype)
            if self.peak is None:
                import torch
                logger.warning('mfu: unknown peak FLOP/s of %r; set %s (TFLOP/s per GPU) to log mfu',
                               torch.cuda.get_device_name(), PEAK_ENV)

    @property
    def active(self) -> bool:
        return self.peak is not None

    def step_flops(self, collator, step_items: list[int]) -> float:
        """Model FLOPs of a step's items (all DP ranks; real tokens of each sample, no padding)."""
        if not self.active:
            return 0.0
        lens = [int(collator.encoded.lengths[i]) for item in step_items for i in collator.items[item]]
        return train_flops(self.hf_config, lens)

    def mfu(self, flops: float, seconds: float) -> float:
        return flops / max(seconds, 1e-9) / (self.num_gpus * self.peak)


__all__ = ['PEAK_ENV', 'PEAK_TFLOPS', 'MfuMeter', 'dense_params', 'effective_seq_len', 'peak_flops', 'train_flops',
           'train_flops_per_token', 'transformer_layer_params']
