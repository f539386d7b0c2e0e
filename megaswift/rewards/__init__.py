"""Reward functions (ORMs and PRMs) behind one calling convention; see :mod:`.base`.

``get_orm`` / ``get_prm`` turn a ``--orm_model`` / ``--prm_model`` value into a callable:
a registry key (built-ins, plus whatever ``--external_plugins`` files registered), or a reward
model checkpoint (local directory or ``org/name`` hub id) loaded as :class:`RewardModelPRM`.
"""
from __future__ import annotations

import os
import re
from typing import Any

from .base import ORM, PRM, ReducedReward, orms, prms, reduce_reward, score_completions
from ..utils.registry import UnknownPluginError
from .orm import CosineReward, Format, MathAccuracy, MathORM, ReActFormat, RepetitionPenalty, SoftOverlong
from .prm import ClientPRM, RewardModelPRM, reward_model_from_path

_HUB_ID_RE = re.compile(r'[A-Za-z0-9][\w.\-]*/[\w.\-]+')


def looks_like_model(name: str) -> bool:
    """An existing local directory, or a hub id of the form ``org/name``."""
    return os.path.isdir(os.path.expanduser(name)) or bool(_HUB_ID_RE.fullmatch(name))


#: An ``--orm_model`` / ``--prm_model`` that is neither registered nor a model (the registry's error).
UnknownRewardError = UnknownPluginError


def get_orm(name_or_path: str, **kwargs: Any) -> ORM:
    """An ORM instance: ``orms[name](**kwargs)``, or a reward model checkpoint.

    A checkpoint is wrapped in :class:`ReducedReward` so it returns one float per completion
    (a process model's per-step list reduced to its minimum); the model is at ``.prm``.
    """
    if name_or_path not in orms and looks_like_model(name_or_path):
        return ReducedReward(reward_model_from_path(name_or_path, **kwargs))
    return orms.lookup(name_or_path, '--orm_model')(**kwargs)


def get_prm(name_or_path: str, **kwargs: Any) -> PRM:
    """A PRM instance: ``prms[name](**kwargs)``, or ``RewardModelPRM(model=name_or_path, **kwargs)``."""
    if name_or_path not in prms and looks_like_model(name_or_path):
        return reward_model_from_path(name_or_path, **kwargs)
    return prms.lookup(name_or_path, '--prm_model')(**kwargs)


__all__ = ['ORM', 'PRM', 'orms', 'prms', 'get_orm', 'get_prm', 'reduce_reward', 'score_completions', 'ReducedReward', 'looks_like_model',
           'MathORM', 'MathAccuracy', 'Format', 'ReActFormat', 'CosineReward', 'RepetitionPenalty', 'SoftOverlong',
           'RewardModelPRM', 'ClientPRM', 'reward_model_from_path']
