"""``megaswift rlhf`` on megatron-core: DPO and KTO at TP2+SP / PP2 / PP2xVPP2 / DP2+distributed optimizer /
LoRA+TP2, and with precomputed reference log-probs, follow the single-process trajectory; resume is bit-exact; the loss type is the one asked for; the
reward model's evaluation flips with swapped columns; a per-rank normalisation is caught.

One launch of ``rlhf_cases.py`` per world size (1: plain python; 2: torchrun, gloo). Every case trains 6 steps
(global batch 4, packing, lr 1e-3, warmup + cosine) on the tiny random llama of ``test_train_layouts.py``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from rlhf_cases import write_preference_data
from testing_utils import build_tiny_model, run_case_script
from test_train_layouts import GRAD_NORM_RTOL, LOSS_TOL, assert_same_trajectory, max_diff, trajectory

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def results(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp('rlhf_layouts')
    setup = {'model': build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=0, num_hidden_layers=4,
                                       num_key_value_heads=2), **write_preference_data(root)}
    setup['dataset'] = setup['pairs']
    setup['teacher'] = build_tiny_model(root / 'teacher', 'llama', smollm2_dir, seed=3, num_hidden_layers=2,
                                        num_key_value_heads=2)  # same tokenizer, another model
    (root / 'setup.json').write_text(json.dumps(setup))
    merged = run_case_script(HERE / 'rlhf_cases.py', root, root / 'setup.json', timeout=420,
                             env_per_world={w: {'MEGASWIFT_CACHE': str(root / f'cache{w}')} for w in (1, 2)})
    merged['_paths'] = {'root': str(root), **setup}
    return merged


LAYOUTS = [('dpo_tp2', 'dpo'), ('dpo_pp2', 'dpo'), ('dpo_pp2_vpp2', 'dpo'), ('dpo_dp2_distopt', 'dpo'),
           ('dpo_mbs2', 'dpo_nopack'), ('dpo_rpo_dp2', 'dpo_rpo'), ('dpo_lora_tp2', 'dpo_lora'),
           ('kto_tp2', 'kto'), ('kto_pp2_vpp2', 'kto'), ('kto_dp2_distopt', 'kto'),
           # --precompute_ref_log_probs: the reference runs once before training and is freed
           ('dpo_precompute', 'dpo'), ('dpo_pp2_precompute', 'dpo'), ('kto_dp2_precompute', 'kto'),
           # the value head (replicated over TP) and the teacher's vocabulary-parallel distributions
           ('rm_tp2_sp', 'rm'), ('rm_pp2', 'rm'), ('gkd_tp2_sp', 'gkd'), ('gkd_pp2', 'gkd'),
           # on-policy GKD: the same sampled completions in every layout (seeded per sample and step)
           ('gkd_on_policy_tp2_sp', 'gkd_on_policy'), ('gkd_on_policy_dp2', 'gkd_on_policy'),
           # --streaming: every DP rank reads the same stream of pairs (KTO: KL completions within the window)
           ('dpo_stream_dp2', 'dpo_stream'), ('kto_stream_dp2', 'kto_stream')]


@pytest.mark.parametrize('case, ref', LAYOUTS)
def test_layout_follows_single_process_trajectory(results, case, ref):
    got, want = trajectory(results, case), trajectory(results, ref)
    # GKD: fp32 summation order over the vocabulary (see rlhf_cases.GKD); its TP arithmetic: test_jsd_under_tp
    assert_same_trajectory(case, got, want, 1e-3 if ref.startswith('gkd') else GRAD_NORM_RTOL)
    for name, values in want.get('metrics', {}).items():
        assert max_diff(got['metrics'][name], values) <= 1e-4, (case, name, got['metrics'][name], values)


def test_preference_training_learns_from_the_reference(results):
    """Step 1: policy == reference, so DPO's loss is log 2 and its rewards 0; on four pairs seen every step the
    loss falls and the reward margin grows (full and LoRA, whose reference is the base with adapters off)."""
    for name in ('dpo', 'dpo_lora', 'dpo_overfit', 'dpo_lora_overfit'):
        dpo = trajectory(results, name)
        assert abs(dpo['loss'][0] - math.log(2)) < 1e-6, (name, dpo['loss'])
        assert dpo['metrics']['rewards/margins'][0] == 0.0
    for name in ('dpo_overfit', 'dpo_lora_overfit'):
        dpo = trajectory(results, name)
        assert dpo['loss'][-1] < dpo['loss'][0] - 0.05 and dpo['metrics']['rewards/margins'][-1] > 0.05, dpo
    for name in ('kto', 'kto_overfit'):
        assert abs(trajectory(results, name)['loss'][0] - 0.5) < 1e-6  # 1 - s(0) for every completion at step 1
    gkd = trajectory(results, 'gkd')
    assert gkd['loss'][0] > 0 and gkd['loss'][-1] < gkd['loss'][0], gkd['loss']  # towards the teacher
    kto = trajectory(results, 'kto_overfit')
    assert kto['loss'][-1] < kto['loss'][0] - 0.01, kto


def test_kto_reference_point_is_exercised(results):
    """The DP2 comparison checks the all-reduced KL reference point only if it is not clamped to 0 throughout."""
    assert max(trajectory(results, 'kto')['metrics']['kl']) > 0, trajectory(results, 'kto')['metrics']


def test_loss_type_is_the_one_asked_for(results):
    """Megatron-SWIFT trained hinge and ipo as sigmoid (ms-swift PR #10167): here each has its own loss."""
    sigmoid, hinge, ipo = (trajectory(results, n)['loss'] for n in ('dpo', 'dpo_hinge', 'dpo_ipo'))
    assert abs(hinge[0] - 1.0) < 1e-6  # relu(1 - 0)
    assert abs(ipo[0] - (1 / (2 * 0.1)) ** 2) < 1e-4  # (0 - 1 / (2 beta))^2
    assert abs(sigmoid[0] - math.log(2)) < 1e-6


@pytest.mark.parametrize('run, resumed', [('dpo', 'dpo_resume'), ('dpo_stream', 'dpo_stream_resume')])
def test_resume_is_bit_exact(results, run, resumed):
    a, b = trajectory(results, run), trajectory(results, resumed)
    for key in ('loss', 'grad_norm', 'lr'):
        assert a[key][3:] == b[key][3:], (key, a[key], b[key])
    assert {k: v[3:] for k, v in a['metrics'].items()} == {k: v[3:] for k, v in b['metrics'].items()}


def test_streamed_pairs_train_like_pairs(results):
    """A streamed DPO run starts at log 2 with zero margins (policy == reference on real pairs); streamed KTO at
    0.5, its KL reference point (from the window's mismatched completions) exercised."""
    dpo, kto = trajectory(results, 'dpo_stream'), trajectory(results, 'kto_stream')
    assert abs(dpo['loss'][0] - math.log(2)) < 1e-6 and dpo['metrics']['rewards/margins'][0] == 0.0, dpo
    assert abs(kto['loss'][0] - 0.5) < 1e-6, kto
    assert max(kto['metrics']['kl']) > 0, kto['metrics']


def test_gkd_trains_on_generated_completions(results):
    """--lmbda 1: every step on the student's own completions (at most 6 new tokens + the stop token, not the
    dataset's 2-10 word answers); --seq_kd: the teacher's; --lmbda 0.5 --seq_kd: the steps the per-step draw picks
    on-policy, the teacher's otherwise; resume after step 3 continues bit for bit (completions seeded per step)."""
    from megaswift.trainers.objectives.gkd import GkdObjective
    plain, on_policy, seq_kd, mixed = (trajectory(results, n) for n in ('gkd', 'gkd_on_policy', 'gkd_seq_kd',
                                                                        'gkd_mixed'))
    assert plain['metrics']['completions/generated'] == [0.0] * 6
    assert max_diff(plain['metrics']['jsd'], plain['loss']) < 1e-9  # the loss, logged by name
    assert max(plain['metrics']['completions/mean_length']) > 7  # the dataset's answers
    for run in (on_policy, seq_kd, mixed):
        assert run['metrics']['completions/generated'] == [1.0] * 6, run['metrics']
        assert max(run['metrics']['completions/mean_length']) <= 7, run['metrics']
    assert on_policy['loss'][0] != seq_kd['loss'][0] != plain['loss'][0]
    decide = GkdObjective(argparse.Namespace(beta=0.5, temperature=0.5, lmbda=0.5, seq_kd=True, seed=42))
    sources = [decide.completion_source(step) for step in range(1, 7)]  # the logged steps
    assert set(sources) == {'policy', 'teacher'}, sources  # both kinds of step happen in the mixed run
    same_as = on_policy if sources[0] == 'policy' else seq_kd  # step 1 starts from the same weights: the same
    assert abs(mixed['loss'][0] - same_as['loss'][0]) < 1e-6, (sources, mixed['loss'], same_as['loss'])  # completions
    resumed = trajectory(results, 'gkd_on_policy_resume')
    for key in ('loss', 'grad_norm', 'lr'):
        assert resumed[key][3:] == on_policy[key][3:], (key, resumed[key], on_policy[key])


def test_reward_model_evaluation_flips_with_swapped_columns(results):
    """ms-swift #9370 reported accuracy 1.0 with chosen and rejected swapped. Same training, validation pairs
    swapped: accuracy becomes 1 - itself, margins change sign."""
    plain = trajectory(results, 'rm_eval')['eval'][-1]
    swapped = trajectory(results, 'rm_eval_swapped')['eval'][-1]
    assert 0.0 < plain['eval_rewards/accuracies'] < 1.0 or plain['eval_rewards/accuracies'] == 1.0
    assert abs(plain['eval_rewards/accuracies'] + swapped['eval_rewards/accuracies'] - 1.0) < 1e-9, (plain, swapped)
    assert abs(plain['eval_rewards/margins'] + swapped['eval_rewards/margins']) < 1e-5, (plain, swapped)
    assert plain['eval_rewards/accuracies'] > 0.5  # the training pairs are the validation pairs


def test_per_rank_normalisation_is_caught(results):
    """Negative control: dividing the NLL term by each rank's chosen tokens (times DP) instead of the step's."""
    ref = trajectory(results, 'dpo_rpo')
    bad = trajectory(results, 'dpo_rpo_dp2_negative_per_rank_norm')
    assert max_diff(bad['loss'], ref['loss']) > 100 * LOSS_TOL, (bad['loss'], ref['loss'])


def test_reward_model_saves_as_a_transformers_sequence_classifier(results):
    """The RM's checkpoint loads as AutoModelForSequenceClassification and scores as ``megaswift sample
    --prm_model PATH`` does: its rewards of the validation pairs give the accuracy and margins the trainer's
    evaluation logged at that step."""
    from megaswift.rewards.prm import RewardModelPRM
    paths = results['_paths']
    evaluation = trajectory(results, 'rm_eval')['eval'][-1]
    ckpt = Path(paths['root']) / 'work_world1' / 'rm_eval' / 'checkpoint-6'
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(ckpt)
    assert config.architectures == ['LlamaForSequenceClassification'] and config.num_labels == 1
    rows = [json.loads(line) for line in Path(paths['pairs']).read_text().splitlines()]
    prompts = [r['messages'][:-1] for r in rows]
    scorer = RewardModelPRM(str(ckpt))
    chosen = scorer([r['messages'][-1]['content'] for r in rows], messages=prompts)
    rejected = scorer([r['rejected_response'] for r in rows], messages=prompts)
    assert evaluation['eval_tokens'] == len(rows)  # every validation pair was scored
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(rows)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(rows)
    assert accuracy == evaluation['eval_rewards/accuracies'], (accuracy, evaluation)
    assert abs(margin - evaluation['eval_rewards/margins']) < 1e-3, (margin, evaluation)
    assert abs(sum(chosen) / len(rows) - evaluation['eval_rewards/chosen']) < 1e-3, (chosen, evaluation)


def test_jsd_under_tp_matches_the_full_vocabulary(results):
    """GKD's divergence over vocabulary shards: every shard's gradient includes what the shared log-normaliser
    receives from the other shards (without that: 3e-2 relative, measured)."""
    entry = results['jsd_direct']
    assert 'error' not in entry, entry
    assert entry['loss_diff'] < 1e-6 and entry['grad_diff'] < 1e-5, entry
