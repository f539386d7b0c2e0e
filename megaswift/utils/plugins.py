"""``--external_plugins a.py b.py``: import user files so their registry entries exist."""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
_loaded: dict[str, object] = {}


def import_external_plugins(paths: list[str]) -> None:
    """Import each file once (by absolute path); a missing file or an import error names the file."""
    for raw in paths or []:
        path = Path(raw).expanduser().resolve()
        if str(path) in _loaded:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"--external_plugins: '{raw}' does not exist")
        name = f'megaswift_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}'
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # let the plugin import its sibling files
        try:
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ImportError(f"--external_plugins: importing '{raw}' failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(str(path.parent))
        _loaded[str(path)] = module
        logger.info('loaded plugin %s', path)
