"""Every rank must resume the same checkpoint: two gloo ranks that resolved different ``iter_*`` directories (a
node whose view of the shared file system lags) both stop with one error naming each rank, host and path; the
same directory on both passes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from launch_utils import free_port

pytestmark = pytest.mark.slow


def _rank(rank: int, port: int, out: str, paths: list) -> None:
    import torch.distributed as dist

    from megaswift.trainers.checkpoint import CheckpointError, check_same_checkpoint_on_every_rank
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    result = 'ok'
    try:
        check_same_checkpoint_on_every_rank(Path(paths[rank]))
    except CheckpointError as e:
        result = str(e)
    Path(out, f'rank{rank}.json').write_text(json.dumps(result))
    dist.destroy_process_group()


def run(tmp_path, paths) -> list:
    mp.spawn(_rank, args=(free_port(), str(tmp_path), paths), nprocs=2, join=True)
    return [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]


def test_ranks_that_would_resume_different_steps_fail_together(tmp_path):
    a, b = tmp_path / 'out' / 'iter_0000002', tmp_path / 'out' / 'iter_0000004'
    got = run(tmp_path, [str(a), str(b)])
    assert got[0] == got[1] and 'different checkpoints' in got[0], got
    assert 'rank 0 on ' in got[0] and str(a) in got[0] and str(b) in got[0], got
    assert run(tmp_path, [str(a), str(a)]) == ['ok', 'ok']  # the control: the same step passes
