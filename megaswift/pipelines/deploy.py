"""``megaswift deploy``: serve a model behind an OpenAI-compatible API."""
from __future__ import annotations

import logging
import signal

from ..arguments.deploy import DeployArguments
from ..infer_engine import get_infer_engine
from ..serving.openai_server import OpenAIServer

logger = logging.getLogger(__name__)


def deploy_main(args: DeployArguments) -> None:
    kwargs = dict(args.engine_kwargs)
    if args.infer_backend == 'transformers':
        kwargs.setdefault('max_batch_size', 64)
    engine = get_infer_engine(args.infer_backend, args.model, args.torch_dtype, **kwargs)
    server = OpenAIServer(engine, args.host, args.port, args.served_model_name or args.model, args.max_batch_size,
                          args.api_key)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Tests and scripts wait for this exact line to learn the address (also with --port 0).
    print(f'megaswift deploy: serving {server.model_name} at {server.url}', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info('shutting down')
    finally:
        server.httpd.server_close()
        engine.close()
