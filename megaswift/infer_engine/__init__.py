"""Generation backends behind one interface, and their registry.

Every engine is built as ``cls(model=..., torch_dtype=..., **engine_kwargs)`` and serves
``infer(requests, request_config) -> responses``. Optional backends import their package
only when built, so the registry itself needs none of them.
"""
from __future__ import annotations

from ..utils.registry import Registry
from .base import InferEngine
from .client_engine import ClientEngine
from .lmdeploy_engine import LmdeployEngine
from .protocol import (ChatCompletionChoice, ChatCompletionResponse, ChatMessage, InferRequest, RequestConfig,
                       UsageInfo)
from .sglang_engine import SglangEngine
from .transformers_engine import TransformersEngine
from .vllm_engine import VllmEngine

infer_engines = Registry('engine', {
    'transformers': TransformersEngine,
    'vllm': VllmEngine,
    'sglang': SglangEngine,
    'lmdeploy': LmdeployEngine,
    'client': ClientEngine,
})
ENGINE_ALIASES = {'pt': 'transformers'}  # ms-swift 3.x name


def canonical_engine_name(name: str) -> str:
    """The registered name for ``name`` (aliases resolved); an unknown one raises UnknownPluginError (a ValueError)."""
    name = ENGINE_ALIASES.get(name, name)
    infer_engines.lookup(name)
    return name


def get_infer_engine(name: str, model: str | None, torch_dtype: str | None = 'auto', **engine_kwargs) -> InferEngine:
    if 'torch_dtype' in engine_kwargs or 'dtype' in engine_kwargs:
        raise ValueError('set the dtype with --torch_dtype, not inside --engine_kwargs')
    return infer_engines[canonical_engine_name(name)](model=model, torch_dtype=torch_dtype, **engine_kwargs)


__all__ = ['InferEngine', 'InferRequest', 'RequestConfig', 'ChatCompletionResponse', 'ChatCompletionChoice',
           'ChatMessage', 'UsageInfo', 'infer_engines', 'ENGINE_ALIASES', 'canonical_engine_name', 'get_infer_engine',
           'TransformersEngine', 'ClientEngine', 'VllmEngine', 'SglangEngine', 'LmdeployEngine']
