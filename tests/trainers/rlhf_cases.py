"""The ``megaswift rlhf`` training cases of one world size, in one launch (see ``train_cases.py``, whose runner
and ``case`` this reuses): DPO and KTO at every layout against one process, LoRA, resume, the reward model's
evaluation with swapped columns, and a negative control.

    python tests/trainers/rlhf_cases.py OUT.json SETUP.json
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/trainers/rlhf_cases.py OUT.json SETUP.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from train_cases import WORDS, case, main, per_rank_normalisation, results


def write_preference_data(root: Path, n: int = 32, seed: int = 0) -> dict:
    """Pairs (chosen: a word list; rejected: it reversed plus a word; every third row with a margin), the same
    pairs with the columns swapped, and KTO rows (the pairs' chosen answers as desirable, rejected as not)."""
    rng = random.Random(seed)
    pairs, swapped, kto = [], [], []
    for i in range(n):
        prompt = ' '.join(rng.choices(WORDS, k=rng.randint(1, 5)))
        chosen = ' '.join(rng.choices(WORDS, k=rng.randint(2, 10)))
        rejected = ' '.join(reversed(chosen.split())) + ' ' + rng.choice(WORDS)
        messages = [{'role': 'user', 'content': prompt}]
        margin = {'margin': 0.5} if i % 3 == 0 else {}
        pairs.append({'messages': messages + [{'role': 'assistant', 'content': chosen}],
                      'rejected_response': rejected, **margin})
        swapped.append({'messages': messages + [{'role': 'assistant', 'content': rejected}],
                        'rejected_response': chosen, **margin})
        kto.append({'messages': messages + [{'role': 'assistant', 'content': chosen if i % 2 else rejected}],
                    'label': bool(i % 2)})
    paths = {}
    # four rows: a global batch of 4 sees the same rows every step (the learning checks)
    for name, rows in (('pairs', pairs), ('pairs_swapped', swapped), ('kto', kto), ('pairs4', pairs[:4]),
                       ('kto4', kto[:4])):
        paths[name] = str(root / f'{name}.jsonl')
        Path(paths[name]).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return paths


def rlhf(setup, work, name, rlhf_type, data='pairs', **overrides):
    case(setup, work, name, command='rlhf', rlhf_type=rlhf_type, dataset=[setup[data]],
         **{'max_length': 48, **overrides})


DPO_RPO = dict(rpo_alpha=0.5)  # the NLL term: normalised by the step's chosen tokens
# GKD's gradient is a sum over the vocabulary that cancels to 0 (softmax): between two near-uniform random
# models fp32 summation order (TP shards) moves the step's gradient norm by ~3e-4 relative (SFT: ~3e-5);
# jsd_direct checks the TP arithmetic itself at 1e-6
GKD = dict(teacher_model=None, temperature=0.5)
LORA = dict(tuner_type='lora', lr=1e-2, lora_dropout=0.0)  # dropout masks would differ between layouts
# every step on the student's own completions (sampled at --temperature; 6 new tokens at most)
GKD_ON_POLICY = dict(lmbda=1.0, max_completion_length=6)
# --streaming: windows of 12 rows (32 pairs: step 6 is in the second pass), packed rows of both sequences
STREAM = dict(streaming=True, shuffle_buffer_size=8, packing_interval=12)


def jsd_direct() -> dict:
    """TP=2: generalised JSD of vocabulary-parallel log-softmaxes (``ModelOutput.log_softmax`` / ``vocab_sum``)
    against the full-vocabulary computation, value and gradient, on near-uniform random logits."""
    import torch

    from megaswift.megatron import ParallelConfig, destroy_parallel, initialize_parallel
    from megaswift.trainers.objectives.base import ModelOutput
    from megaswift.trainers.objectives.preference_losses import generalized_jsd
    ctx = initialize_parallel(ParallelConfig(tensor_model_parallel_size=2))
    try:
        g = torch.Generator().manual_seed(0)
        vocab, n = 1000, 7
        student, teacher = torch.randn(n, vocab, generator=g) * 0.3, torch.randn(n, vocab, generator=g) * 0.3
        shard = slice(ctx.tp_rank * vocab // 2, (ctx.tp_rank + 1) * vocab // 2)
        local = student[:, shard].clone().requires_grad_(True)
        out = ModelOutput(local, None, None, ctx.tp_group, 'torch')
        teacher_lp = ModelOutput(teacher[:, shard], None, None, ctx.tp_group, 'torch').log_softmax()
        ours = generalized_jsd(out.log_softmax(), teacher_lp, 0.5, vocab_sum=out.vocab_sum).sum()
        ours.backward()
        full = student.clone().requires_grad_(True)
        ref = generalized_jsd(torch.log_softmax(full, -1), torch.log_softmax(teacher, -1), 0.5).sum()
        ref.backward()
        return {'loss_diff': abs(float(ours - ref)) / abs(float(ref)),
                'grad_diff': float((local.grad - full.grad[:, shard]).abs().max() / full.grad.abs().max())}
    finally:
        destroy_parallel()


def world1(setup, work):
    GKD['teacher_model'] = setup['teacher']
    rlhf(setup, work, 'dpo', 'dpo', save_steps=3)
    rlhf(setup, work, 'dpo_resume', 'dpo', resume_from_checkpoint=str(work / 'dpo' / 'iter_0000003'))
    rlhf(setup, work, 'dpo_nopack', 'dpo', packing=False)
    rlhf(setup, work, 'dpo_mbs2', 'dpo', micro_batch_size=2, packing=False)
    rlhf(setup, work, 'dpo_hinge', 'dpo', loss_type=['hinge'])
    rlhf(setup, work, 'dpo_ipo', 'dpo', loss_type=['ipo'])
    rlhf(setup, work, 'dpo_rpo', 'dpo', **DPO_RPO)
    rlhf(setup, work, 'dpo_lora', 'dpo', **LORA)
    rlhf(setup, work, 'kto', 'kto', data='kto')
    rlhf(setup, work, 'dpo_precompute', 'dpo', precompute_ref_log_probs=True)
    rlhf(setup, work, 'rm', 'rm')
    rlhf(setup, work, 'gkd', 'gkd', **GKD)
    rlhf(setup, work, 'gkd_on_policy', 'gkd', save_steps=3, **GKD, **GKD_ON_POLICY)
    rlhf(setup, work, 'gkd_on_policy_resume', 'gkd', **GKD, **GKD_ON_POLICY,
         resume_from_checkpoint=str(work / 'gkd_on_policy' / 'iter_0000003'))
    rlhf(setup, work, 'gkd_seq_kd', 'gkd', seq_kd=True, max_completion_length=6, **GKD)
    rlhf(setup, work, 'gkd_mixed', 'gkd', lmbda=0.5, seq_kd=True, max_completion_length=6, **GKD)
    rlhf(setup, work, 'dpo_stream', 'dpo', save_steps=3, **STREAM)
    rlhf(setup, work, 'dpo_stream_resume', 'dpo', **STREAM,
         resume_from_checkpoint=str(work / 'dpo_stream' / 'iter_0000003'))
    rlhf(setup, work, 'kto_stream', 'kto', data='kto', **STREAM)
    rlhf(setup, work, 'dpo_overfit', 'dpo', data='pairs4', packing=False)
    rlhf(setup, work, 'dpo_lora_overfit', 'dpo', data='pairs4', packing=False, **LORA)
    rlhf(setup, work, 'kto_overfit', 'kto', data='kto4', packing=False)
    for name, val in (('rm_eval', 'pairs'), ('rm_eval_swapped', 'pairs_swapped')):
        rlhf(setup, work, name, 'rm', val_dataset=[setup[val]], eval_steps=1000, save_last=True,
             save_safetensors=True, max_length=128)  # every pair kept: the HF check scores them all


def world2(setup, work):
    GKD['teacher_model'] = setup['teacher']
    rlhf(setup, work, 'dpo_tp2', 'dpo', tensor_model_parallel_size=2, sequence_parallel=True)
    rlhf(setup, work, 'dpo_pp2', 'dpo', pipeline_model_parallel_size=2)
    rlhf(setup, work, 'dpo_pp2_vpp2', 'dpo', pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    rlhf(setup, work, 'dpo_dp2_distopt', 'dpo', use_distributed_optimizer=True)
    rlhf(setup, work, 'dpo_rpo_dp2', 'dpo', **DPO_RPO)
    rlhf(setup, work, 'dpo_lora_tp2', 'dpo', tensor_model_parallel_size=2, **LORA)
    rlhf(setup, work, 'kto_tp2', 'kto', data='kto', tensor_model_parallel_size=2)
    rlhf(setup, work, 'kto_pp2_vpp2', 'kto', data='kto', pipeline_model_parallel_size=2,
         virtual_pipeline_model_parallel_size=2)
    rlhf(setup, work, 'kto_dp2_distopt', 'kto', data='kto', use_distributed_optimizer=True)
    # the reference's log-probs computed once up front, split over DP ranks / on the last stage, then gathered
    rlhf(setup, work, 'dpo_pp2_precompute', 'dpo', pipeline_model_parallel_size=2, precompute_ref_log_probs=True)
    rlhf(setup, work, 'kto_dp2_precompute', 'kto', data='kto', precompute_ref_log_probs=True)
    rlhf(setup, work, 'rm_tp2_sp', 'rm', tensor_model_parallel_size=2, sequence_parallel=True)
    rlhf(setup, work, 'rm_pp2', 'rm', pipeline_model_parallel_size=2)
    rlhf(setup, work, 'gkd_tp2_sp', 'gkd', tensor_model_parallel_size=2, sequence_parallel=True, **GKD)
    rlhf(setup, work, 'gkd_pp2', 'gkd', pipeline_model_parallel_size=2, **GKD)
    rlhf(setup, work, 'gkd_on_policy_tp2_sp', 'gkd', tensor_model_parallel_size=2, sequence_parallel=True, **GKD,
         **GKD_ON_POLICY)
    rlhf(setup, work, 'gkd_on_policy_dp2', 'gkd', **GKD, **GKD_ON_POLICY)
    rlhf(setup, work, 'dpo_stream_dp2', 'dpo', **STREAM)
    rlhf(setup, work, 'kto_stream_dp2', 'kto', data='kto', **STREAM)
    results['jsd_direct'] = jsd_direct()
    restore = per_rank_normalisation()
    try:
        rlhf(setup, work, 'dpo_rpo_dp2_negative_per_rank_norm', 'dpo', **DPO_RPO)
    finally:
        restore()


if __name__ == '__main__':
    main(world1, world2)
