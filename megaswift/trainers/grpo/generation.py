"""Where GRPO's completions come from: one interface, two places.

- ``ColocateSource`` (``--vllm_mode colocate``): a rollout engine (``megaswift.rollout.get_rollout_engine``; the
  transformers backend on CPU) inside the trainer's global rank 0. Weight sync is an in-place copy: every rank
  drives ``iter_hf_weights`` (the TP/PP gathers of the export weight map, one layer at a time) and rank 0 copies
  each bucket into the engine.
- ``ServerSource`` (``--vllm_mode server``): a ``megaswift rollout`` server, reached with ``RolloutClient``
  (timeouts, retries for connection errors, a clear error when it dies); weights go over the weight-sync group.

Either way rank 0 generates the whole generation batch and the trainer broadcasts it; every reply carries the
weights version it was generated with, and the trainer refuses completions from any other version than the one
it last pushed (never trains on a stale policy).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ...rollout.weight_sync import DEFAULT_BUCKET_MB, RolloutError, WeightSyncError, buckets_with_last

logger = logging.getLogger(__name__)


class StalePolicyError(RolloutError):
    """The rollout engine answered with other weights than the trainer last pushed."""


class ColocateSource:
    mode = 'colocate'

    def __init__(self, backend: str, model_dir: str, torch_dtype: str | None, is_rank0: bool,
                 bucket_mb: float = DEFAULT_BUCKET_MB):
        self.engine = None
        self.bucket_mb = bucket_mb
        if is_rank0:
            from ...rollout import get_rollout_engine
            self.engine = get_rollout_engine(backend, model_dir, torch_dtype)
        self.version = None

    def generate(self, requests: list[dict]) -> dict:
        from ...rollout.engine import SamplingRequest
        results, version = self.engine.infer([SamplingRequest(**r) for r in requests])
        return {'weights_version': version, 'results': [{'completions': c} for c in results]}

    def sync(self, models, parallel) -> int | None:
        """Every rank calls this; rank 0 copies the gathered tensors into its engine, bucket by bucket."""
        from ...megatron.convert import iter_hf_weights
        from ...rollout.weight_sync import has_lora
        pairs = iter_hf_weights(models, parallel=parallel, adapted_only=has_lora(models))  # LoRA: merged, adapted
        if self.engine is None:
            for _ in pairs:  # drive the gathers this rank takes part in
                pass
            return None
        for bucket, last in buckets_with_last(pairs, self.bucket_mb):
            self.engine.check_layout(bucket.layout())
            self.version = self.engine.load_weights(list(zip(bucket.names, bucket.tensors)), last=last)
        return self.version

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class ServerSource:
    mode = 'server'

    def __init__(self, url: str, api_key: str | None, is_rank0: bool, timeout: float,
                 bucket_mb: float | None = None, communicator_host: str = '127.0.0.1'):
        self.client = None
        self.bucket_mb = bucket_mb
        self.version = None
        if is_rank0:
            from ...rollout import RolloutClient
            self.client = RolloutClient(url, api_key=api_key, read_timeout=timeout)
            self.client.wait_ready(timeout=min(timeout, 120.0))
            info = self.client.info()
            logger.info('rollout server %s: %s', url, info)
            if self.bucket_mb is None:  # the server's --weight_sync_bucket_mb (only rank 0 makes buckets)
                self.bucket_mb = float(info.get('weight_sync_bucket_mb', DEFAULT_BUCKET_MB))
            self.client.init_communicator(host=communicator_host)

    def generate(self, requests: list[dict]) -> dict:
        return self.client.infer(requests)

    def sync(self, models, parallel) -> int | None:
        from ...rollout.weight_sync import push_weights
        self.version = push_weights(models, self.client, parallel=parallel,
                                    bucket_mb=self.bucket_mb or DEFAULT_BUCKET_MB)
        return self.version

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def build_source(args, model_dir: str, is_rank0: bool):
    if args.vllm_mode == 'server':
        url = args.rollout_url or f'http://{args.rollout_host}:{args.rollout_port}'
        return ServerSource(url, args.rollout_api_key, is_rank0, float(args.rollout_timeout),
                            args.weight_sync_bucket_mb, args.rollout_communicator_host)
    return ColocateSource(args.rollout_backend, model_dir, 'float32' if args.rollout_backend == 'transformers'
                          else 'auto', is_rank0, args.weight_sync_bucket_mb or DEFAULT_BUCKET_MB)


def generate_checked(source, requests: list[dict]) -> list[list[dict]]:
    """Rank 0: the completions of ``requests`` (per request, its ``n``), checked to come from the weights the
    trainer pushed last."""
    reply = source.generate(requests)
    if source.version is not None and int(reply['weights_version']) != int(source.version):
        raise StalePolicyError(f"the rollout engine generated with weights version {reply['weights_version']}, the "
                               f'trainer pushed version {source.version}: refusing to train on a stale policy')
    results = [r['completions'] for r in reply['results']]
    for req, comps in zip(requests, results):
        if len(comps) != req['n']:
            raise WeightSyncError(f"the rollout engine returned {len(comps)} completions for n={req['n']}")
    return results


def broadcast_from_rank0(obj: Any) -> Any:
    """``obj`` from global rank 0 on every rank (the generation batch; plain lists and numbers)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ['ColocateSource', 'ServerSource', 'StalePolicyError', 'broadcast_from_rank0', 'build_source',
           'generate_checked']
