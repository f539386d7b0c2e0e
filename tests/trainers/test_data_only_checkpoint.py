"""Checkpoints are read as data only: a crafted pickle anywhere in one is refused with a clear error and runs
nothing (issue 17).

One real ``megaswift sft`` run saves a checkpoint; each case copies it and plants a payload that creates a marker
file when unpickled: in the tensor index (``.metadata``, which torch reads with plain ``pickle.load``), in a
non-tensor item of a ``.distcp`` file (which torch's load planner reads with ``torch.load(weights_only=False)``),
in ``common.pt`` and in the RNG states. Each payload is first shown to be live (unpickled the way torch would, it
creates the marker), then megaswift is shown to refuse it with the marker absent.
"""
from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from testing_utils import build_tiny_model
from train_cases import write_chat_data


class _Payload:
    """Unpickled, it opens (creates) ``marker`` for writing: proof that the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, smollm2_dir, run_cli):
    root = tmp_path_factory.mktemp('data_only')
    model = build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=4)
    data = write_chat_data(root / 'chat.jsonl', n=8, seed=1)
    args = ['--model', model, '--dataset', data, '--max_length', '64', '--global_batch_size', '4',
            '--max_steps', '1', '--save_steps', '1', '--save_safetensors', 'false', '--output_dir', root / 'out']
    run_cli(['sft', *args], env={'MEGASWIFT_CACHE': str(root / 'cache'), 'OMP_NUM_THREADS': '1'})
    return {'out': root / 'out', 'args': args[:-2], 'env': {'MEGASWIFT_CACHE': str(root / 'cache')}}


def _copy(trained, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / 'out'
    shutil.copytree(trained['out'], out)
    return out, out / 'iter_0000001'


def _plant_in_byte_item(ckpt: Path, marker: Path) -> None:
    """Point the index's first non-tensor item at a new file holding ``torch.save`` of the payload (the index
    itself stays a legitimate one)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    with open(ckpt / '.metadata', 'rb') as f:
        metadata = pickle.load(f)  # the untouched index saved by the run above
    index = next(i for i in metadata.storage_data if isinstance(metadata.state_dict_metadata[i.fqn],
                                                                 BytesStorageMetadata))
    buf = io.BytesIO()
    torch.save([_Payload(marker)], buf)
    (ckpt / '__9_0.distcp').write_bytes(buf.getvalue())
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = '__9_0.distcp', 0, len(buf.getvalue())
    with open(ckpt / '.metadata', 'wb') as f:
        pickle.dump(metadata, f)


def _live(kind: str, ckpt: Path, marker: Path) -> None:
    """Read the planted payload the way torch would without megaswift's checks."""
    if kind == 'index':
        from torch.distributed.checkpoint import FileSystemReader
        FileSystemReader(str(ckpt)).read_metadata()
    elif kind == 'byte_item':
        torch.load(ckpt / '__9_0.distcp', weights_only=False)
    else:
        torch.load(ckpt / ('common.pt' if kind == 'common' else 'rng/rank_00000.pt'), weights_only=False)


def _plant(kind: str, part: Path, marker: Path) -> Path:
    """Plant the payload; check it is live (read the unguarded way, it runs); return the file the error names."""
    if kind == 'index':
        with open(part / '.metadata', 'wb') as f:
            pickle.dump(_Payload(marker), f)
        named = part / '.metadata'
    elif kind == 'byte_item':
        _plant_in_byte_item(part, marker)
        named = part / '__9_0.distcp'
    else:
        named = part / ('common.pt' if kind == 'common' else 'rng/rank_00000.pt')
        torch.save({'payload': _Payload(marker)}, named)
    _live(kind, part, marker)  # positive control: the payload does run when read the unguarded way
    assert marker.is_file()
    marker.unlink()
    return named


@pytest.mark.parametrize('where', ['model', 'optim'])
@pytest.mark.parametrize('kind', ['index', 'byte_item', 'common'])
def test_data_only_check_refuses_every_kind_of_pickle(trained, tmp_path, kind, where):
    """The check megaswift runs on every checkpoint part before megatron-core loads it (in this process: only
    torch is imported)."""
    from megaswift.megatron.data_only_checkpoint import UnsafeCheckpointError, check_data_only, read_metadata
    _, ckpt = _copy(trained, tmp_path)
    part = ckpt / 'optim' if where == 'optim' else ckpt
    check_data_only(part, read_metadata(part))  # negative control: the untouched copy passes
    marker = tmp_path / 'pwned'
    named = _plant(kind, part, marker)
    with pytest.raises(UnsafeCheckpointError, match='refusing to read') as e:
        check_data_only(part, read_metadata(part))
    assert str(named) in str(e.value)
    assert not marker.exists(), 'the crafted pickle ran'


@pytest.mark.parametrize('kind, where', [('index', 'model'), ('byte_item', 'optim'), ('rng', 'model')])
def test_resume_from_a_crafted_checkpoint_fails_in_one_line_and_runs_nothing(trained, run_cli, tmp_path, kind,
                                                                             where):
    """``--resume_from_checkpoint true`` reaches the check for the model part, the optimizer part and the RNG
    states: one error line naming the file, exit 1, no new checkpoint, the payload never ran."""
    out, ckpt = _copy(trained, tmp_path)
    marker = tmp_path / 'pwned'
    named = _plant(kind, ckpt / 'optim' if where == 'optim' else ckpt, marker)
    proc = run_cli(['sft', *trained['args'], '--output_dir', out, '--resume_from_checkpoint', 'true',
                    '--max_steps', '2'], env=trained['env'], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('megaswift sft: error:')]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert str(named if kind != 'rng' else named.parent) in errors[0], errors[0]
    assert not marker.exists(), 'the crafted pickle ran'
    assert not (out / 'iter_0000002').exists()
