"""``RolloutClient``: the trainer's handle on a ``megaswift rollout`` server.

Every call has a connect and a read timeout. Calls that can be repeated safely (``/health``, ``/info``,
``/infer``, ``/reset_prefix_cache``) are retried with exponential backoff on connection errors only (refused,
reset, dropped); an HTTP error reply is never retried. ``/init_communicator`` and ``/update_weights`` are paired
with collectives on the other side and are not retried. A failure raises ``RolloutError`` naming the server, the
route, the attempts and the last response or error, instead of hanging.
"""
from __future__ import annotations

import datetime
import socket
import threading
import time
from typing import Any

import requests

from .weight_sync import (DEFAULT_BUCKET_MB, PROTOCOLS, RolloutError, default_backend, drop_group, join_named_group,
                          named_group_name, new_group)

__all__ = ['RolloutClient', 'RolloutError']


class RolloutClient:
    def __init__(self, base_url: str, api_key: str | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 600.0, retries: int = 3, backoff: float = 0.5):
        self.base_url = base_url.rstrip('/')
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.retries, self.backoff = retries, backoff
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy set in the environment must not sit between trainer and server
        if api_key:
            self.session.headers['Authorization'] = f'Bearer {api_key}'
        self.group = None
        self.backend = None
        self.protocol = 'megaswift'  # how the group is formed: the server's /info weight_sync_protocol
        self._store = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- HTTP
    def _call(self, method: str, route: str, body: dict | None = None, retry: bool = True,
              read_timeout: float | None = None) -> dict:
        url = f'{self.base_url}{route}'
        attempts = self.retries + 1 if retry else 1
        last = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self.session.request(method, url, json=body,
                                         timeout=(self.connect_timeout, read_timeout or self.read_timeout))
            except requests.Timeout as e:
                raise RolloutError(f'rollout server {self.base_url}: {method} {route} timed out '
                                   f'(connect {self.connect_timeout} s, read {read_timeout or self.read_timeout} s): '
                                   f'{e}') from None
            except requests.ConnectionError as e:
                last = e
                continue
            if r.status_code != 200:
                raise RolloutError(f'rollout server {self.base_url}: {method} {route} answered {r.status_code}: '
                                   f'{r.text[:2000]}')
            try:
                return r.json()
            except ValueError:
                raise RolloutError(f'rollout server {self.base_url}: {method} {route} answered 200 with a body '
                                   f'that is not JSON: {r.text[:500]!r}') from None
        raise RolloutError(f'rollout server {self.base_url} is unreachable or died during {method} {route} '
                           f'({attempts} attempt{"s" if attempts > 1 else ""}): {type(last).__name__}: {last}')

    def health(self) -> dict:
        return self._call('GET', '/health')

    def info(self) -> dict:
        """``{model, backend, world_size, weights_version, ...}``."""
        return self._call('GET', '/info')

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._call('GET', '/health', retry=False, read_timeout=5)
            except RolloutError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def infer(self, requests_: list[dict], **defaults: Any) -> dict:
        """``requests_``: ``{prompt_token_ids | messages, n, temperature, top_p, top_k, max_tokens, seed}`` each
        (``defaults`` fill what a request leaves out). Returns ``{weights_version, results: [{prompt_token_ids,
        completions: [{token_ids, logprobs, finish_reason}]}]}``."""
        body = {'requests': [{**defaults, **r} for r in requests_]}
        return self._call('POST', '/infer', body)

    def reset_prefix_cache(self) -> dict:
        return self._call('POST', '/reset_prefix_cache', {})

    def update_weights(self, layout: dict, last: bool, nbytes: int) -> dict:
        """One bucket's layout; its bytes follow as a broadcast on the group (``weight_sync``)."""
        return self._call('POST', '/update_weights', {**layout, 'last': last, 'nbytes': nbytes}, retry=False)

    # ---------------------------------------------------------------- communicator
    def init_communicator(self, host: str = '127.0.0.1', port: int = 0, backend: str | None = None,
                          timeout_s: float | None = None) -> None:
        """Host a TCPStore at ``host:port`` (0: a free port) and form the weight-sync group with the server's
        workers (the trainer is rank 0). ``host`` must be an address of this machine the server can reach."""
        backend = backend or default_backend()
        timeout_s = timeout_s or self.read_timeout
        self.close_communicator()
        info = self.info()
        world = 1 + int(info['world_size'])
        protocol = info.get('weight_sync_protocol', 'megaswift')
        if protocol not in PROTOCOLS:
            raise RolloutError(f'rollout server {self.base_url} forms its weight-sync group by {protocol!r}, which '
                               f'this client does not know ({", ".join(PROTOCOLS)})')
        store = torch_store(host, port, world, timeout_s)
        box: dict = {}

        def post():
            try:
                box['reply'] = self._call('POST', '/init_communicator',
                                          {'host': host, 'port': store.port, 'world_size': world,
                                           'backend': backend, 'timeout_s': timeout_s}, retry=False)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box['error'] = e

        poster = threading.Thread(target=post, daemon=True, name='rollout-init-communicator')
        poster.start()
        try:
            if protocol == 'named_group':
                group = join_named_group(store, 0, world, backend, timeout_s, named_group_name(store.port))
            else:
                group = new_group(store, 0, world, backend, timeout_s)
        except Exception as e:
            poster.join(timeout=self.connect_timeout)
            raise RolloutError(f'rollout server {self.base_url}: could not form the weight-sync group at '
                               f'{host}:{store.port}: {box.get("error", e)}') from e
        poster.join()
        if 'error' in box:
            raise box['error']
        self.group, self.backend, self.protocol, self._store = group, backend, protocol, store

    def close_communicator(self) -> None:
        group, self.group, self._store = self.group, None, None
        if group is None:
            return
        try:
            self._call('POST', '/close_communicator', {}, retry=False, read_timeout=self.connect_timeout * 2)
        except RolloutError:
            pass  # the server is gone: its end of the group went with it
        if hasattr(group, 'shutdown'):
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001
                pass
        if self.protocol == 'named_group':
            drop_group(group)

    def abandon_communicator(self) -> None:
        """Drop a group left mid-collective (the server refused a bucket): abort it, tell the server to close."""
        group, self.group, self._store = self.group, None, None
        if group is not None and hasattr(group, 'abort'):
            try:
                group.abort()
            except Exception:  # noqa: BLE001
                pass
        if group is not None and self.protocol == 'named_group':
            drop_group(group)
        try:
            self._call('POST', '/close_communicator', {}, retry=False, read_timeout=self.connect_timeout * 2)
        except RolloutError:
            pass

    def push_weights(self, models, parallel=None, bucket_mb: float | None = None) -> int:
        """``weight_sync.push_weights`` from global rank 0 (the other ranks call that function with no client);
        ``bucket_mb`` None: the server's ``--weight_sync_bucket_mb``."""
        from .weight_sync import push_weights
        if bucket_mb is None:
            bucket_mb = float(self.info().get('weight_sync_bucket_mb', DEFAULT_BUCKET_MB))
        return push_weights(models, self, parallel=parallel, bucket_mb=bucket_mb)

    def close(self) -> None:
        self.close_communicator()
        self.session.close()


def torch_store(host: str, port: int, world_size: int, timeout_s: float):
    import torch.distributed as dist
    try:
        return dist.TCPStore(host, port, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)
    except (RuntimeError, OSError, socket.error) as e:
        raise RolloutError(f'could not host the weight-sync store at {host}:{port}: {e}') from e

