"""``losses``: the training objectives, by name (``--loss_type``; ``--external_plugins`` files register more)."""
from __future__ import annotations

from ...utils.registry import Registry

losses = Registry('loss')
