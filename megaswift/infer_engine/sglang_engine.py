"""SGLang offline engine (``sglang.Engine``). GPU only: SGLang's wheels pin CUDA builds of torch.

The chat template is applied here with the model's HF tokenizer (tools included), and the
rendered prompts go to ``Engine.generate(prompt=[...], sampling_params={..., 'n': n})`` in one
batch. With ``n > 1`` SGLang first caches each prompt's prefix, then fans out ``n`` samples;
the returned list is prompt-major (prompt 0's ``n`` samples, then prompt 1's, ...).
"""
from __future__ import annotations

import logging
from typing import Any

from .base import InferEngine, require_package
from .protocol import (ChatCompletionChoice, ChatCompletionResponse, ChatMessage, InferRequest, RequestConfig,
                       UsageInfo)

logger = logging.getLogger(__name__)


def _finish_reason(meta: dict[str, Any]) -> str | None:
    fr = meta.get('finish_reason')
    if isinstance(fr, dict):  # {'type': 'stop' | 'length' | 'abort', 'matched': ...}
        return fr.get('type')
    return fr


class SglangEngine(InferEngine):
    def __init__(self, model: str, torch_dtype: Any = 'auto', max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 seed: int | None = None, **engine_kwargs):
        sglang = require_package('sglang', 'sglang', 'sglang')
        from transformers import AutoTokenizer

        from megaswift.model import resolve_model_dir

        self.model_name = model
        self.model_dir = resolve_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        kwargs: dict[str, Any] = dict(model_path=self.model_dir, tp_size=tensor_parallel_size,
                                      dtype=str(torch_dtype).replace('torch.', '') if torch_dtype else 'auto')
        if max_model_len is not None:
            kwargs['context_length'] = max_model_len
        if gpu_memory_utilization is not None:
            kwargs['mem_fraction_static'] = gpu_memory_utilization
        if seed is not None:
            kwargs['random_seed'] = seed
        kwargs.update(engine_kwargs)
        self.engine = sglang.Engine(**kwargs)

    def _prompt(self, req: InferRequest) -> str:
        return self.tokenizer.apply_chat_template(req.messages, tools=req.tools or None, tokenize=False,
                                                  add_generation_prompt=True)

    @staticmethod
    def _sampling_params(rc: RequestConfig) -> dict[str, Any]:
        params: dict[str, Any] = dict(n=rc.n, temperature=rc.temperature, top_p=rc.top_p,
                                      top_k=rc.top_k if rc.top_k and rc.top_k > 0 else -1,
                                      repetition_penalty=rc.repetition_penalty)
        if rc.max_tokens is not None:
            params['max_new_tokens'] = rc.max_tokens
        if rc.stop:
            params['stop'] = list(rc.stop)
        if rc.seed is not None:
            params['sampling_seed'] = rc.seed
        return params

    def infer(self, requests: list[InferRequest], request_config: RequestConfig) -> list[ChatCompletionResponse]:
        if not requests:
            return []
        n = request_config.n
        prompts = [self._prompt(r) for r in requests]
        outs = self.engine.generate(prompt=prompts, sampling_params=self._sampling_params(request_config))
        if isinstance(outs, dict):
            outs = [outs]
        if len(outs) != len(prompts) * n:
            raise RuntimeError(f'SGLang returned {len(outs)} outputs for {len(prompts)} prompts x n={n}')
        responses = []
        for i in range(len(prompts)):
            group = outs[i * n:(i + 1) * n]
            choices, completion_tokens, prompt_tokens = [], 0, 0
            for j, out in enumerate(group):
                meta = out.get('meta_info', {})
                token_ids = out.get('output_ids')
                ntok = meta.get('completion_tokens', len(token_ids or []))
                completion_tokens += ntok
                prompt_tokens = meta.get('prompt_tokens', prompt_tokens)
                choices.append(ChatCompletionChoice(
                    index=j, message=ChatMessage(role='assistant', content=out.get('text', '')),
                    finish_reason=_finish_reason(meta), token_ids=list(token_ids) if token_ids is not None else None))
            responses.append(ChatCompletionResponse(
                model=self.model_name, choices=choices,
                usage=UsageInfo(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)))
        return responses

    def close(self) -> None:
        engine = getattr(self, 'engine', None)
        if engine is not None:
            self.engine = None
            engine.shutdown()
