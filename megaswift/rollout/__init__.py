"""``megaswift rollout``: a generation server for RL trainers, with live weight sync from megatron-core.

    from megaswift.rollout import RolloutClient
    client = RolloutClient('http://127.0.0.1:8000')
    out = client.infer([{'prompt_token_ids': ids, 'n': 4, 'temperature': 1.0, 'max_tokens': 64, 'seed': 0}])
    client.init_communicator()                      # trainer global rank 0 only
    client.push_weights(models, parallel, bucket_mb=512)   # every trainer rank (client None off rank 0)

Imported lazily: ``import megaswift.rollout`` loads neither FastAPI nor megatron-core.
"""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_LAZY = {
    'RolloutClient': 'client', 'RolloutError': 'client',
    'push_weights': 'weight_sync', 'push_named_tensors': 'weight_sync', 'WeightSyncError': 'weight_sync',
    'TransformersRolloutEngine': 'engine', 'get_rollout_engine': 'engine',
    'create_rollout_app': 'server',
}
__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
