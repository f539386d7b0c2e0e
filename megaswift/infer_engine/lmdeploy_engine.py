"""LMDeploy engine (``lmdeploy.pipeline``). GPU only: LMDeploy has no CPU device type.

``GenerationConfig`` has an ``n`` field, but LMDeploy documents it as "**Only 1** is
supported now", so ``n`` samples are generated as ``n`` copies of each prompt in one
batched pipeline call (LMDeploy's prefix caching, when enabled, can share their prefill).
Prompts are rendered with the model's HF tokenizer (tools included) and sent with
``do_preprocess=False``, so every engine sees the same chat template.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from .base import InferEngine, require_package
from .protocol import (ChatCompletionChoice, ChatCompletionResponse, ChatMessage, InferRequest, RequestConfig,
                       UsageInfo)

logger = logging.getLogger(__name__)


class LmdeployEngine(InferEngine):
    def __init__(self, model: str, torch_dtype: Any = 'auto', max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
                 backend: str = 'pytorch', **engine_kwargs):
        lmdeploy = require_package('lmdeploy', 'lmdeploy', 'lmdeploy')
        from transformers import AutoTokenizer

        from megaswift.model import resolve_model_dir

        self._lmdeploy = lmdeploy
        self.model_name = model
        self.model_dir = resolve_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        cfg: dict[str, Any] = dict(tp=tensor_parallel_size,
                                   dtype=str(torch_dtype).replace('torch.', '') if torch_dtype else 'auto')
        if max_model_len is not None:
            cfg['session_len'] = max_model_len
        if gpu_memory_utilization is not None:
            cfg['cache_max_entry_count'] = gpu_memory_utilization
        cfg.update(engine_kwargs)
        config_cls = lmdeploy.PytorchEngineConfig if backend == 'pytorch' else lmdeploy.TurbomindEngineConfig
        self.pipe = lmdeploy.pipeline(self.model_dir, backend_config=config_cls(**cfg))

    def _gen_config(self, rc: RequestConfig):
        top_k = rc.top_k if rc.top_k and rc.top_k > 0 else 0  # 0: no top-k filtering
        kwargs: dict[str, Any] = dict(n=1, do_sample=rc.temperature > 0, temperature=rc.temperature,
                                      top_p=rc.top_p, top_k=top_k,
                                      repetition_penalty=rc.repetition_penalty, random_seed=rc.seed,
                                      stop_words=list(rc.stop) if rc.stop else None)
        if rc.max_tokens is not None:
            kwargs['max_new_tokens'] = rc.max_tokens
        return self._lmdeploy.GenerationConfig(**kwargs)

    def infer(self, requests: list[InferRequest], request_config: RequestConfig) -> list[ChatCompletionResponse]:
        if not requests:
            return []
        n = request_config.n
        prompts = [self.tokenizer.apply_chat_template(r.messages, tools=r.tools or None, tokenize=False,
                                                      add_generation_prompt=True) for r in requests]
        batch = [p for p in prompts for _ in range(n)]  # n copies: GenerationConfig.n > 1 is unsupported
        gen_config = self._gen_config(request_config)
        if request_config.seed is not None and n > 1:
            # one seed for all copies would give n identical samples: seed + j, as vLLM does
            gen_config = [self._gen_config(replace(request_config, n=1, seed=request_config.seed + j))
                          for _ in prompts for j in range(n)]
        outs = self.pipe(batch, gen_config=gen_config, do_preprocess=False)
        if len(outs) != len(batch):
            raise RuntimeError(f'LMDeploy returned {len(outs)} outputs for {len(batch)} prompts')
        responses = []
        for i in range(len(prompts)):
            group = outs[i * n:(i + 1) * n]
            choices = [ChatCompletionChoice(index=j, message=ChatMessage(role='assistant', content=o.text),
                                            finish_reason=o.finish_reason, token_ids=list(o.token_ids or []))
                       for j, o in enumerate(group)]
            prompt_tokens = group[0].input_token_len if group else 0
            completion_tokens = sum(o.generate_token_len for o in group)
            responses.append(ChatCompletionResponse(
                model=self.model_name, choices=choices,
                usage=UsageInfo(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)))
        return responses

    def close(self) -> None:
        pipe = getattr(self, 'pipe', None)
        if pipe is not None:
            self.pipe = None
            if hasattr(pipe, 'close'):
                pipe.close()
