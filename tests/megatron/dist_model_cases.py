"""Every megatron model case for one world size, in one launch; results go to a JSON file for pytest.

    python tests/megatron/dist_model_cases.py OUT.json MANIFEST.json                   # world size 1
    python -m torch.distributed.run --nproc_per_node 2 --standalone \\
        tests/megatron/dist_model_cases.py OUT.json MANIFEST.json                      # world size 2

parallel_state is re-initialised between layouts. OUT.json maps case -> [per-rank dict]; a rank
that has nothing to report for a case leaves its dict empty, and a failure is {'error': ...}.
"""
from __future__ import annotations

import itertools
import json
import shutil
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/testing_utils.py
from mcore_tiny import SEQ, VOCAB  # noqa: E402
from testing_utils import write_case_results  # noqa: E402

PACKED_LENS = (5, 8, 3)  # total 16: divisible by TP=2 for sequence parallelism
_hf_cache = {}
results = {}


def hf_model(path):
    if path not in _hf_cache:
        from transformers import AutoModelForCausalLM
        _hf_cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _hf_cache[path]


@torch.no_grad()
def hf_logits(path, ids):
    return hf_model(path)(ids).logits


def sample_ids(seed=1, shape=(2, SEQ)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def mcore_logits(models, ids, packed_lens=None):
    """Logits [b, s, vocab] on the last pipeline stage (None elsewhere), through mcore's schedules."""
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.pipeline_parallel import get_forward_backward_func
    b, s = ids.shape
    batch = {'input_ids': ids, 'position_ids': torch.arange(s).unsqueeze(0).expand(b, -1), 'attention_mask': None}
    if packed_lens:
        cu = torch.tensor([0, *itertools.accumulate(packed_lens)], dtype=torch.int32)
        batch['position_ids'] = torch.cat([torch.arange(n) for n in packed_lens]).unsqueeze(0)
        batch['packed_seq_params'] = PackedSeqParams(qkv_format='thd', cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                     max_seqlen_q=max(packed_lens), max_seqlen_kv=max(packed_lens))
    for m in models:
        m.eval()

    def step(data_iterator, model):
        return model(**next(data_iterator)), (lambda out, non_loss_data=True: out.detach())

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    data = [itertools.repeat(batch) for _ in models]
    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=data if len(models) > 1 else data[0], model=models,
        num_microbatches=pp, seq_length=s, micro_batch_size=b, forward_only=True, collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = out[0]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group.size() > 1:
        parts = [torch.empty_like(logits) for _ in range(tp_group.size())]
        torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits


def record(name, fn):
    print(f'[rank {torch.distributed.get_rank()}] {name}', flush=True)
    try:
        results[name] = fn() or {}
    except Exception as exc:  # noqa: BLE001 - reported to pytest
        results[name] = {'error': f'{type(exc).__name__}: {exc}', 'traceback': traceback.format_exc()[-3000:]}


def layout(tp=1, pp=1, vpp=None, sp=False):
    from megaswift.megatron import ParallelConfig, initialize_parallel
    return initialize_parallel(ParallelConfig(tp, pp, vpp, sp))


def context_vs_megatron(ctx):
    """Every ParallelContext field next to what megatron-core's parallel_state says; [] when all agree."""
    from megatron.core import parallel_state as ps
    dist = torch.distributed
    expected = {
        'tp_group': ps.get_tensor_model_parallel_group(), 'pp_group': ps.get_pipeline_model_parallel_group(),
        'dp_group': ps.get_data_parallel_group(),
        'dp_cp_group': ps.get_data_parallel_group(with_context_parallel=True),
        'tp_size': ps.get_tensor_model_parallel_world_size(), 'pp_size': ps.get_pipeline_model_parallel_world_size(),
        'dp_size': ps.get_data_parallel_world_size(), 'vpp_size': ps.get_virtual_pipeline_model_parallel_world_size(),
        'tp_rank': ps.get_tensor_model_parallel_rank(), 'pp_rank': ps.get_pipeline_model_parallel_rank(),
        'dp_rank': ps.get_data_parallel_rank(), 'rank': dist.get_rank(), 'world_size': dist.get_world_size(),
        'is_first_stage': ps.is_pipeline_first_stage(ignore_virtual=True),
        'is_last_stage': ps.is_pipeline_last_stage(ignore_virtual=True),
        'pp_last_rank': ps.get_pipeline_model_parallel_last_rank()}
    config = ctx.config
    expected_config = (expected['tp_size'], expected['pp_size'], expected['vpp_size'], ctx.sequence_parallel)
    mismatched = [f'{k}: {getattr(ctx, k)!r} != {v!r}' for k, v in expected.items() if getattr(ctx, k) != v]
    if (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
            config.virtual_pipeline_model_parallel_size, config.sequence_parallel) != expected_config:
        mismatched.append(f'config: {config} != {expected_config}')
    layout = {'tensor_model_parallel_size': expected['tp_size'], 'pipeline_model_parallel_size': expected['pp_size'],
              'virtual_pipeline_model_parallel_size': expected['vpp_size'], 'data_parallel_size': expected['dp_size'],
              'world_size': expected['world_size']}
    if ctx.layout() != layout:
        mismatched.append(f'layout: {ctx.layout()} != {layout}')
    return {'mismatched': mismatched, 'sizes': [ctx.tp_size, ctx.pp_size, ctx.dp_size, ctx.vpp_size],
            'sequence_parallel': ctx.sequence_parallel}


def load(path, parallel=None, **kw):
    """The HF model at ``path`` built and loaded at ``parallel`` (None: the context megatron-core's state gives,
    which cannot know sequence parallelism)."""
    from transformers import AutoConfig

    from megaswift.megatron import build_model, load_hf_weights
    models = build_model(AutoConfig.from_pretrained(path), parallel=parallel, **kw)
    load_hf_weights(models, path, parallel=parallel)
    return models


def load_or_record(case, path, parallel=None):
    try:
        return load(path, parallel)
    except Exception as exc:  # noqa: BLE001
        results[f'{case}/load'] = {'error': f'{type(exc).__name__}: {exc}', 'traceback': traceback.format_exc()[-3000:]}
        return None


def parity(models, path):
    logits = mcore_logits(models, sample_ids())
    if logits is None:
        return {}
    ref = hf_logits(path, sample_ids())
    return {'max_abs_diff': (logits[..., :VOCAB] - ref).abs().max().item(), 'ref_absmax': ref.abs().max().item(),
            'padded_vocab': logits.shape[-1], 'padding_absmax': logits[..., VOCAB:].abs().max().item()}


def packed(models, path, compare_mcore_alone=False):
    ids = sample_ids(seed=2, shape=(1, sum(PACKED_LENS)))
    spans = list(zip(itertools.accumulate((0, *PACKED_LENS[:-1])), PACKED_LENS))
    logits = mcore_logits(models, ids, packed_lens=PACKED_LENS)
    hf_alone = [hf_logits(path, ids[:, a:a + n]) for a, n in spans]
    mcore_alone = [mcore_logits(models, ids[:, a:a + n]) for a, n in spans] if compare_mcore_alone else None
    # without PackedSeqParams the same tokens attend across sequence borders: logits must differ
    plain = mcore_logits(models, ids)
    if logits is None:
        return {}
    res = {'vs_hf_alone': max((logits[:, a:a + n, :VOCAB] - h).abs().max().item()
                              for (a, n), h in zip(spans, hf_alone)),
           'unmasked_diff': (plain - logits).abs().max().item()}
    if compare_mcore_alone:
        res['vs_mcore_alone'] = max((logits[:, a:a + n] - m).abs().max().item()
                                    for (a, n), m in zip(spans, mcore_alone))
    return res


def grads(models, path, untag_norms=False):
    """d(sum(logits * w))/d(weights) through mcore's DDP + finalize_model_grads, exported with
    iter_hf_weights, vs HF autograd. ``untag_norms`` drops the sequence-parallel tag (negative control)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megaswift.megatron import iter_hf_weights
    (model,) = models
    if untag_norms:
        for n, p in model.named_parameters():
            if 'layernorm' in n:
                p.sequence_parallel = False
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    ids = sample_ids()
    w = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(3))
    out = ddp(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand(ids.shape[0], -1), attention_mask=None)
    tp = parallel_state.get_tensor_model_parallel_group()
    shard_v = out.shape[-1]
    w_padded = torch.nn.functional.pad(w, (0, shard_v * tp.size() - VOCAB))
    w_local = w_padded[..., tp.rank() * shard_v:(tp.rank() + 1) * shard_v]
    (out * w_local).sum().backward()
    finalize_model_grads([ddp])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)  # export the gradients through the weight map
    got = dict(iter_hf_weights([ddp]))
    if torch.distributed.get_rank() != 0:
        return {}
    hf = hf_model(path)
    hf.zero_grad()
    (hf(ids).logits * w).sum().backward()
    ref = {k: v.grad for k, v in hf.named_parameters()}
    scale = max(ref[k].abs().max().item() for k in got)
    return {'rel_diff': max((got[k] - ref[k]).abs().max().item() for k in got) / scale, 'count': len(got)}


def roundtrip(models, path):
    from safetensors.torch import load_file

    from megaswift.megatron import iter_hf_weights
    got = list(iter_hf_weights(models))
    if torch.distributed.get_rank() != 0:
        return {'count': len(got)}
    files = sorted(Path(path).glob('*.safetensors'))
    ref = {}
    for f in files:
        ref.update(load_file(f))
    hf_order = [k for k in hf_model(path).state_dict() if k in ref]
    names = [n for n, _ in got]
    bad = [n for n, t in got if n not in ref or not torch.equal(t, ref[n])]
    return {'count': len(got), 'equal': not bad and set(names) == set(ref), 'mismatched': bad[:5],
            'missing': sorted(set(ref) - set(names))[:5], 'order_ok': names == hf_order,
            'dtypes': sorted({str(t.dtype) for _, t in got})}


def world1(m, tmp):
    from transformers import AutoConfig
    layout()
    for name in ('llama_tied', 'llama_untied', 'qwen2', 'qwen3', 'mistral', 'qwen2_sharded'):
        models = load_or_record(f'tp1/{name}', m[name])
        if models is None:
            continue
        record(f'tp1/{name}/parity', lambda: parity(models, m[name]))
        record(f'tp1/{name}/roundtrip', lambda: roundtrip(models, m[name]))
        record(f'tp1/{name}/packed', lambda: packed(models, m[name], compare_mcore_alone=True))
        record(f'tp1/{name}/grads', lambda: grads(models, m[name]))
    record('tp1/negative/wrong_qkv_interleave', lambda: negative_control(m['llama_untied']))
    record('tp1/errors/missing_tensor', lambda: error_of(lambda: load(_drop_tensor(m['qwen3'], tmp))))
    record('tp1/errors/missing_shard', lambda: error_of(lambda: load(_drop_shard(m['qwen2_sharded'], tmp))))
    record('tp1/errors/shape_mismatch', lambda: error_of(lambda: _shape_mismatch(m['llama_untied'], tmp)))
    record('tp1/errors/tp_heads', lambda: error_of(lambda: _build_tp(AutoConfig.from_pretrained(m['qwen2']), 3)))
    record('tp1/errors/world_size', lambda: error_of(lambda: layout(tp=2)))


def negative_control(path):
    """A test-only wrong QKV layout (plain [q; k; v] instead of per-group interleave) must break parity."""
    from megaswift.megatron import weights
    good = weights.fuse_qkv
    weights.fuse_qkv = lambda q, k, v, ctx: torch.cat([q, k, v], dim=0)
    try:
        models = load(path)
    finally:
        weights.fuse_qkv = good
    return parity(models, path)


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return {'raised': type(exc).__name__, 'message': str(exc)}
    return {'raised': None}


def _drop_tensor(path, tmp):
    from safetensors.torch import load_file, save_file
    dst = Path(tmp) / 'drop_tensor'
    shutil.copytree(path, dst, dirs_exist_ok=True)
    sd = load_file(dst / 'model.safetensors')
    del sd['model.layers.1.mlp.up_proj.weight']
    save_file(sd, dst / 'model.safetensors', metadata={'format': 'pt'})
    return str(dst)


def _drop_shard(path, tmp):
    dst = Path(tmp) / 'drop_shard'
    shutil.copytree(path, dst, dirs_exist_ok=True)
    index = json.loads((dst / 'model.safetensors.index.json').read_text())['weight_map']
    (dst / index['model.layers.0.self_attn.k_proj.weight']).unlink()
    return str(dst)


def _shape_mismatch(path, tmp):
    """Weights of a model with intermediate_size 192 loaded into one built for 256."""
    from mcore_tiny import TINY, make_tiny
    from transformers import AutoConfig

    from megaswift.megatron import build_model, load_hf_weights
    mt, ov = TINY['llama_untied']
    other = make_tiny(Path(tmp) / 'other_ffn', mt, **{**ov, 'intermediate_size': 192})
    load_hf_weights(build_model(AutoConfig.from_pretrained(path)), other)


def _build_tp(cfg, tp):
    """build_model at a TP size the model cannot take: it fails in the layout check, before anything is built."""
    import dataclasses

    from megaswift.megatron import ParallelConfig, ParallelContext, build_model
    ctx = ParallelContext.from_megatron()
    build_model(cfg, parallel=dataclasses.replace(ctx, config=ParallelConfig(tensor_model_parallel_size=tp),
                                                  tp_size=tp))


def world2(m, tmp):
    from transformers import AutoConfig
    names = ('llama_tied', 'llama_untied', 'qwen2', 'qwen3', 'mistral')
    for lay, kw, checks in (('tp2', dict(tp=2), ('parity', 'roundtrip', 'packed')),
                            ('pp2', dict(pp=2), ('parity', 'roundtrip')),
                            ('tp2sp', dict(tp=2, sp=True), ('parity', 'packed')),
                            ('dp2', dict(), ('roundtrip',))):
        ctx = layout(**kw)
        record(f'{lay}/context', lambda: context_vs_megatron(ctx))
        for name in names:
            if lay in ('tp2sp', 'dp2') and name not in ('llama_tied', 'qwen3'):
                continue
            models = load_or_record(f'{lay}/{name}', m[name], ctx)
            if models is None:
                continue
            if 'parity' in checks:
                record(f'{lay}/{name}/parity', lambda: parity(models, m[name]))
            if 'roundtrip' in checks:
                record(f'{lay}/{name}/roundtrip', lambda: roundtrip(models, m[name]))
            if 'packed' in checks:
                record(f'{lay}/{name}/packed', lambda: packed(models, m[name]))
            if lay in ('tp2', 'tp2sp') and name in ('llama_tied', 'qwen3'):
                record(f'{lay}/{name}/grads', lambda: grads(models, m[name]))
            if lay == 'tp2sp':
                record(f'{lay}/{name}/sp_norms', lambda: {'tagged': sorted(
                    {bool(getattr(p, 'sequence_parallel', False)) for n, p in models[0].named_parameters()
                     if 'layernorm' in n})})
    ctx = layout(tp=2, sp=True)
    record('tp2sp/negative/untagged_norm_grads', lambda: grads(load(m['llama_tied'], ctx), m['llama_tied'], True))
    layout(pp=2)
    record('pp2/llama_untied/packed', lambda: packed(load(m['llama_untied']), m['llama_untied']))
    ctx = layout(pp=2, vpp=2)
    record('pp2vpp2/context', lambda: context_vs_megatron(ctx))
    vmodels = load(m['llama_untied'])
    record('pp2vpp2/llama_untied/parity', lambda: parity(vmodels, m['llama_untied']))
    record('pp2vpp2/llama_untied/roundtrip', lambda: roundtrip(vmodels, m['llama_untied']))
    layout(tp=2)
    record('tp2/errors/kv_heads', lambda: error_of(
        lambda: _build_tp(AutoConfig.from_pretrained(m['llama_tied'], num_key_value_heads=1), 2)))


def main():
    out_path, manifest_path = sys.argv[1], sys.argv[2]
    import faulthandler
    import os
    # a hang (a collective one rank skipped) dumps every stack and exits instead of blocking pytest
    faulthandler.dump_traceback_later(int(os.environ.get('MEGASWIFT_CASES_TIMEOUT', 240)), exit=True)
    manifest = json.loads(Path(manifest_path).read_text())
    tmp = Path(out_path).parent / f'work_{Path(out_path).stem}'
    from megaswift.megatron import destroy_parallel, initialize_parallel
    initialize_parallel()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    (world1 if world == 1 else world2)(manifest, tmp)
    write_case_results(results, out_path)
    torch.distributed.barrier()
    destroy_parallel(destroy_process_group=True)


if __name__ == '__main__':
    main()
