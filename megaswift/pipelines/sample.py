"""``megaswift sample``: best-of-N sampling with reward filtering."""
from __future__ import annotations

from ..arguments.sampling import SamplingArguments
from ..sampling import Sampler


def sample_main(args: SamplingArguments | None = None, **kwargs) -> str:
    """Run a sampling job; returns the path of the output jsonl. ``sample_main(model=..., dataset=[...])`` works too."""
    if args is None:
        args = SamplingArguments(**kwargs)
    return Sampler(args).run()
