"""Distributed checkpoint cases for tests/megatron/test_export.py, run once under
``python -m torch.distributed.run --nproc_per_node 2 --standalone dist_export_cases.py HF_DIR WORK_DIR``.

Every case re-initialises the parallel state inside this one launch. Rank 0 writes WORK_DIR/results.json.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    hf_dir, work = sys.argv[1], Path(sys.argv[2])
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer

    from megaswift.export.precision import build_batch, mcore_logits, next_token_loss
    from megaswift.megatron import (ParallelConfig, build_model, destroy_parallel, initialize_parallel,
                                    iter_hf_weights, load_hf_weights)
    from megaswift.megatron.checkpoint import CheckpointError, load_mcore_checkpoint, save_mcore_checkpoint

    hf_config = AutoConfig.from_pretrained(hf_dir)
    batch = build_batch(AutoTokenizer.from_pretrained(hf_dir), hf_config.vocab_size)
    results: dict = {'losses': {}, 'errors': {}}

    def setup(tp=1, pp=1, vpp=None, seed=42):
        initialize_parallel(ParallelConfig(tp, pp, vpp), seed=seed)
        return build_model(hf_config, dtype=torch.float32)

    def loss(models):
        logits = mcore_logits(models, batch, hf_config.vocab_size)
        return next_token_loss(logits, batch) if logits is not None else None

    def record(name, value):
        if dist.get_rank() == 0:
            results['losses'][name] = value

    # HF -> TP2, then save at TP2
    models = setup(tp=2)
    load_hf_weights(models, hf_dir)
    record('tp2_from_hf', loss(models))
    save_mcore_checkpoint(models, work / 'ckpt_tp2', hf_config, {'case': 'tp2'}, hf_dir=hf_dir)
    # the exported HF tensors at TP2 equal the original ones
    exported = {name: t.clone() for name, t in iter_hf_weights(models)}
    if dist.get_rank() == 0:
        from safetensors.torch import load_file
        original = load_file(os.path.join(hf_dir, 'model.safetensors'))
        results['export_tp2_names_equal'] = sorted(original) == sorted(exported)
        results['export_tp2_tensors_equal'] = all(torch.equal(original[k], exported[k]) for k in original
                                                  if k in exported)
    # reload at other layouts; a different seed first, so the load has to overwrite everything
    for name, (tp, pp, vpp) in {'tp1_dp2': (1, 1, None), 'pp2': (1, 2, None), 'pp2_vpp2': (1, 2, 2),
                                'tp2': (2, 1, None)}.items():
        models = setup(tp, pp, vpp, seed=1234)
        record(f'{name}_before_load', loss(models))
        meta = load_mcore_checkpoint(models, work / 'ckpt_tp2')
        record(name, loss(models))
        if name == 'pp2':
            save_mcore_checkpoint(models, work / 'ckpt_pp2', hf_config, {'case': 'pp2'})
            for it in (3, 7):  # training-style saves: iterations side by side, the tracker names the last
                save_mcore_checkpoint(models, work / 'train', hf_config, hf_dir=hf_dir, iteration=it)
    if dist.get_rank() == 0:
        results['meta_layout'] = meta['layout']
    # PP2 -> TP2, from a conversion-style and from a training-style checkpoint
    models = setup(tp=2, seed=99)
    load_mcore_checkpoint(models, work / 'ckpt_pp2')
    record('tp2_from_pp2', loss(models))
    models = setup(tp=2, seed=98)
    meta = load_mcore_checkpoint(models, work / 'train')
    record('tp2_from_train_iter7', loss(models))
    if dist.get_rank() == 0:
        results['train_dir'] = sorted(p.name for p in (work / 'train').iterdir())
        results['train_tracker'] = (work / 'train' / 'latest_checkpointed_iteration.txt').read_text()
        results['train_meta_iteration'] = meta['iteration']
    # a missing checkpoint fails on every rank with the same error (no hang)
    try:
        load_mcore_checkpoint(models, work / 'does_not_exist')
    except CheckpointError as e:
        results['errors'][f'missing_rank{dist.get_rank()}'] = str(e)
    # a failure while finishing the save (here: on rank 0 only) fails every rank and leaves nothing behind
    try:
        save_mcore_checkpoint(models, work / 'ckpt_fail', hf_config, hf_dir=work / 'no_such_hf_dir')
    except Exception as e:  # noqa: BLE001
        results['errors'][f'failed_save_rank{dist.get_rank()}'] = f'{type(e).__name__}: {e}'
    if dist.get_rank() == 0:
        results['failed_save_leftovers'] = sorted(p.name for p in work.iterdir() if 'ckpt_fail' in p.name)
    destroy_parallel()
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            results['losses']['hf'] = next_token_loss(hf(input_ids=batch).logits, batch)
        errors = [None, None]
    else:
        errors = None
    dist.gather_object(results['errors'], errors, dst=0)
    if dist.get_rank() == 0:
        results['errors'] = {k: v for e in errors for k, v in e.items()}
        (work / 'results.json').write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
