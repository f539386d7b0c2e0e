"""Load an HF causal LM and its tokenizer from anything ``resolve_model_dir`` accepts."""
from __future__ import annotations

import logging

from ..utils.errors import one_line
from .resolve import ModelFolderError, check_model_weights, read_model_config, resolve_model_dir

logger = logging.getLogger(__name__)

_DTYPES = {'float32': 'float32', 'fp32': 'float32', 'bfloat16': 'bfloat16', 'bf16': 'bfloat16',
           'float16': 'float16', 'fp16': 'float16'}


def parse_dtype(name: str | None, device: str = 'cpu'):
    """``auto`` picks bf16 where it is fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    import torch
    if name in (None, 'auto'):
        if device.startswith('cuda'):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown torch_dtype '{name}'; choose from auto, {', '.join(sorted(set(_DTYPES)))}")
    return getattr(torch, _DTYPES[name])


def _cpu_has_fast_bf16() -> bool:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def load_tokenizer(model: str, flag: str = '--model'):
    from transformers import AutoTokenizer
    model_dir = resolve_model_dir(model)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing or unreadable tokenizer files, a bad config
        raise ModelFolderError(f"{flag}: cannot load the tokenizer of model folder '{model_dir}' (tokenizer.json / "
                               f'tokenizer_config.json missing or unreadable?): {one_line(e)}') from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model: str, torch_dtype: str | None = 'auto', device: str | None = None):
    """Return ``(model, tokenizer, model_dir)`` with the model in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model_dir = resolve_model_dir(model)
    # one line naming the folder and what is wrong, before the weights are read (not transformers' OSError)
    config = read_model_config(model_dir)
    check_model_weights(model_dir)
    tok = load_tokenizer(model_dir)
    dtype = parse_dtype(torch_dtype, device)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    logger.info('loaded %s from %s (%s, %s)', model, model_dir, dtype, device)
    return lm, tok, model_dir
