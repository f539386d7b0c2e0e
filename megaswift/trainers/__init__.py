"""Training on megatron-core: the loop (``loop.py``), objectives (``objectives/``), vocab-parallel losses
(``loss.py``), step scheduling (``data.py``; the collator is ``megaswift.template.collator``), optimizers and
schedules (``optim.py``), checkpoints (``checkpoint.py``). ``megaswift.pipelines.train`` wires them to the
``sft`` / ``pt`` commands. Importing this package does not import megatron-core."""
from __future__ import annotations

from ..utils.lazy import lazy_getattr

_LAZY = {'Trainer': 'loop', 'TrainerState': 'loop', 'TrainData': 'loop', 'optimizers': 'optim',
         'param_group_hooks': 'optim', 'vocab_parallel_token_loss': 'loss',
         'StepSampler': 'data'}
__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
