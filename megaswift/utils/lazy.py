"""Package exports imported on first use, so importing a package does not import its heavy dependencies."""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``package.<exports[name]>`` when ``name`` is first used."""
    module_globals = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f'{package}.{exports[name]}'), name)
            module_globals[name] = value
            return value
        raise AttributeError(f'module {package!r} has no attribute {name!r}')
    return __getattr__
