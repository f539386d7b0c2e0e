"""The sample output file: written batch by batch, resumable, never left looking complete when it is not.

Files, for an output ``X.jsonl``:
- ``X.jsonl.part``: kept lines so far, appended and fsync'ed once per batch;
- ``X.jsonl.state.json``: the next batch to run, the committed size of ``.part``, counters and
  the fingerprint of the arguments that shape the output (written atomically after the lines);
- ``X.jsonl``: appears only when the run finishes (``.part`` renamed), with ``X.jsonl.meta.json``.
Each output file has its own state, so shards in one directory never share resume state. No file (nor the
output folder) is made before the inputs and the model are ready, and a run that fails before its first batch is
committed removes what it made; an earlier run's resumable files are never removed.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..utils.errors import UserError
from ..utils.paths import atomic_write_json

logger = logging.getLogger(__name__)


class OutputError(UserError, ValueError):
    pass


def default_output_file(shard: tuple[int, int] | None) -> str:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f'{stamp}.jsonl' if shard is None else f'{stamp}-shard{shard[0]}of{shard[1]}.jsonl'


def find_resumable(output_dir: Path, shard: tuple[int, int] | None, fingerprint: dict) -> str | None:
    """The newest unfinished output in ``output_dir`` for this shard and these arguments."""
    suffix = '.jsonl' if shard is None else f'-shard{shard[0]}of{shard[1]}.jsonl'
    found = []
    for state_path in output_dir.glob('*.jsonl.state.json'):
        name = state_path.name[:-len('.state.json')]
        if not name.endswith(suffix) or (shard is None and '-shard' in name):
            continue
        try:
            state = read_state(state_path)
        except OutputError:  # not a run this one can continue
            continue
        if state['fingerprint'] == fingerprint:
            found.append((state_path.stat().st_mtime, name))
    return max(found)[1] if found else None


STATE_KEYS = {'next_batch': int, 'bytes': int, 'stats': dict, 'fingerprint': dict}


def read_state(path: Path) -> dict[str, Any]:
    """The state file of an unfinished run; one that is not what ``SampleOutput`` writes is an ``OutputError``."""
    try:
        state = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f'cannot resume from {path}: it is unreadable or not JSON ({e})') from None
    wrong = [k for k, kind in STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise OutputError(f'cannot resume from {path}: it is not a sample state file (bad or missing: '
                          f"{', '.join(wrong)}); pass --override_exist_file true to start over")
    return state


class SampleOutput:
    """Validated when made (nothing is written then); ``open`` creates or truncates the files once the model is
    loaded, and ``abandon`` removes what a failed run created before its first batch was committed."""

    def __init__(self, output_dir: str, output_file: str, fingerprint: dict[str, Any], resume: bool, override: bool):
        self.dir = Path(output_dir)
        self.path = self.dir / output_file
        self.part = self.path.with_name(self.path.name + '.part')
        self.state_path = self.path.with_name(self.path.name + '.state.json')
        self.fingerprint = fingerprint
        self.resume = resume
        self.next_batch = 0
        self.stats: dict[str, int] = {}
        self._resume_bytes = 0
        self._created: list[Path] = []  # what ``open`` made: removed by ``abandon`` until a batch is committed
        if resume:
            self._check_resume()
        elif not override:
            self._check_fresh()

    def _check_fresh(self) -> None:
        if self.path.exists():
            raise OutputError(f'{self.path} already exists; pass --override_exist_file true to replace it, '
                              f'or choose another --output_file')
        if self.state_path.exists() or self.part.exists():
            raise OutputError(f'an unfinished run of {self.path} exists; pass --resume true to continue it '
                              f'or --override_exist_file true to start over')

    def _check_resume(self) -> None:
        if not self.state_path.exists():
            if self.path.exists():
                raise OutputError(f'{self.path} is already complete: nothing to resume')
            raise OutputError(f'no unfinished run of {self.path} to resume ({self.state_path.name} is missing)')
        state = read_state(self.state_path)
        if state['fingerprint'] != self.fingerprint:
            diff = sorted(k for k in set(state['fingerprint']) | set(self.fingerprint)
                          if state['fingerprint'].get(k) != self.fingerprint.get(k))
            raise OutputError(f'cannot resume {self.path}: these arguments differ from the interrupted run: '
                              + ', '.join(f'{k} (was {state["fingerprint"].get(k)!r}, now {self.fingerprint.get(k)!r})'
                                          for k in diff))
        size = self.part.stat().st_size if self.part.exists() else -1
        if size < state['bytes']:
            raise OutputError(f'cannot resume {self.path}: {self.part.name} has {size} bytes, '
                              f'the state file recorded {state["bytes"]}; the partial output was modified')
        self._resume_bytes = state['bytes']
        self.next_batch = state['next_batch']
        self.stats = state['stats']

    def open(self) -> None:
        """Create the output files (a fresh run) or cut the partial output back to its last committed batch."""
        if self.resume:
            with open(self.part, 'r+b') as f:
                f.truncate(self._resume_bytes)  # drop lines of a batch that was written but never committed
            logger.info('resuming %s at batch %d (%d lines kept so far)', self.path, self.next_batch,
                        self.stats.get('lines', 0))
            return
        missing = [p for p in (self.dir, *self.dir.parents) if not p.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._created = [p for p in (self.part, self.state_path) if not p.exists()] + missing
        self.part.write_bytes(b'')
        self._write_state()

    def abandon(self) -> None:
        """After a failure: remove the files and folders ``open`` created if no batch was committed since; a
        resumed run's files, and a fresh run's after its first batch, stay for ``--resume``."""
        for path in self._created:
            with contextlib.suppress(OSError):  # a folder someone else wrote into stays
                path.rmdir() if path.is_dir() else path.unlink()
        self._created = []

    def _write_state(self) -> None:
        size = self.part.stat().st_size
        atomic_write_json(self.state_path, {'next_batch': self.next_batch, 'bytes': size, 'stats': self.stats,
                                            'fingerprint': self.fingerprint})

    def commit(self, lines: list[dict], next_batch: int, stats: dict[str, int]) -> None:
        """Append one batch's lines durably, then record that the batch is done."""
        if lines:
            with open(self.part, 'ab') as f:
                f.write(''.join(json.dumps(x, ensure_ascii=False) + '\n' for x in lines).encode('utf-8'))
                f.flush()
                os.fsync(f.fileno())
        self.next_batch = next_batch
        self.stats = dict(stats)
        self._write_state()
        self._created = []  # resumable from here on

    def finish(self, meta: dict[str, Any]) -> Path:
        os.replace(self.part, self.path)
        atomic_write_json(self.path.with_name(self.path.name + '.meta.json'), {**meta, 'stats': self.stats})
        self.state_path.unlink()
        return self.path
