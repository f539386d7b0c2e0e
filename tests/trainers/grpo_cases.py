"""The ``megaswift rlhf --rlhf_type grpo`` training cases of one world size, in one launch (see ``train_cases.py``,
whose runner and ``case`` this reuses).

Every case generates ONE batch (the colocated transformers engine on global rank 0, from the same initial
weights in every layout, every prompt seeded alike) and trains on it for 4 steps: ``--steps_per_generation 2``
x ``--num_iterations 2``, so steps 3-4 reuse the batch against its old log-probs (ratios off 1, the clip at
work) and the reference KL (``--beta``) is in the loss. The layouts then see the same completions, and their
loss and gradient-norm trajectories must follow the single process's. ``grpo8`` / ``grpo8_resume``: two
generations, a checkpoint between them, resumed.

    python tests/trainers/grpo_cases.py OUT.json SETUP.json
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/trainers/grpo_cases.py OUT.json SETUP.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import grpo_reward_plugin  # noqa: F401  (registers the vowel_share reward)
from train_cases import WORDS, case, main, per_rank_normalisation


def make_stopping(model_dir: str) -> None:
    """Make the random model end some completions early, so that they end at different lengths and the
    data-parallel ranks train different numbers of tokens (what the normalisation control needs): the
    end-of-sequence id becomes 0 (``<|endoftext|>``, never in a prompt), and its tied embedding row a large
    random vector, picked so that a sampled token is it one time in 3 to 20."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = tok.apply_chat_template([{'role': 'user', 'content': ' '.join(WORDS[:6])}], add_generation_prompt=True,
                                    return_dict=True)['input_ids']
    table = model.get_input_embeddings().weight.data
    picked = None
    for factor, seed in ((f, s) for f in (60, 80, 120, 160) for s in range(20)):
        table[0] = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed)) * table.std() * factor
        with torch.no_grad():
            p_stop = torch.softmax(model(torch.tensor([probe])).logits[0], -1)[:, 0]
        if 0.05 <= float(p_stop.mean()) <= 0.3 and float(p_stop.max()) < 0.95:
            picked = table[0].clone()
            break
    if picked is None:
        raise RuntimeError('no end-of-sequence row gives a stop probability in [0.05, 0.3]')
    path = Path(model_dir) / 'model.safetensors'
    weights = load_file(str(path))
    weights[next(k for k in weights if k.endswith('embed_tokens.weight'))][0] = picked
    save_file(weights, str(path), metadata={'format': 'pt'})
    for name in ('config.json', 'generation_config.json'):
        cfg_path = Path(model_dir) / name
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            cfg['eos_token_id'] = 0
            cfg_path.write_text(json.dumps(cfg, indent=1))


def write_prompts(root: Path, n: int = 16, seed: int = 0) -> dict:
    rng = random.Random(seed)
    path = root / 'prompts.jsonl'
    path.write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': ' '.join(rng.choices(WORDS, k=4))}],
                                        'solution': rng.choice(WORDS)}) + '\n' for _ in range(n)))
    return {'prompts': str(path)}


GRPO = dict(reward_funcs=['vowel_share'], num_generations=4, global_batch_size=8, micro_batch_size=2,
            steps_per_generation=2, num_iterations=2, max_completion_length=8, temperature=1.0, beta=0.04,
            max_length=64, packing=False, max_steps=4, save_steps=4, lr=3e-3, min_lr=3e-4)
# the normalisation control: completions of different lengths (``make_stopping``), no KL (the stop row makes
# that model's log-probs swing by tens of nats within a step: k3 = exp(ref - logp) ... would dwarf the rest)
CONTROL = dict(loss_type=['dapo'], beta=0.0, num_iterations=1, max_steps=2)


# LoRA: two generations of two steps; every generation's first step must see the engine holding the merged adapters
LORA_SYNC = dict(tuner_type='lora', lora_dropout=0.0, lr=5e-2, min_lr=5e-2, num_iterations=1, beta=0.0)


def stale_engine():
    """Negative control: the colocated engine keeps the weights of its first sync."""
    from megaswift.trainers.grpo import generation
    real = generation.ColocateSource.sync

    def first_only(self, models, parallel):
        if self.version is None:
            return real(self, models, parallel)
        return self.version
    generation.ColocateSource.sync = first_only
    return lambda: setattr(generation.ColocateSource, 'sync', real)


def grpo(setup, work, name, **overrides):
    case(setup, work, name, command='rlhf', rlhf_type='grpo', dataset=[setup['prompts']], **{**GRPO, **overrides})


def world1(setup, work):
    grpo(setup, work, 'grpo')
    grpo(setup, work, 'grpo_dapo', loss_type=['dapo'], epsilon_high=0.28)
    grpo(setup, work, 'grpo_gspo', importance_sampling_level='sequence')
    grpo(setup, work, 'grpo8', max_steps=8)
    grpo(setup, work, 'grpo8_resume', max_steps=8, resume_from_checkpoint=str(work / 'grpo8' / 'iter_0000004'))
    grpo(setup, work, 'control', model=setup['stopping_model'], **CONTROL)
    grpo(setup, work, 'lora', **LORA_SYNC)
    restore = stale_engine()
    try:
        grpo(setup, work, 'lora_negative_no_sync', **LORA_SYNC)
    finally:
        restore()


def world2(setup, work):
    grpo(setup, work, 'grpo_tp2_sp', tensor_model_parallel_size=2, sequence_parallel=True)
    grpo(setup, work, 'grpo_pp2', pipeline_model_parallel_size=2)
    grpo(setup, work, 'grpo_dp2_distopt', use_distributed_optimizer=True)
    grpo(setup, work, 'grpo_dapo_dp2', loss_type=['dapo'], epsilon_high=0.28)
    grpo(setup, work, 'control_dp2', model=setup['stopping_model'], **CONTROL)
    restore = per_rank_normalisation()
    try:
        grpo(setup, work, 'control_dp2_negative_per_rank_norm', model=setup['stopping_model'], **CONTROL)
    finally:
        restore()


if __name__ == '__main__':
    main(world1, world2)
