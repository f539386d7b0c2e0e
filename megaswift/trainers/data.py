"""Step and micro-batch scheduling over items (packed rows or samples; see ``megaswift.template.collator``).

- ``StepSampler`` is a deterministic endless stream of items: epoch ``e`` is the permutation drawn from
  ``(seed, e)``; an optimizer step takes the next ``global_batch_size`` items (a step may straddle two epochs).
  Its only state is the number of items consumed, saved in checkpoints, so a resumed run sees the same items.
- Every rank derives the same step items; DP rank ``r`` takes micro-batch ``k`` =
  ``items[(k * dp + r) * mbs : (k * dp + r + 1) * mbs]``.
"""
from __future__ import annotations

import logging

import numpy as np

from ..utils.errors import TrainDataError

logger = logging.getLogger(__name__)


class StepSampler:
    """Deterministic endless item stream; a step takes the next ``global_batch_size`` items."""

    def __init__(self, num_items: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise TrainDataError('the training set is empty')
        self.num_items, self.global_batch_size = int(num_items), int(global_batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.consumed = 0  # items handed out so far: the resumable position
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_items) if self.shuffle
                     else np.arange(self.num_items))
            self._cached = (epoch, order)
        return self._cached[1]

    def items_at(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, idx = divmod(pos, self.num_items)
            out.append(int(self.epoch_order(epoch)[idx]))
        return out

    def next_step(self) -> list[int]:
        items = self.items_at(self.consumed, self.global_batch_size)
        self.consumed += self.global_batch_size
        return items

    @property
    def epoch(self) -> float:
        return self.consumed / self.num_items

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, int(np.ceil(epochs * self.num_items / self.global_batch_size)))

    def state_dict(self) -> dict:
        return {'consumed': self.consumed, 'num_items': self.num_items, 'global_batch_size': self.global_batch_size,
                'seed': self.seed, 'shuffle': self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if int(state['num_items']) != self.num_items:
            logger.warning('the checkpoint was trained on %s items, this dataset has %d: the data order differs '
                           'from the interrupted run', state['num_items'], self.num_items)
        self.consumed = int(state['consumed'])


def rank_micro_batches(step_items: list[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    per_pass = dp_size * micro_batch_size
    out = []
    for k in range(len(step_items) // per_pass):
        start = (k * dp_size + dp_rank) * micro_batch_size
        out.append(step_items[start:start + micro_batch_size])
    return out


def eval_micro_batches(num_items: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
    """This DP rank's share of every evaluation item, in micro-batches (the last one may be smaller)."""
    mine = list(range(dp_rank, num_items, dp_size))
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
