"""``megaswift deploy``: serve a model behind an OpenAI-compatible API (FastAPI + uvicorn)."""
from __future__ import annotations

from ..arguments.deploy import DeployArguments
from ..infer_engine import get_infer_engine
from ..serving.app import bind, serve
from ..serving.openai_routes import create_openai_app


def deploy_main(args: DeployArguments) -> None:
    sock = bind(args.host, args.port, args.api_key)  # a port in use fails before the model loads
    kwargs = dict(args.engine_kwargs)
    if args.infer_backend == 'transformers':
        kwargs.setdefault('max_batch_size', 64)
    engine = get_infer_engine(args.infer_backend, args.model, args.torch_dtype, **kwargs)
    name = args.served_model_name or args.model
    app = create_openai_app(engine, name, args.limits(), args.api_key, args.max_batch_size, args.agent_template)
    try:
        # Tests and scripts wait for this exact line to learn the address (also with --port 0).
        serve(app, sock, on_listen=lambda url: print(f'megaswift deploy: serving {name} at {url}/v1', flush=True))
    finally:
        engine.close()
