"""The trainer side of the rollout tests: megatron-core models that talk to a running ``megaswift rollout``.

    python tests/rollout/trainer_case.py OUT.json SETUP.json                                  # world size 1
    python -m torch.distributed.run --nproc_per_node 2 --standalone trainer_case.py OUT SETUP   # world size 2

SETUP: {url, model_a, model_b, prompt, max_tokens, bucket_mb}. World size 1 (TP=1): the server's log-probs
against megatron-core's on model A (aligned and shifted by one), then a push of model B and the same check.
World size 2: a push the server refuses (every rank must raise), a push of A from TP=2, then a push of B from
PP=2; after each, the server's seeded sample.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import requests
import torch


def sample(client, prompt, max_tokens):
    """One seeded sample (temperature 1: varied tokens; the log-probs are the model's own either way)."""
    reply = client.infer([{'prompt_token_ids': prompt, 'temperature': 1.0, 'seed': 7, 'max_tokens': max_tokens}])
    c = reply['results'][0]['completions'][0]
    return {'token_ids': c['token_ids'], 'logprobs': c['logprobs'], 'finish_reason': c['finish_reason'],
            'weights_version': reply['weights_version']}


@torch.no_grad()
def mcore_token_logprobs(models, ids: list[int], prompt_len: int) -> tuple[list[float], list[float]]:
    """log p(ids[t] | ids[:t]) for the completion positions t >= prompt_len, from one megatron-core forward:
    the logits at position t-1 score token t. Also the misaligned reading (logits at t), the anchor bug."""
    from megaswift.megatron.forward import model_forward
    x = torch.tensor([ids])
    batch = {'input_ids': x, 'position_ids': torch.arange(len(ids)).unsqueeze(0)}
    model = models[0]
    model.eval()
    logp = model_forward(model, batch).float().log_softmax(-1)[0]  # [s, vocab]
    target = x[0, prompt_len:]
    aligned = logp[prompt_len - 1:-1].gather(-1, target[:, None]).squeeze(-1)
    shifted = logp[prompt_len:].gather(-1, target[:, None]).squeeze(-1)
    return aligned.tolist(), shifted.tolist()


def load(path, parallel):
    from transformers import AutoConfig

    from megaswift.megatron import build_model, load_hf_weights
    models = build_model(AutoConfig.from_pretrained(path), parallel=parallel)
    load_hf_weights(models, path, parallel=parallel)
    return models


def world1(setup, client) -> dict:
    from megaswift.megatron import ParallelConfig, initialize_parallel
    ctx = initialize_parallel(ParallelConfig())
    prompt, max_tokens = setup['prompt'], setup['max_tokens']
    out = {'info_before': client.info()}
    before = out['before'] = sample(client, prompt, max_tokens)
    ids = prompt + before['token_ids']
    out['mcore_a'], out['mcore_a_shifted'] = mcore_token_logprobs(load(setup['model_a'], ctx), ids, len(prompt))
    models_b = load(setup['model_b'], ctx)
    out['mcore_b_on_a_completion'], _ = mcore_token_logprobs(models_b, ids, len(prompt))
    client.init_communicator()
    t0 = time.perf_counter()
    out['pushed_version'] = client.push_weights(models_b, ctx)  # the server's --weight_sync_bucket_mb
    out['push_s'] = time.perf_counter() - t0
    after = out['after'] = sample(client, prompt, max_tokens)
    out['mcore_b'], _ = mcore_token_logprobs(models_b, prompt + after['token_ids'], len(prompt))
    out['info_after'] = client.info()
    out['lora'] = lora_push(setup, client, ctx)
    client.close_communicator()
    return out


def lora_push(setup, client, ctx) -> dict:
    """Model A pushed whole (the base), then A with LoRA adapters (B random, so they change the model): the second
    push sends only the adapted weights, merged; the server then serves the adapted model."""
    from megaswift.megatron.convert import iter_hf_weights
    from megaswift.tuners.lora import LoraConfig, add_lora, lora_modules
    models = load(setup['model_a'], ctx)
    out = {'base_version': client.push_weights(models, ctx)}
    add_lora(models, LoraConfig(rank=4, alpha=8.0, target_modules=('linear_qkv', 'linear_fc2')), parallel=ctx)
    g = torch.Generator().manual_seed(0)
    for _, module, _ in lora_modules(models):
        module.lora_B.weight.data.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.5)
    out['sent'] = [name for name, _ in iter_hf_weights(models, parallel=ctx, adapted_only=True)]
    out['all'] = [name for name, _ in iter_hf_weights(models, parallel=ctx)]
    out['version'] = client.push_weights(models, ctx)
    s = out['sample'] = sample(client, setup['prompt'], setup['max_tokens'])
    out['mcore'], _ = mcore_token_logprobs(models, setup['prompt'] + s['token_ids'], len(setup['prompt']))
    base = load(setup['model_a'], ctx)  # negative control: the base model on the same tokens
    out['mcore_base'], _ = mcore_token_logprobs(base, setup['prompt'] + s['token_ids'], len(setup['prompt']))
    return out


def world2(setup, client) -> dict:
    from megaswift.megatron import ParallelConfig, destroy_parallel, initialize_parallel
    rank = torch.distributed.get_rank()
    out = {}
    if rank == 0:
        client.init_communicator()
    for name, cfg, model in (('tp2', ParallelConfig(tensor_model_parallel_size=2), setup['model_a']),
                             ('pp2', ParallelConfig(pipeline_model_parallel_size=2), setup['model_b'])):
        ctx = initialize_parallel(cfg)
        models = load(model, ctx)
        from megaswift.rollout import push_weights
        if name == 'tp2':  # a push the server refuses (its end of the group closed): every rank gets the error
            if rank == 0:
                requests.post(f"{setup['url']}/close_communicator", json={}, timeout=30).raise_for_status()
            try:
                push_weights(models, client if rank == 0 else None, parallel=ctx, bucket_mb=setup['bucket_mb'])
                out[f'refused_rank{rank}'] = None
            except Exception as e:  # noqa: BLE001 - reported
                out[f'refused_rank{rank}'] = f'{type(e).__name__}: {e}'
            if rank == 0:
                out['info_after_refused'] = client.info()
                client.init_communicator()
        version = push_weights(models, client if rank == 0 else None, parallel=ctx, bucket_mb=setup['bucket_mb'])
        if rank == 0:
            out[name] = {'pushed_version': version, **sample(client, setup['prompt'], setup['max_tokens'])}
        torch.distributed.barrier()
        destroy_parallel()
    if rank == 0:
        client.close_communicator()
    return out


def main():
    out_path, setup_path = sys.argv[1], sys.argv[2]
    import faulthandler
    faulthandler.dump_traceback_later(240, exit=True)
    setup = json.loads(Path(setup_path).read_text())
    from megaswift.megatron.parallel import _init_process_group
    _init_process_group()
    from megaswift.rollout import RolloutClient
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    client = RolloutClient(setup['url'], read_timeout=120) if rank == 0 else None
    out = world1(setup, client) if world == 1 else world2(setup, client)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, out)
    if rank == 0:
        Path(out_path).write_text(json.dumps({f'world{world}': {k: v for o in gathered for k, v in o.items()}}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
