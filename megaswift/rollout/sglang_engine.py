"""``megaswift rollout --infer_backend sglang``: SGLang's offline engine behind the rollout engine interface.

GPU only, sglang >= 0.5.6. Written against the source of sglang 0.5.6 and 0.5.23; not yet run on a GPU.

- **Construction**: ``infer_engine.sglang_engine.SglangEngine`` (the engine of ``sample`` / ``deploy``) builds the
  ``sglang.Engine`` and is also what the server's OpenAI routes call (under ``lock``). ``tensor_parallel_size`` is
  SGLang's ``tp_size`` and this engine's ``world_size``; other keyword arguments go to ``sglang.Engine``. SGLang's
  own ``dp_size`` / ``pp_size`` are refused (``--data_parallel_size`` runs replicas; the weight-update group has
  one rank per TP rank only).
- **/infer**: every completion is its own SGLang request (``input_ids`` = the prompt, ``n`` = 1) with its own
  ``sampling_seed``, derived from its request's seed and its index: SGLang gives the ``n`` samples of one request
  one seed. ``generate(..., return_logprob=True)`` returns per token ``(logprob, token_id, text)`` in
  ``meta_info['output_token_logprobs']``; these are the log-probs after temperature unless
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` is set where SGLang's sampler is imported, so this engine sets it before
  the scheduler processes start: then they are the raw model's log-softmax, the trainer's quantity. A token SGLang
  stopped on (EOS) is in ``output_ids`` and keeps its log-prob. Seeds fix samples only with SGLang's
  ``enable_deterministic_inference=True`` (an engine keyword); otherwise SGLang samples without them.
- **Weight sync** (``weight_sync_protocol = 'named_group'``, ``weight_sync.py``): ``Engine.init_weights_update_group``
  makes SGLang's TP rank t join at rank ``rank + t`` through ``tcp://host:port``, as a torch group named
  ``named_group_name(port)`` (SGLang's ``init_custom_process_group``: the trainer's ``TCPStore`` seen through
  ``PrefixStore(name)``, then torch's group constructor), with torch's default group timeout (SGLang takes none).
  Each bucket is ``Engine.update_weights_from_distributed(names, dtypes, shapes, group_name,
  load_format='flattened_bucket', flush_cache=last)``: SGLang receives one uint8 tensor holding the tensors' bytes
  in order, without padding (``FlattenedTensorBucket``, multi-dtype since 0.5.6), which is exactly the trainer's
  broadcast. Where SGLang has ``begin_weight_update`` / ``end_weight_update`` (a session its newer releases
  require around the buckets), a sync opens one at its first bucket and closes it after the last. The last bucket
  flushes SGLang's radix (prefix) cache and bumps ``weights_version``. A bucket whose names or shapes the
  checkpoint does not have is refused before SGLang joins its broadcast (the trainer then fails at once).
"""
from __future__ import annotations

import inspect
import logging
import os
import random
import threading
import zlib

from ..infer_engine.base import require_package
from ..infer_engine.protocol import RequestConfig
from ..infer_engine.sglang_engine import SglangEngine, _finish_reason
from .engine import SamplingRequest, TransformersRolloutEngine
from .weight_sync import WeightSyncError, checkpoint_params, named_group_name

logger = logging.getLogger(__name__)

LOGPROB_ENV = 'SGLANG_RETURN_ORIGINAL_LOGPROB'
MIN_SGLANG = '0.5.6'  # update_weights_from_distributed(load_format='flattened_bucket') and multi-dtype buckets


# ---------------------------------------------------------------- requests and results (pure)
def completion_seed(seed: int | None, index: int) -> int:
    """The ``sampling_seed`` of completion ``index`` of a request (< 2**31: SGLang 0.5.6 keeps seeds as int32);
    a random one for an unseeded request, so its samples still differ under deterministic inference."""
    if seed is None:
        return random.getrandbits(31)
    return zlib.crc32(f'{seed}:{index}'.encode()) & 0x7FFF_FFFF


def sglang_requests(requests: list[SamplingRequest], max_new_tokens: list[int]) -> tuple[list, list]:
    """``(input_ids, sampling_params)`` for ``Engine.generate``: one entry per completion, request after request
    (each request's ``n`` completions together), ``n`` = 1 each."""
    input_ids, params = [], []
    for r, max_new in zip(requests, max_new_tokens):
        for k in range(r.n):
            cfg = RequestConfig(max_tokens=max_new, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                seed=completion_seed(r.seed, k))
            input_ids.append(list(r.prompt_token_ids))
            params.append(SglangEngine._sampling_params(cfg))
    return input_ids, params


def completion(out: dict) -> dict:
    """One SGLang output as ``{token_ids, logprobs, finish_reason}``."""
    meta = out.get('meta_info') or {}
    reason = _finish_reason(meta)
    if reason not in ('stop', 'length'):
        raise RuntimeError(f'SGLang ended a completion with finish_reason {meta.get("finish_reason")!r}')
    pairs = meta.get('output_token_logprobs')
    if pairs is None:
        raise RuntimeError('SGLang returned no output_token_logprobs (generate needs return_logprob=True)')
    token_ids = [int(p[1]) for p in pairs]
    output_ids = out.get('output_ids')
    if output_ids is not None and [int(t) for t in output_ids] != token_ids:
        raise RuntimeError(f'SGLang output_ids {list(output_ids)} differ from its log-prob tokens {token_ids}')
    return {'token_ids': token_ids, 'logprobs': [float(p[0]) for p in pairs], 'finish_reason': reason}


def split_completions(outputs: list[dict], ns: list[int]) -> list[list[dict]]:
    """Each request's ``n`` completions, in order, from the flat list ``generate`` returned."""
    if len(outputs) != sum(ns):
        raise RuntimeError(f'SGLang returned {len(outputs)} outputs for {sum(ns)} completions')
    results, start = [], 0
    for n in ns:
        results.append([completion(o) for o in outputs[start:start + n]])
        start += n
    return results


def _check(result, what: str) -> None:
    """SGLang's ``(success, message)`` (a tuple, or an object with those fields) -> raise when it failed."""
    success = getattr(result, 'success', None)
    message = getattr(result, 'message', '')
    if success is None:
        success, message = result[0], result[1]
    if not success:
        raise RuntimeError(f'SGLang {what} failed: {message}')


def check_sglang():
    """The installed sglang, or ImportError when it lacks the flattened-bucket distributed update."""
    sglang = require_package('sglang', 'sglang', 'sglang')
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError:
        FlattenedTensorBucket = None
    update = getattr(getattr(sglang, 'Engine', None), 'update_weights_from_distributed', None)
    if (update is None or 'load_format' not in inspect.signature(update).parameters
            or not getattr(FlattenedTensorBucket, 'supports_multi_dtypes', False)):
        raise ImportError(f"megaswift rollout --infer_backend sglang needs sglang >= {MIN_SGLANG} "
                          f"(update_weights_from_distributed with load_format='flattened_bucket'); found "
                          f"{getattr(sglang, '__version__', 'unknown')}")
    return sglang


# ---------------------------------------------------------------- engine
class SGLangRolloutEngine:
    """The rollout engine interface (``TransformersRolloutEngine``'s docstring) on ``sglang.Engine``. Every call
    into SGLang holds ``lock``: generation, each bucket, cache flushes and the group's set-up never overlap."""

    backend = 'sglang'
    device = 'cuda'
    weight_sync_protocol = 'named_group'
    # the transformers engine's prompt templating, length limit and layout check, on this engine's ``tokenizer``,
    # ``max_length`` and ``_params``
    prompt_ids = TransformersRolloutEngine.prompt_ids
    _max_new = TransformersRolloutEngine._max_new
    check_layout = TransformersRolloutEngine.check_layout

    def __init__(self, model: str, torch_dtype: str | None = 'auto', tensor_parallel_size: int = 1,
                 **engine_kwargs):
        for key in ('dp_size', 'pp_size'):
            if int(engine_kwargs.get(key) or 1) != 1:
                raise ValueError(f'sglang {key}={engine_kwargs[key]}: the rollout engine runs one SGLang engine with '
                                 f'tensor parallelism only (use --data_parallel_size for replicas)')
        check_sglang()
        if os.environ.get(LOGPROB_ENV, '1') != '1':
            logger.warning('%s=%s replaced by 1: /infer returns the raw model log-probs', LOGPROB_ENV,
                           os.environ[LOGPROB_ENV])
        os.environ[LOGPROB_ENV] = '1'  # read by SGLang's sampler in the scheduler processes started below
        self.infer_engine = SglangEngine(model, torch_dtype, tensor_parallel_size=tensor_parallel_size,
                                         **engine_kwargs)
        self.engine, self.tokenizer = self.infer_engine.engine, self.infer_engine.tokenizer
        self.model_name = model
        self.world_size = tensor_parallel_size
        context_len = getattr(getattr(self.engine, 'tokenizer_manager', None), 'context_len', None)
        # SGLang refuses prompt + max_new_tokens >= its context length
        self.max_length = context_len - 1 if context_len else None
        self.lock = threading.Lock()
        self.weights_version = 0
        self.prefix_cache_resets = 0
        self._params = checkpoint_params(self.infer_engine.model_dir)
        self._group: str | None = None  # the weight-update group's name while joined
        self._session = False  # an SGLang weight-update session is open (begin_weight_update)

    # ---------------------------------------------------------------- infer
    def infer(self, requests: list[SamplingRequest]) -> tuple[list[list[dict]], int]:
        limits = [self._max_new(r) for r in requests]  # every request is checked before any is generated
        input_ids, params = sglang_requests(requests, limits)
        with self.lock:
            outputs = self.engine.generate(input_ids=input_ids, sampling_params=params, return_logprob=True)
            version = self.weights_version
        if isinstance(outputs, dict):
            outputs = [outputs]
        return split_completions(outputs, [r.n for r in requests]), version

    # ---------------------------------------------------------------- weights
    @property
    def has_communicator(self) -> bool:
        return self._group is not None

    def join_communicator(self, host: str, port: int, world_size: int, rank: int, backend: str,
                          timeout_s: float) -> None:
        """SGLang's TP ranks join at ``rank .. rank + tp - 1``; blocks until the trainer's group forms too.
        ``timeout_s`` is not SGLang's to take: its group waits torch's default timeout."""
        self.close_communicator()
        name = named_group_name(port)
        with self.lock:
            _check(self.engine.init_weights_update_group(master_address=host, master_port=port, rank_offset=rank,
                                                         world_size=world_size, group_name=name, backend=backend),
                   f'init_weights_update_group at {host}:{port}')
            self._group = name

    def update_weights(self, layout: dict, last: bool) -> int:
        """One bucket: checked against the checkpoint, then received and loaded by SGLang; the last bucket also
        flushes the prefix cache and bumps the version. Returns the version."""
        if self._params:
            self.check_layout(layout)  # before SGLang joins the broadcast: the trainer sees the refusal at once
        with self.lock:
            if self._group is None:
                raise WeightSyncError('no communicator: call /init_communicator first')
            try:
                if not self._session and hasattr(self.engine, 'begin_weight_update'):
                    _check(self.engine.begin_weight_update(), 'begin_weight_update')
                    self._session = True
                if layout['names']:
                    _check(self.engine.update_weights_from_distributed(
                        names=list(layout['names']), dtypes=list(layout['dtypes']),
                        shapes=[list(s) for s in layout['shapes']], group_name=self._group, flush_cache=last,
                        load_format='flattened_bucket'), f'update_weights_from_distributed ({layout["names"][0]}..)')
                elif last:  # the trainer's last bucket may be empty: nothing to receive, the cache still goes
                    _check(self.engine.flush_cache(), 'flush_cache')
                if last:
                    self._end_session()
            except BaseException:
                self._end_session(quiet=True)
                raise
            if last:
                self.weights_version += 1
                self.prefix_cache_resets += 1
            return self.weights_version

    def _end_session(self, quiet: bool = False) -> None:
        if not self._session:
            return
        self._session = False
        try:
            _check(self.engine.end_weight_update(), 'end_weight_update')
        except Exception:
            if not quiet:
                raise
            logger.exception('closing the SGLang weight-update session failed')

    def close_communicator(self) -> None:
        with self.lock:
            self._end_session(quiet=True)
            name, self._group = self._group, None
            if name is not None:
                try:
                    _check(self.engine.destroy_weights_update_group(name), 'destroy_weights_update_group')
                except Exception:  # noqa: BLE001 - the trainer may be gone; a new join uses a new group
                    logger.exception('leaving the weight-sync group %s failed', name)

    def reset_prefix_cache(self) -> None:
        with self.lock:
            _check(self.engine.flush_cache(), 'flush_cache')
            self.prefix_cache_resets += 1

    def close(self) -> None:
        try:
            self.close_communicator()
        finally:
            self.infer_engine.close()
