"""Weight sync between a megatron-core trainer and a rollout server: one mechanism for every backend.

The trainer's global rank 0 hosts a ``TCPStore``; it and the server's workers build a process group from that
store (gloo on CPU, NCCL on GPUs), independent of the trainer's default process group. A sync is a series of
buckets: for each, rank 0 posts the bucket's layout (HF names, shapes, dtypes) to ``/update_weights`` and, at the
same time, broadcasts the bucket's bytes as one flat ``uint8`` buffer; the server receives into a buffer of the
size the layout gives, then copies the tensors in place. The last bucket carries ``last: true``: the server then
bumps its weights version and resets its prefix cache.

Two ways of forming that group, advertised by the server's ``/info`` as ``weight_sync_protocol``:

- ``megaswift`` (the default): the process group is built directly on the trainer's store (``new_group``);
- ``named_group``: the group is built the way torch builds a named group (``join_named_group``: the store under
  a ``PrefixStore`` named after the group, then torch's own group constructor). SGLang's workers can only join a
  weight-update group this way (``Engine.init_weights_update_group``); the bytes sent are the same flat buckets.

Trainer side: ``push_weights(models, parallel, client, bucket_mb)`` (every rank calls it; the TP/PP gathers are
``iter_hf_weights``'s, one layer at a time, so no rank holds a full copy of the model) or
``push_named_tensors(client, pairs, bucket_mb)`` for any iterable of ``(hf_name, tensor)``.
Server side: ``WeightReceiver``.
"""
from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..utils.errors import UserError

DTYPES = {str(d).removeprefix('torch.'): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                                    torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool)}
DEFAULT_BUCKET_MB = 512


class RolloutError(UserError, RuntimeError):
    """The rollout server failed, refused or could not be reached; the message says which server and why (the
    CLI prints it as one line)."""


class WeightSyncError(RolloutError):
    """A bucket that could not be sent or applied; the message names the server and the tensor."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix('torch.')
    if name not in DTYPES:
        raise WeightSyncError(f'cannot sync tensors of dtype {dtype}')
    return name


def nbytes(shape, dtype: str) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=DTYPES[dtype]).element_size()


def new_group(store: torch.distributed.Store, rank: int, world_size: int, backend: str,
              timeout_s: float) -> torch.distributed.ProcessGroup:
    """A process group over ``store`` alone (not the default group): gloo or nccl."""
    timeout = datetime.timedelta(seconds=timeout_s)
    dist = torch.distributed
    if backend == 'gloo':
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == 'nccl':
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise WeightSyncError(f"unknown weight-sync backend {backend!r} (gloo | nccl)")


PROTOCOLS = ('megaswift', 'named_group')


def named_group_name(port: int) -> str:
    """The name both ends give a ``named_group`` group formed on the store at ``port``."""
    return f'megaswift-weight-sync-{port}'


def join_named_group(store: torch.distributed.Store, rank: int, world_size: int, backend: str,
                     timeout_s: float, group_name: str) -> torch.distributed.ProcessGroup:
    """A group over ``store`` built as torch builds a named group: ``PrefixStore(group_name, store)`` handed to
    torch's group constructor under ``group_name`` (the store keys and per-device backends then match SGLang's
    ``init_custom_process_group`` on the same torch). A group left under the same name in this process is
    dropped first."""
    from torch.distributed import distributed_c10d as c10d
    if torch.distributed.is_initialized() and c10d._get_default_group().bound_device_id is not None:
        # torch would split this group from the default group's communicator: a collective the other ranks of
        # the default group never join
        raise WeightSyncError('a named weight-sync group cannot be formed while the default process group is bound '
                              'to a device (init_process_group(device_id=...))')
    for group, name in list(c10d._world.pg_names.items()):
        if name == group_name:
            drop_group(group)
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend),
                                              c10d.PrefixStore(group_name, store), group_name=group_name,
                                              timeout=datetime.timedelta(seconds=timeout_s))
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def drop_group(group) -> None:
    """Forget a named group (its name becomes free again); a group torch does not know is left alone."""
    try:
        torch.distributed.destroy_process_group(group)
    except Exception:  # noqa: BLE001 - not registered, or its peer is gone
        pass


def broadcast_device(protocol: str, backend: str) -> torch.device:
    """Where a bucket's bytes live while broadcast. A named gloo group holds one gloo context per device type and
    picks it by the tensor's device: SGLang broadcasts CUDA tensors, so the trainer does too when it can."""
    if backend == 'nccl' or (protocol == 'named_group' and torch.cuda.is_available()):
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def default_backend() -> str:
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def broadcast(group, tensor: torch.Tensor, src: int = 0) -> None:
    group.broadcast(tensor, src).wait()


# ---------------------------------------------------------------- buckets
@dataclass
class Bucket:
    names: list[str]
    shapes: list[list[int]]
    dtypes: list[str]
    tensors: list[torch.Tensor]

    def layout(self) -> dict:
        return {'names': self.names, 'shapes': self.shapes, 'dtypes': self.dtypes}

    def flat(self, device) -> torch.Tensor:
        """The bucket's bytes, tensor after tensor, as one uint8 buffer."""
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in self.tensors]
        return torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.uint8, device=device)


def buckets(pairs: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` into buckets of at most ``bucket_mb`` MiB (a larger tensor goes alone)."""
    limit = max(1, int(bucket_mb * 1024 * 1024))
    cur, size = Bucket([], [], [], []), 0
    for name, t in pairs:
        n = t.numel() * t.element_size()
        if cur.names and size + n > limit:
            yield cur
            cur, size = Bucket([], [], [], []), 0
        cur.names.append(name)
        cur.shapes.append(list(t.shape))
        cur.dtypes.append(dtype_name(t.dtype))
        cur.tensors.append(t)
        size += n
    yield cur  # the last one (maybe empty): it carries ``last``


def buckets_with_last(pairs: Iterable[tuple[str, torch.Tensor]], bucket_mb: float) -> Iterator[tuple[Bucket, bool]]:
    """``buckets`` with whether each is the last one (the one that carries ``last``: version bump, cache reset)."""
    it = buckets(pairs, bucket_mb)
    bucket = next(it)
    while bucket is not None:
        nxt = next(it, None)  # look ahead: the last bucket is the one with no successor
        yield bucket, nxt is None
        bucket = nxt


def unflatten(flat: torch.Tensor, layout: dict) -> list[tuple[str, torch.Tensor]]:
    out, off = [], 0
    for name, shape, dtype in zip(layout['names'], layout['shapes'], layout['dtypes']):
        n = nbytes(shape, dtype)
        out.append((name, flat[off:off + n].view(DTYPES[dtype]).reshape(shape)))
        off += n
    return out


# ---------------------------------------------------------------- trainer side
def push_named_tensors(client, pairs: Iterable[tuple[str, torch.Tensor]],
                       bucket_mb: float = DEFAULT_BUCKET_MB) -> int:
    """Send every ``(hf_name, tensor)`` to the server behind ``client`` (its communicator initialised); returns
    the server's new weights version. Each bucket's HTTP call runs in a thread while this thread broadcasts."""
    group = client.group
    if group is None:
        raise WeightSyncError(f'no communicator with the rollout server at {client.base_url}: '
                              'call client.init_communicator() first')
    device = broadcast_device(getattr(client, 'protocol', 'megaswift'), client.backend)
    reply = None
    for bucket, last in buckets_with_last(pairs, bucket_mb):
        reply = _send_bucket(client, group, bucket, last=last, device=device)
    return int(reply['weights_version'])


def _send_bucket(client, group, bucket: Bucket, last: bool, device) -> dict:
    flat = bucket.flat(device)
    box: dict = {}

    def post():
        try:
            box['reply'] = client.update_weights(bucket.layout(), last=last, nbytes=int(flat.numel()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box['error'] = e

    poster = threading.Thread(target=post, daemon=True, name='rollout-update-weights')
    poster.start()
    try:
        work = group.broadcast(flat, 0) if flat.numel() else None
        while work is not None and not work.is_completed():
            if not poster.is_alive() and 'error' in box:
                # the server refused the bucket and will never join this broadcast: do not wait for the timeout
                client.abandon_communicator()
                raise box['error']
            time.sleep(0.002)
        if work is not None:
            work.wait()
    except RolloutError:
        raise
    except Exception as e:  # the server died or left the group
        poster.join(timeout=client.read_timeout)
        cause = box.get('error', e)
        raise WeightSyncError(f'weight sync to the rollout server at {client.base_url} failed while broadcasting '
                              f'a bucket of {len(bucket.names)} tensors (first {bucket.names[:1]}): {cause}') from e
    poster.join()
    if 'error' in box:
        raise box['error']
    return box['reply']


def has_lora(models) -> bool:
    from ..megatron import unwrap_model
    return any(hasattr(m, 'lora_merged_weight') for model in models for m in unwrap_model(model).modules())


def push_weights(models, client, *, parallel=None, bucket_mb: float = DEFAULT_BUCKET_MB,
                 adapted_only: bool | None = None) -> int | None:
    """Push the megatron-core ``models`` (this rank's chunks) to the rollout server. Every rank of the trainer
    calls this (the TP/PP gathers need them all); ``client`` is used on global rank 0 only and may be None
    elsewhere. Returns the server's new weights version on rank 0, None on the other ranks.

    A model with LoRA adapters sends its adapted weights only, merged (``W + scaling * B @ A``): the server holds
    the base model, whose other weights LoRA training never changes (``adapted_only``: None = so when the models
    have adapters).

    A failure on rank 0 (the server died or refused a bucket) is raised on every rank as ``WeightSyncError``,
    after the remaining gathers ran (so no rank is left waiting in one)."""
    from ..megatron.convert import iter_hf_weights
    dist = torch.distributed
    adapted_only = has_lora(models) if adapted_only is None else adapted_only
    pairs = iter_hf_weights(models, parallel=parallel, adapted_only=adapted_only)
    rank = dist.get_rank() if dist.is_initialized() else 0
    error, version = None, None
    if rank == 0:
        try:
            if client is None:
                raise WeightSyncError('push_weights: global rank 0 needs a RolloutClient')
            version = push_named_tensors(client, pairs, bucket_mb)
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            error = e
    for _ in pairs:  # rank 0 after a failure, the other ranks always: drive the remaining gathers
        pass
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [None if error is None else f'{type(error).__name__}: {error}']
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            raise WeightSyncError(f'weight sync failed on rank 0: {box[0]}')
    if error is not None:
        raise error
    return version


# ---------------------------------------------------------------- server side
def checkpoint_params(model_dir: str) -> dict:
    """HF name -> a meta tensor of its shape, from the safetensors headers in ``model_dir``: what a push may send to
    an engine that keeps no such table of its own (vLLM, SGLang); a tied ``lm_head.weight`` too, with the
    embedding's shape. Empty without safetensors files."""
    from pathlib import Path

    from safetensors import safe_open
    params = {}
    for path in sorted(Path(model_dir).glob('*.safetensors')):
        with safe_open(str(path), framework='pt') as f:
            for name in f.keys():
                params[name] = torch.empty(f.get_slice(name).get_shape(), device='meta')
    embed = params.get('model.embed_tokens.weight')
    if embed is not None:
        params.setdefault('lm_head.weight', embed)
    return params


class WeightReceiver:
    """The server's end of the group: ``join`` at ``/init_communicator``, ``receive`` per ``/update_weights``."""

    def __init__(self):
        self.group = None
        self.backend = None
        self.store = None

    def join(self, host: str, port: int, world_size: int, rank: int, backend: str, timeout_s: float) -> None:
        self.close()
        self.store = torch.distributed.TCPStore(host, port, world_size, False,
                                                timeout=datetime.timedelta(seconds=timeout_s))
        self.group = new_group(self.store, rank, world_size, backend, timeout_s)
        self.backend = backend

    def receive(self, layout: dict, device) -> list[tuple[str, torch.Tensor]]:
        if self.group is None:
            raise WeightSyncError('no communicator: call /init_communicator first')
        total = sum(nbytes(s, d) for s, d in zip(layout['shapes'], layout['dtypes']))
        flat = torch.empty(total, dtype=torch.uint8, device=device if self.backend == 'nccl' else 'cpu')
        if total:
            broadcast(self.group, flat)
        return unflatten(flat, layout)

    def close(self) -> None:
        group, self.group, self.store = self.group, None, None
        if group is not None and hasattr(group, 'shutdown'):
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass
