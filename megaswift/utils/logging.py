"""One logging format for megaswift; quiets third-party chatter that users cannot act on."""
from __future__ import annotations

import logging
import os
import warnings

from .dist import rank, world_size


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get('MEGASWIFT_LOG_LEVEL', 'INFO')).upper()
    prefix = f'[megaswift rank{rank()}]' if world_size() > 1 else '[megaswift]'
    logging.basicConfig(format=f'{prefix} %(levelname)s %(asctime)s %(name)s: %(message)s', datefmt='%H:%M:%S',
                        level=logging.WARNING)
    logging.getLogger('megaswift').setLevel(level)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    warnings.filterwarnings('ignore', message='.*`torch_dtype` is deprecated.*')
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
