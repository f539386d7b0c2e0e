"""Callbacks for the launch tests (loaded with --external_plugins; chosen with --callbacks):

- ``pause_after_log``: once step ``MEGASWIFT_TEST_PAUSE_STEP`` is in logging.jsonl (the default callbacks run
  first), sleeps ``MEGASWIFT_TEST_PAUSE_S`` seconds before the loop's end-of-step checks, so that a test can
  signal the job inside a known step;
- ``fail_on_rank``: rank ``MEGASWIFT_TEST_FAIL_RANK`` raises after step 1 (the time and the Slurm node go to
  ``MEGASWIFT_TEST_FAIL_STAMP``), while the other ranks go on into the next step's collectives.
"""
import os
import time

from megaswift.callbacks import Callback, register_callback
from megaswift.utils.dist import rank


@register_callback('pause_after_log')
class PauseAfterLog(Callback):
    def on_log(self, trainer, logs):
        if logs.get('step') == int(os.environ.get('MEGASWIFT_TEST_PAUSE_STEP', '3')):
            time.sleep(float(os.environ.get('MEGASWIFT_TEST_PAUSE_S', '5')))


@register_callback('fail_on_rank')
class FailOnRank(Callback):
    def on_step_end(self, trainer):
        if trainer.state.global_step == 1 and rank() == int(os.environ.get('MEGASWIFT_TEST_FAIL_RANK', '1')):
            with open(os.environ['MEGASWIFT_TEST_FAIL_STAMP'], 'w') as f:  # when, and on which node
                f.write(f"{time.time()} {os.environ.get('SLURMD_NODENAME', '')}")
            raise RuntimeError('injected failure for the launch test')
