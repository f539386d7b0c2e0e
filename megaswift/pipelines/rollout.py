"""``megaswift rollout``: serve a model for an RL trainer (``/infer`` with log-probs, live weight sync)."""
from __future__ import annotations

from ..arguments.rollout import RolloutArguments
from ..rollout.engine import get_rollout_engine
from ..rollout.server import create_rollout_app
from ..serving.app import bind, serve


def rollout_main(args: RolloutArguments) -> None:
    sock = bind(args.host, args.port, args.api_key)  # a port in use fails before the model loads
    engine = get_rollout_engine(args.infer_backend, args.model, args.torch_dtype, args.data_parallel_size)
    app = create_rollout_app(engine, args.limits(), args.api_key, args.weight_sync_bucket_mb)
    try:
        # Tests and scripts wait for this exact line to learn the address (also with --port 0).
        serve(app, sock, on_listen=lambda url: print(f'megaswift rollout: serving {args.model} at {url}', flush=True))
    finally:
        engine.close()
