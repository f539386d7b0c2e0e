"""Every tuner case in one ``torchrun --nproc_per_node 2`` launch; results go to a JSON file for pytest.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/tuners/dist_lora_cases.py OUT.json HF_DIR

Layouts (parallel_state is re-initialised between them): TP=1 (as DP=2: the reference), TP=2,
TP=2 + sequence parallel, PP=2. The same full random LoRA tensors are loaded at every layout.
OUT.json maps case -> [per-rank dict]; a failure is {'error': ..., 'traceback': ...}.
"""
from __future__ import annotations

import shutil
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/testing_utils.py
from testing_utils import write_case_results  # noqa: E402

B, S, SEED = 2, 16, 0
LORA = dict(tuner_type='lora', lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=['all-linear'])
results, saved = {}, {}


def rank():
    return torch.distributed.get_rank()


def record(name, fn):
    print(f'[rank {rank()}] {name}', flush=True)
    try:
        results[name] = fn() or {}
    except Exception as exc:  # noqa: BLE001 - reported to pytest
        results[name] = {'error': f'{type(exc).__name__}: {exc}', 'traceback': traceback.format_exc()[-3000:]}


current = {}  # 'parallel': the ParallelContext of the last layout(); models are built at it


def layout(tp=1, pp=1, sp=False):
    from megaswift.megatron import ParallelConfig, initialize_parallel
    current['parallel'] = initialize_parallel(ParallelConfig(tp, pp, None, sp), seed=1234)


def load(path, **kw):
    """Built at the current layout's context (megatron-core's state alone does not know sequence parallelism)."""
    from transformers import AutoConfig

    from megaswift.megatron import build_model, load_hf_weights
    models = build_model(AutoConfig.from_pretrained(path), parallel=current['parallel'], **kw)
    load_hf_weights(models, path, parallel=current['parallel'])
    return models


def lora_model(path, **args):
    from megaswift.tuners import prepare_model
    return prepare_model(load(path), SimpleNamespace(**{**LORA, **args}))


def ids():
    return torch.randint(0, 1000, (B, S), generator=torch.Generator().manual_seed(1))


def logits(models, train=False):
    """Full-vocab logits [b, s, padded vocab] (PP=1 only), gathered over TP."""
    from megatron.core import parallel_state
    (model,) = models
    model.train(train)
    x = ids()
    with torch.set_grad_enabled(train):
        out = model(input_ids=x, position_ids=torch.arange(S).expand(B, -1), attention_mask=None)
    if train:
        return out
    tp = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(tp.size())]
    torch.distributed.all_gather(parts, out.contiguous(), group=tp)
    return torch.cat(parts, dim=-1)


def lora_grads(models):
    """Backward of sum(logits * w); returns the full LoRA grads (rank 0) and whether only LoRA params got one."""
    from megatron.core import parallel_state

    from megaswift.tuners import lora_modules, lora_state_dict
    out = logits(models, train=True)
    tp = parallel_state.get_tensor_model_parallel_group()
    v = out.shape[-1]
    w = torch.randn(B, S, v * tp.size(), generator=torch.Generator().manual_seed(3))
    (out * w[..., tp.rank() * v:(tp.rank() + 1) * v]).sum().backward()
    grads = lora_state_dict(models, value=lambda p: p.grad)
    replica_diff = 0.0  # replicated LoRA tensors must get the same gradient on every TP rank
    for _, module, _ in lora_modules(models):
        for key, mode in module.lora_modes().items():
            g = getattr(module, key[:6]).weight.grad
            if mode is None and tp.size() > 1:
                parts = [torch.empty_like(g) for _ in range(tp.size())]
                torch.distributed.all_gather(parts, g.contiguous(), group=tp)
                replica_diff = max(replica_diff, maxdiff(parts[0], parts[1]))
    with_grad = sorted(n for n, p in models[0].named_parameters() if p.grad is not None)
    only_lora = all('.lora_' in n for n in with_grad) and len(with_grad) == sum(
        1 for n, p in models[0].named_parameters() if p.requires_grad)
    for p in models[0].parameters():
        p.grad = None
    return grads, only_lora, replica_diff


def random_lora(models):
    """Full random adapter tensors for ``models`` built at TP=1 (identical on every rank)."""
    from megaswift.tuners import lora_modules
    gen, full = torch.Generator().manual_seed(SEED), {}
    for gname, module, _ in sorted(lora_modules(models), key=lambda t: t[0]):
        for key in ('lora_A.weight', 'lora_B.weight'):
            full[f'{gname}.{key}'] = torch.randn(getattr(module, key[:6]).weight.shape, generator=gen) * 0.05
    return full


def maxdiff(a, b):
    return (a - b).abs().max().item()


def rel(got: dict, ref: dict):
    if set(got) != set(ref):
        return {'keys_equal': False}
    scale = max(t.abs().max().item() for t in ref.values())
    return {'keys_equal': True, 'rel_diff': max(maxdiff(got[k], ref[k]) for k in ref) / scale,
            'min_absmax': min(t.abs().max().item() for t in got.values())}


def lora_flow(lay, path, tmp):
    """init == base; random LoRA vs TP=1; grads vs TP=1; export; merge == LoRA."""
    from megaswift.megatron import hf_state_dict
    from megaswift.tuners import export_peft_adapter, load_lora_state_dict, lora_modules, lora_state_dict, merge_lora
    base = logits(load(path))
    models = lora_model(path)
    init = logits(models)
    trainable = sorted(n for n, p in models[0].named_parameters() if p.requires_grad)
    init_a_diff = 0.0  # the replicated A of column-parallel layers starts equal on every rank (TP and DP)
    for _, module, _ in lora_modules(models):
        if module.lora_parallel == 'col':
            parts = [torch.empty_like(module.lora_A.weight) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, module.lora_A.weight.detach().contiguous())
            init_a_diff = max(init_a_diff, maxdiff(parts[0], parts[1]))
    if lay == 'tp1':
        saved['full'] = random_lora(models)
    load_lora_state_dict(models, saved['full'])
    lora = logits(models)
    grads, only_lora, replica_diff = lora_grads(models)
    adapter = Path(tmp) / f'adapter_{lay}'
    export_peft_adapter(models, adapter)
    sd = lora_state_dict(models)
    merge_lora(models)
    merged = logits(models)
    left = [n for n, _ in models[0].named_parameters() if 'lora' in n]
    hf_merged = hf_state_dict(models)
    if lay == 'tp1':
        saved.update(lora=lora, grads=grads, merged=merged)
        if rank() == 0:
            torch.save({k: v for k, v in hf_merged.items()}, Path(tmp) / 'merged_hf.pt')
            torch.save(merged, Path(tmp) / 'merged_logits.pt')
    res = {'init_vs_base': maxdiff(init, base), 'lora_vs_base': maxdiff(lora, base),
           'merged_vs_lora': maxdiff(merged, lora), 'lora_absmax': lora.abs().max().item(),
           'lora_vs_tp1': maxdiff(lora, saved['lora']), 'merged_vs_tp1': maxdiff(merged, saved['merged']),
           'init_a_diff': init_a_diff, 'trainable': trainable, 'only_lora_grads': only_lora, 'replica_grad_diff': replica_diff, 'lora_left_after_merge': left,
           'class_after_merge': type(models[0].decoder.layers[0].self_attention.linear_qkv).__name__}
    if rank() == 0:
        res['grads'] = rel(grads, saved['grads'])
        res['state_dict'] = rel(sd, saved['full'])
        res['hf_export_count'] = len(hf_merged)
    return res


def pp_flow(path, tmp):
    from megaswift.tuners import export_peft_adapter, load_lora_state_dict, lora_state_dict
    models = lora_model(path)
    load_lora_state_dict(models, saved['full'])
    sd = lora_state_dict(models)
    export_peft_adapter(models, Path(tmp) / 'adapter_pp2')
    return {'count': len(sd), **(rel(sd, saved['full']) if rank() == 0 else {})}


def ddp_flow(path):
    """What a training loop does: mcore DDP + the pipeline schedule + finalize_model_grads; main_grad vs TP=1."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaswift.tuners import load_lora_state_dict, lora_state_dict
    models = lora_model(path)
    load_lora_state_dict(models, saved['full'])
    ddp = [DistributedDataParallel(m.config, DistributedDataParallelConfig(), m) for m in models]
    tp = parallel_state.get_tensor_model_parallel_group()
    batch = {'input_ids': ids(), 'position_ids': torch.arange(S).expand(B, -1), 'attention_mask': None}

    def loss(out):
        v = out.shape[-1]
        w = torch.randn(B, S, v * tp.size(), generator=torch.Generator().manual_seed(3))
        value = (out * w[..., tp.rank() * v:(tp.rank() + 1) * v]).sum()
        return value, {'loss': value.detach()}

    for m in ddp:
        m.train()
        m.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=lambda it, model: (model(**next(it)), loss),
                                data_iterator=iter([batch]), model=ddp, num_microbatches=1, seq_length=S,
                                micro_batch_size=B, forward_only=False)
    finalize_model_grads(ddp)
    grads = lora_state_dict(models, value=lambda p: p.main_grad)
    return rel(grads, saved['grads']) if rank() == 0 else {}


def checkpoint_flow(path, tmp):
    """LoRA model saved as a dist checkpoint at TP=2 (+SP), loaded at TP=1 (DP=2)."""
    from megaswift.megatron.checkpoint import load_mcore_checkpoint, save_mcore_checkpoint
    from megaswift.tuners import load_lora_state_dict, lora_state_dict
    layout(tp=2, sp=True)
    models = lora_model(path)
    load_lora_state_dict(models, saved['full'])
    ckpt = Path(tmp) / 'ckpt'
    save_mcore_checkpoint(models, ckpt, models[0].megaswift_info.hf_config)
    layout(tp=1)
    other = lora_model(path)  # a fresh adapter: A random, B zero
    load_mcore_checkpoint(other, ckpt)
    sd = lora_state_dict(other)
    return rel(sd, saved['full']) if rank() == 0 else {}


def recompute_flow(path):
    """Full activation recompute + frozen embedding: LoRA grads still flow (and equal the plain ones)."""
    from megaswift.tuners import load_lora_state_dict
    from megaswift.tuners.base import prepare_model
    over = dict(recompute_granularity='full', recompute_method='uniform', recompute_num_layers=1)
    models = prepare_model(load(path, config_overrides=over), SimpleNamespace(**LORA))
    load_lora_state_dict(models, saved['full'])
    grads, only_lora, replica_diff = lora_grads(models)
    hook = models[0].embedding._megaswift_grad_hook
    hook.remove()
    models[0].embedding._megaswift_grad_hook = None
    out = logits(models, train=True)
    res = {'only_lora': only_lora, 'without_hook_requires_grad': out.requires_grad}
    if rank() == 0:
        res.update(rel(grads, saved['grads']))
    return res


def dropout_flow(path):
    """LoRA dropout acts in training only, and only on the LoRA path."""
    from megatron.core import parallel_state

    from megaswift.tuners import load_lora_state_dict
    models = lora_model(path, lora_dropout=0.5)
    zero_b = maxdiff(logits(models, train=True).detach(), logits(models, train=True).detach())
    load_lora_state_dict(models, saved['full'])
    a, b = logits(models, train=True).detach(), logits(models, train=True).detach()
    # the replicated input of a column-parallel LoRA must see the same mask on every TP rank
    module = models[0].decoder.layers[0].mlp.linear_fc1
    seen, orig = [], module._lora_dropout
    module._lora_dropout = lambda x, sharded: seen.append(orig(x, sharded)) or seen[-1]
    logits(models, train=True)
    module._lora_dropout = orig
    tp = parallel_state.get_tensor_model_parallel_group()
    masks = [torch.empty_like(seen[0]) for _ in range(tp.size())]
    torch.distributed.all_gather(masks, seen[0].contiguous(), group=tp)
    return {'b0_train_diff': zero_b, 'train_vs_train': maxdiff(a, b), 'tp_ranks_same_mask': maxdiff(masks[0], masks[-1]),
            'zeros_frac': (seen[0] == 0).float().mean().item(), 'eval_vs_nodrop': maxdiff(logits(models), saved['lora'])}


def negative_flow(path):
    """Without the TP all-reduce of A's gradient under SP, the LoRA gradients are wrong (test sensitivity)."""
    from megatron.core.tensor_parallel import mappings

    from megaswift.tuners import load_lora_state_dict
    orig = mappings.copy_to_tensor_model_parallel_region
    mappings.copy_to_tensor_model_parallel_region = lambda x, group=None: x
    try:
        models = lora_model(path)
        load_lora_state_dict(models, saved['full'])
        grads, _, _ = lora_grads(models)
    finally:
        mappings.copy_to_tensor_model_parallel_region = orig
    return rel(grads, saved['grads']) if rank() == 0 else {}


def freeze_flow(path):
    from megaswift.tuners import TunerError, prepare_model

    def trainable(**args):
        models = prepare_model(load(path), SimpleNamespace(**args))
        return sorted(n for n, p in models[0].named_parameters() if p.requires_grad)

    def error(**args):
        try:
            prepare_model(load(path), SimpleNamespace(**args))
        except TunerError as e:
            return str(e)
        return None

    return {
        'all': sorted(n for n, _ in load(path)[0].named_parameters()),
        'full': trainable(tuner_type='full', freeze_parameters=['embedding', 'decoder.layers.0'],
                          trainable_parameters=['decoder.layers.0.mlp.linear_fc2']),
        'freeze_only_trainable': trainable(tuner_type='freeze', trainable_parameters=['decoder.final_layernorm',
                                                                                      'decoder.layers.1.self_attention']),
        'freeze_regex': trainable(tuner_type='freeze', freeze_parameters_regex=r'linear_fc1|embedding'),
        'lora_plus': trainable(**LORA, trainable_parameters=['decoder.final_layernorm']),
        'lora_qv': trainable(**{**LORA, 'target_modules': ['q_proj', 'v_proj', 'down_proj']}),
        'err_freeze_nothing': error(tuner_type='freeze'),
        'err_no_match': error(tuner_type='freeze', freeze_parameters=['decoder.layers.7']),
        'err_target': error(**{**LORA, 'target_modules': ['c_attn']}),
        'err_rank': error(**{**LORA, 'lora_rank': 0}),
        'err_tuner': error(tuner_type='adalora'),
    }


def main():
    out_path, path = sys.argv[1], sys.argv[2]
    import faulthandler
    import os
    faulthandler.dump_traceback_later(int(os.environ.get('MEGASWIFT_CASES_TIMEOUT', 240)), exit=True)
    tmp = Path(out_path).parent / 'work'
    from megaswift.megatron import destroy_parallel, initialize_parallel
    initialize_parallel()
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    for lay, kw in (('tp1', {}), ('tp2', dict(tp=2)), ('tp2sp', dict(tp=2, sp=True))):
        layout(**kw)
        record(f'{lay}/lora', lambda: lora_flow(lay, path, tmp))
        if 'full' not in saved:
            break
        if lay == 'tp1':
            record('tp1/recompute', lambda: recompute_flow(path))
            record('tp1/freeze', lambda: freeze_flow(path))
        record(f'{lay}/dropout', lambda: dropout_flow(path))
        if lay == 'tp2sp':
            record('tp2sp/ddp', lambda: ddp_flow(path))
    if 'full' in saved:
        record('tp2sp/negative/no_grad_allreduce', lambda: negative_flow(path))
    if 'full' in saved:
        layout(pp=2)
        record('pp2/export', lambda: pp_flow(path, tmp))
        record('pp2/ddp', lambda: ddp_flow(path))
        record('tp2sp_to_tp1/checkpoint', lambda: checkpoint_flow(path, tmp))
    write_case_results(results, out_path)
    torch.distributed.barrier()
    destroy_parallel(destroy_process_group=True)


if __name__ == '__main__':
    main()
