"""The one interface every generation backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod

from .protocol import ChatCompletionResponse, InferRequest, RequestConfig


class InferEngine(ABC):
    """``infer(requests, request_config) -> responses``, one response per request, in order.

    ``request_config.n`` samples are returned as ``n`` choices of one response; engines
    generate them from one prompt prefill where the backend allows it.
    A request that cannot be served raises: engines never drop a request silently.
    """

    model_name: str = ''
    supports_logprobs: bool = False  # fills ``choice.logprobs`` when ``request_config.logprobs`` is set

    @abstractmethod
    def infer(self, requests: list[InferRequest], request_config: RequestConfig) -> list[ChatCompletionResponse]:
        ...

    def close(self) -> None:
        """Release servers, processes or GPU memory held by the engine."""


def require_package(module: str, extra: str, engine: str):
    """Import an optional backend or fail with the command that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the '{engine}' engine needs the '{module}' package, which is not installed "
                          f"({e}); install it with: pip install 'megaswift[{extra}]'") from e
