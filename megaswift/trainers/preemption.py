"""Stop on SIGTERM / SIGUSR1 (``scancel``, a job's time limit, sbatch ``--signal=USR1@120``) at a step boundary,
with a checkpoint, so that ``--resume_from_checkpoint true`` in the next job continues the same trajectory.

The handler only records the signal. After every step the loop asks ``Preemption.stop_now``: the flag is
all-reduced (max) over the world, so every rank stops after the same step even when the signal reached only
some of them (Slurm signals each task; torchrun's agent forwards SIGTERM to its workers a moment later).
Handlers exist only while ``Trainer.train`` runs and only in the main thread (elsewhere nothing is installed and
``stop_now`` still joins the collective). An exception leaving the loop is reported here, with rank and host,
before the pipeline's clean-up closes the process group and the other ranks' failures follow.
"""
from __future__ import annotations

import logging
import signal
import threading

from ..utils.dist import any_rank, report_failure

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self):
        self.received = None     # the first signal's number
        self._previous = {}

    def __enter__(self) -> 'Preemption':
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, exc, _tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if isinstance(exc, Exception):  # say so before the pipeline's clean-up closes the process group
            report_failure(exc, 'megaswift train')

    def _record(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum
            logger.warning('received %s: stopping with a checkpoint after this step', signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether any rank received a signal (a collective: every rank calls it after the same step)."""
        return any_rank([self.received is not None])[0]

    def stop_now(self, trainer, saved: bool) -> bool:
        """True (after saving a checkpoint, unless this step was just ``saved``) when the run must stop."""
        if not self.requested():
            return False
        if not saved:
            trainer.save()
        logger.warning('stopped at step %d with a checkpoint; continue with --resume_from_checkpoint true',
                       trainer.state.global_step)
        return True
