"""Every training case of one world size, in one launch; per-step logs go to a JSON file for pytest.

    python tests/trainers/train_cases.py OUT.json SETUP.json                                  # world size 1
    python -m torch.distributed.run --nproc_per_node 2 --standalone \\
        tests/trainers/train_cases.py OUT.json SETUP.json                                     # world size 2

Each case is one ``sft_main`` call (parallel state re-initialised per case). OUT.json maps case ->
{'loss': [...], 'grad_norm': [...], 'lr': [...]} from rank 0, or {'error': ...} from the first failing rank.
"""
from __future__ import annotations

import json
import os
import random
import sys
import traceback
from pathlib import Path

import torch

results: dict = {}

WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau '
         'upsilon phi chi psi omega').split()


def write_chat_data(path: Path, n: int = 48, seed: int = 0) -> str:
    """Short chat rows of varied length (34-58 tokens with SmolLM2's template)."""
    rng = random.Random(seed)
    with open(path, 'w', encoding='utf-8') as f:
        for _ in range(n):
            q = ' '.join(rng.choices(WORDS, k=rng.randint(1, 6)))
            a = ' '.join(rng.choices(WORDS, k=rng.randint(1, 14)))
            f.write(json.dumps({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]})
                    + '\n')
    return str(path)


def write_text_data(path: Path, n: int = 24, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, 'w', encoding='utf-8') as f:
        for _ in range(n):
            f.write(json.dumps({'text': ' '.join(rng.choices(WORDS, k=rng.randint(3, 40)))}) + '\n')
    return str(path)


def base(setup: dict, work: Path, name: str) -> dict:
    return dict(model=setup['model'], dataset=[setup['dataset']], max_length=64, packing=True, global_batch_size=4,
                micro_batch_size=1, max_steps=6, logging_steps=1, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                lr_decay_style='cosine', weight_decay=0.1, clip_grad=1.0, save_steps=1000, save_last=False,
                save_safetensors=False, use_distributed_optimizer=False, seed=42, overwrite_output_dir=True,
                output_dir=str(work / name))


def trajectory(state) -> dict:
    logs = [h for h in state.log_history if 'loss' in h and 'eval_loss' not in h]
    out = {'step': [h['step'] for h in logs], 'loss': [h['loss'] for h in logs],
           'grad_norm': [h['grad_norm'] for h in logs], 'lr': [h['lr'] for h in logs]}
    metrics = sorted({k for h in logs for k in h if '/' in k or k in ('kl', 'jsd', 'reward', 'reward_std', 'entropy')})
    if metrics:
        out['metrics'] = {k: [h.get(k) for h in logs] for k in metrics}
    evals = [h for h in state.log_history if 'eval_loss' in h]
    if evals:
        out['eval'] = evals
    return out


COMMANDS = {'sft': ('SftArguments', 'sft_main'), 'pt': ('PtArguments', 'pt_main'),
            'rlhf': ('RlhfArguments', 'rlhf_main')}


def case(setup, work, name, command='sft', **overrides):
    import megaswift.arguments.rlhf
    import megaswift.arguments.train
    import megaswift.pipelines.train as pipelines
    args_name, main_name = COMMANDS[command]
    args_cls = getattr(megaswift.arguments.train, args_name, None) or getattr(megaswift.arguments.rlhf, args_name)
    only = os.environ.get('MEGASWIFT_TRAIN_CASES')  # a comma-separated subset, for debugging
    if only and name not in only.split(','):
        return
    print(f'[rank {os.environ.get("RANK", 0)}] case {name}', flush=True)
    try:
        kwargs = {**base(setup, work, name), **overrides}
        state = getattr(pipelines, main_name)(args_cls(**kwargs))
        results[name] = trajectory(state)
    except Exception as exc:  # noqa: BLE001 - reported to pytest
        results[name] = {'error': f'{type(exc).__name__}: {exc}', 'traceback': traceback.format_exc()[-4000:]}
        print(f'[rank {os.environ.get("RANK", 0)}] case {name} failed:\n{results[name]["traceback"]}', file=sys.stderr,
              flush=True)


def per_rank_normalisation():
    """Negative control: each DP rank divides by its own token count (times DP, as an average would)
    instead of the step's global count. Ranks with different token counts then weigh tokens unequally."""
    from megaswift.trainers import loop

    good = loop.global_token_count

    def local(count, group=None, device=None):
        size = group.size() if group is not None else 1
        counts = count if isinstance(count, (list, tuple)) else [count]
        return torch.tensor([float(max(c, 1) * size) for c in counts], device=device)
    loop.global_token_count = local
    return lambda: setattr(loop, 'global_token_count', good)


def label_smoothing_direct():
    """TP=2 loss on random logits (with padded vocab entries) vs torch's full-vocab label smoothing."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megaswift.megatron import ParallelConfig, destroy_parallel, initialize_parallel
    from megaswift.trainers.loss import vocab_parallel_argmax, vocab_parallel_token_loss
    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2))
    try:
        vocab, padded, eps = 250, 256, 0.1
        g = torch.Generator().manual_seed(0)
        full = torch.randn(3, 5, padded, generator=g) * 3
        full[..., vocab:] = 7.0  # padded entries: huge logits that must not count
        target = torch.randint(0, vocab, (3, 5), generator=g)
        target[0, 0] = -100
        rank, shard = ps.get_tensor_model_parallel_rank(), padded // 2
        local = full[..., rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
        group = ps.get_tensor_model_parallel_group()
        ours = vocab_parallel_token_loss(local, target, vocab_size=vocab, label_smoothing=eps, tp_group=group)
        ref_full = full[..., :vocab].clone().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(ref_full.reshape(-1, vocab), target.clamp(min=0).reshape(-1),
                                                label_smoothing=eps, reduction='none').view(3, 5)
        mask = target != -100
        (ours * mask).sum().backward()
        (ref * mask).sum().backward()
        grad_ref = torch.nn.functional.pad(ref_full.grad, (0, padded - vocab))[..., rank * shard:(rank + 1) * shard]
        mcore = tensor_parallel.vocab_parallel_cross_entropy(
            full[..., rank * shard:(rank + 1) * shard].clone(), target.clamp(min=0), label_smoothing=eps)
        ref_nopad = torch.nn.functional.cross_entropy(full.reshape(-1, padded), target.clamp(min=0).reshape(-1),
                                                      label_smoothing=eps, reduction='none').view(3, 5)
        argmax = vocab_parallel_argmax(local.detach(), vocab, group)
        return {'loss_diff': ((ours - ref) * mask).abs().max().item(),
                'grad_diff': (local.grad - grad_ref).abs().max().item(),
                'mcore_builtin_diff': ((mcore - ref_nopad) * mask).abs().max().item(),
                'argmax_ok': bool(torch.equal(argmax, full[..., :vocab].argmax(-1)))}
    finally:
        destroy_parallel()


PLUGINS = [str(Path(__file__).resolve().parent / 'objective_plugins.py')]
Z_LOSS = dict(loss_type='z_loss_sft', external_plugins=PLUGINS)
REF_KL = dict(loss_type='ref_kl_sft', external_plugins=PLUGINS)
STREAMING = dict(streaming=True, max_length=128, shuffle_buffer_size=16, packing_interval=12)  # step 6 is in epoch 1


def world1(setup, work):
    case(setup, work, 'ref', save_steps=3)  # also the uninterrupted run of the resume check
    case(setup, work, 'resume', resume_from_checkpoint=str(work / 'ref' / 'iter_0000003'))
    case(setup, work, 'ref_mbs2', micro_batch_size=2)
    case(setup, work, 'ref_ls', label_smoothing=0.1)
    case(setup, work, 'ref_torch_ce', cross_entropy_impl='torch')  # materialised logits vs the fused default
    case(setup, work, 'nopack_padding_free', packing=False)
    case(setup, work, 'nopack_padded', packing=False, padding_free=False, micro_batch_size=2)
    case(setup, work, 'ref_qwen2', model=setup['model_qwen2'])
    case(setup, work, 'pt', command='pt', dataset=[setup['text_dataset']], micro_batch_size=2, max_steps=3)
    case(setup, work, 'stream', **STREAMING)
    case(setup, work, 'zloss', **Z_LOSS)
    case(setup, work, 'refkl', **REF_KL)


def world2(setup, work):
    case(setup, work, 'tp2', tensor_model_parallel_size=2)
    case(setup, work, 'tp2_sp', tensor_model_parallel_size=2, sequence_parallel=True)
    case(setup, work, 'pp2', pipeline_model_parallel_size=2)
    case(setup, work, 'pp2_vpp2', pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    case(setup, work, 'dp2', micro_batch_size=2)
    case(setup, work, 'dp2_distopt', use_distributed_optimizer=True, save_steps=3)
    case(setup, work, 'dp2_distopt_resume', use_distributed_optimizer=True,
         resume_from_checkpoint=str(work / 'dp2_distopt' / 'iter_0000003'))
    case(setup, work, 'stream_dp2', **STREAMING)
    case(setup, work, 'tp2_ls', tensor_model_parallel_size=2, label_smoothing=0.1)
    case(setup, work, 'tp2_sp_ls_torch_ce', tensor_model_parallel_size=2, sequence_parallel=True, label_smoothing=0.1,
         cross_entropy_impl='torch')
    case(setup, work, 'tp2_sp_qwen2', model=setup['model_qwen2'], tensor_model_parallel_size=2,
         sequence_parallel=True)
    case(setup, work, 'zloss_tp2', tensor_model_parallel_size=2, sequence_parallel=True, **Z_LOSS)
    case(setup, work, 'zloss_pp2', pipeline_model_parallel_size=2, **Z_LOSS)
    case(setup, work, 'refkl_tp2', tensor_model_parallel_size=2, **REF_KL)
    case(setup, work, 'refkl_pp2_vpp2', pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
         **REF_KL)
    restore = per_rank_normalisation()
    try:
        case(setup, work, 'dp2_negative_per_rank_norm')
    finally:
        restore()
    try:
        results['label_smoothing_direct'] = label_smoothing_direct()
    except Exception as exc:  # noqa: BLE001
        results['label_smoothing_direct'] = {'error': f'{type(exc).__name__}: {exc}',
                                             'traceback': traceback.format_exc()[-4000:]}


def main(world1=world1, world2=world2):
    """Run ``world1`` (one process) or ``world2`` (torchrun, two) and write the merged results (``rlhf_cases.py``
    passes its own)."""
    out_path, setup_path = sys.argv[1], sys.argv[2]
    import faulthandler
    faulthandler.dump_traceback_later(int(os.environ.get('MEGASWIFT_CASES_TIMEOUT', 300)), exit=True)
    setup = json.loads(Path(setup_path).read_text())
    work = Path(out_path).parent / f'work_{Path(out_path).stem}'
    from megaswift.megatron import destroy_parallel, initialize_parallel
    from megaswift.utils.logging import setup_logging
    setup_logging('WARNING')
    initialize_parallel()  # the process group outlives every case (each case re-creates the mcore groups)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    (world1 if world == 1 else world2)(setup, work)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        merged = {}
        for name in gathered[0]:
            errors = [g[name] for g in gathered if 'error' in g.get(name, {})]
            merged[name] = errors[0] if errors else gathered[0][name]
        Path(out_path).write_text(json.dumps(merged, indent=1))
    torch.distributed.barrier()
    destroy_parallel(destroy_process_group=True)


if __name__ == '__main__':
    main()
