"""The rollout server's vLLM engine: ``vllm.LLM`` behind the interface of ``TransformersRolloutEngine``.

Generation: prompt token ids go to ``LLM.generate`` in one call per ``/infer`` batch, each request with its own
``SamplingParams`` (built by ``VllmEngine._sampling_params``, the same as ``megaswift sample``/``deploy``) and
``logprobs=0``: the log-prob of each sampled token. The engine runs with ``logprobs_mode='raw_logprobs'``, the
log-softmax of the raw logits before temperature / top-k / top-p, i.e. the model's own distribution, which is
what a trainer computes. A completion that ended on a stop token keeps it (vLLM's ``token_ids`` include it) with
its log-prob.

Weight sync: the vLLM *workers* are the engine's ranks in the weight-sync group (``world_size`` = vLLM's worker
count, tensor x pipeline parallel size); each joins it and receives every bucket through the worker extension
``vllm_worker_extension.WeightSyncWorkerExtension`` (driven by ``llm.collective_rpc``), which holds the buckets
and reloads them in place with ``model_runner.reload_weights`` after the last one (that module says why not per
bucket). This process checks each bucket's names and shapes against the served checkpoint before the workers
keep it; a refused bucket is still drained from the broadcast, and the rest of that push is dropped. After the
last bucket: the weights version goes up and the prefix cache is reset (vLLM keeps KV blocks of earlier prompts,
computed with the old weights, and would reuse them for any prompt longer than a block).

Defaults: prefix caching on, ``enforce_eager`` and fp32 (``torch_dtype`` 'auto') on CPU, so that log-probs
match a trainer's fp32 forward; on GPUs vLLM's own defaults. ``lock`` serialises every use of ``LLM``:
generation (``/infer`` and the OpenAI routes, which reach the same ``LLM`` through ``infer_engine``) and the
weight-sync calls.
"""
from __future__ import annotations

import logging
import threading

from ..infer_engine.protocol import RequestConfig
from .engine import SamplingRequest, TransformersRolloutEngine
from .weight_sync import WeightSyncError, checkpoint_params

logger = logging.getLogger(__name__)

WORKER_EXTENSION = 'megaswift.rollout.vllm_worker_extension.WeightSyncWorkerExtension'


class VllmRolloutEngine:
    """``vllm.LLM`` with the rollout interface (see ``TransformersRolloutEngine``); ``engine_kwargs`` go to
    ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``max_model_len``, ``gpu_memory_utilization``)."""

    backend = 'vllm'
    # the transformers engine's prompt templating and length limit, on ``tokenizer`` and ``max_length``
    prompt_ids = TransformersRolloutEngine.prompt_ids
    _max_new = TransformersRolloutEngine._max_new
    check_layout = TransformersRolloutEngine.check_layout  # names and shapes against ``_params``
    reset_prefix_cache = TransformersRolloutEngine.reset_prefix_cache  # ``_reset_prefix_cache`` under the lock

    def __init__(self, model: str, torch_dtype: str | None = 'auto', **engine_kwargs):
        from ..infer_engine.vllm_engine import VllmEngine, _cuda_available, _dtype_name
        dtype = _dtype_name(torch_dtype)
        if dtype == 'auto' and not _cuda_available():
            dtype = 'float32'  # parity with the trainer's log-probs first (VllmEngine would pick bf16 on CPU)
        engine_kwargs.setdefault('enable_prefix_caching', True)
        engine_kwargs.setdefault('logprobs_mode', 'raw_logprobs')
        engine_kwargs['worker_extension_cls'] = WORKER_EXTENSION
        self.infer_engine = VllmEngine(model, dtype, **engine_kwargs)  # also serves the OpenAI routes
        self.llm = self.infer_engine.llm
        self.model_name, self.device = model, self.infer_engine.device
        self.tokenizer = self.llm.get_tokenizer()
        config = self.llm.llm_engine.vllm_config
        self.world_size = config.parallel_config.world_size  # the workers: tensor x pipeline parallel size
        self.max_length = config.model_config.max_model_len  # prompt + completion
        self.lock = threading.Lock()
        self.weights_version = 0
        self.prefix_cache_resets = 0
        self.has_communicator = False
        self._params = checkpoint_params(self.infer_engine.model_dir)  # for ``check_layout``
        self._dropping: str | None = None  # why the rest of the current push is being drained, not kept
        self._failed: str | None = None    # a reload failed: no consistent weights until a push succeeds

    # ---------------------------------------------------------------- infer
    def _sampling_params(self, r: SamplingRequest):
        # vLLM refuses n > 1 with greedy sampling: one greedy completion, copied n times by ``infer``
        rc = RequestConfig(max_tokens=self._max_new(r), temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                           n=1 if r.temperature == 0 else r.n, seed=r.seed)
        return self.infer_engine._sampling_params(rc, logprobs=0, detokenize=False)

    def infer(self, requests: list[SamplingRequest]) -> tuple[list[list[dict]], int]:
        """The completions of every request (``{token_ids, logprobs, finish_reason}``, in order) and the weights
        version they were all generated with; one ``LLM.generate`` call for the whole batch."""
        from vllm.inputs import TokensPrompt
        params = [self._sampling_params(r) for r in requests]  # every request is checked before any is generated
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        with self.lock:
            if self._failed:
                raise WeightSyncError(self._failed)
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
            version = self.weights_version
        results = []
        for r, out in zip(requests, outputs):
            completions = [self._completion(c) for c in sorted(out.outputs, key=lambda c: c.index)]
            results.append(completions * r.n if len(completions) == 1 else completions)
        return results, version

    @staticmethod
    def _completion(c) -> dict:
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise RuntimeError(f'vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-probs for '
                               f'{len(ids)} tokens')
        return {'token_ids': ids, 'logprobs': [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)],
                'finish_reason': c.finish_reason if c.finish_reason in ('stop', 'length') else 'length'}

    # ---------------------------------------------------------------- weights
    def _rpc(self, method: str, *args) -> list:
        return self.llm.collective_rpc(method, args=args)

    def join_communicator(self, host: str, port: int, world_size: int, rank: int, backend: str,
                          timeout_s: float) -> None:
        """Every worker joins the group: worker ``i`` as rank ``rank + i``."""
        with self.lock:
            self.has_communicator = False
            self._dropping = None
            self._rpc('megaswift_join_weight_sync', host, port, world_size, rank, backend, timeout_s)
            self.has_communicator = True

    def close_communicator(self) -> None:
        with self.lock:
            self.has_communicator = False
            self._dropping = None
            self._rpc('megaswift_close_weight_sync')

    def update_weights(self, layout: dict, last: bool) -> int:
        """One bucket: the workers always drain its broadcast; they keep it unless this bucket or an earlier one
        of the same push was refused. After the last bucket they reload; then the version goes up and the
        prefix cache is reset. Returns the version."""
        problem = None
        if self._params:  # without a safetensors checkpoint to check against, vLLM's loader will say
            try:
                self.check_layout(layout)
            except WeightSyncError as e:
                problem = str(e)
        with self.lock:
            if problem and not self._dropping:
                self._dropping = problem
            replies = self._rpc('megaswift_receive_bucket', layout, last, self._dropping is None)
            dropped = self._dropping
            if last:
                self._dropping = None
            if dropped:
                raise WeightSyncError(f'{dropped}; this push is dropped and the served weights stay at version '
                                      f'{self.weights_version}')
            failed = [r for r in replies if r.get('error')]
            if failed:
                r = failed[0]
                self._failed = (f'vLLM worker {r["rank"]} serving {self.model_name} failed to reload the pushed '
                                f'weights (at tensor {r["tensor"]!r}): {r["error"]}; it generates nothing until a '
                                f'complete push succeeds')
                logger.error(self._failed)
                raise WeightSyncError(self._failed)
            if last:
                self._failed = None
                self.weights_version += 1
                self._reset_prefix_cache()
            return self.weights_version

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():  # False while requests run; none do under the lock
            raise RuntimeError('vLLM did not reset its prefix cache')
        self.prefix_cache_resets += 1

    def close(self) -> None:
        if self.infer_engine.llm is not None:
            try:
                self._rpc('megaswift_close_weight_sync')
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                logger.warning('closing the workers\' weight-sync group raised %r', e)
        self.infer_engine.close()
