"""``megaswift rlhf --rlhf_type grpo`` on megatron-core: on one generated batch (the same completions in every
layout), TP2+SP, PP2 and DP2 + distributed optimizer follow the single-process loss and gradient-norm
trajectories (GRPO and DAPO aggregation, the reference KL, old log-probs of a reused batch); a resumed run
continues exactly; a per-rank normalisation is caught. One launch of ``grpo_cases.py`` per world size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_cases import make_stopping, write_prompts
from testing_utils import build_tiny_model, run_case_script
from test_train_layouts import LOSS_TOL, assert_same_trajectory, max_diff

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def results(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp('grpo_layouts')
    setup = {'model': build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=0, num_hidden_layers=4,
                                       num_key_value_heads=2), **write_prompts(root)}
    setup['stopping_model'] = build_tiny_model(root / 'stopping', 'llama', smollm2_dir, seed=0, num_hidden_layers=4,
                                               num_key_value_heads=2)
    make_stopping(setup['stopping_model'])
    setup['dataset'] = setup['prompts']
    (root / 'setup.json').write_text(json.dumps(setup))
    return run_case_script(HERE / 'grpo_cases.py', root, root / 'setup.json', timeout=420)


def trajectory(results, case) -> dict:
    entry = results.get(case)
    if entry is None or 'error' in entry:
        pytest.fail(f'{case}: ' + ('no result' if entry is None else f"{entry['error']}\n{entry.get('traceback', '')}"))
    return entry


LAYOUTS = [('grpo_tp2_sp', 'grpo'), ('grpo_pp2', 'grpo'), ('grpo_dp2_distopt', 'grpo'), ('grpo_dapo_dp2', 'grpo_dapo'),
           ('control_dp2', 'control')]


@pytest.mark.parametrize('case, ref', LAYOUTS)
def test_layout_follows_single_process_trajectory(results, case, ref):
    got, want = trajectory(results, case), trajectory(results, ref)
    assert_same_trajectory(case, got, want)
    for name in ('kl', 'clip_ratio/region_mean', 'reward', 'entropy', 'completions/mean_length'):
        g, w = got['metrics'].get(name, []), want['metrics'].get(name, [])
        assert [v is None for v in g] == [v is None for v in w], (case, name, g, w)
        assert max_diff([v for v in g if v is not None], [v for v in w if v is not None]) <= 1e-4, (case, name, g, w)


def test_reused_batch_uses_old_log_probs_and_the_reference(results):
    """Step 1: the policy is the old policy and the reference, so no token is clipped and the KL is 0; steps 3-4
    train the same completions again (num_iterations 2): their ratios moved, the clip acts, the KL is positive."""
    for name in ('grpo', 'grpo_dapo', 'grpo_gspo'):
        m = trajectory(results, name)['metrics']
        assert m['kl'][0] == pytest.approx(0.0, abs=1e-7) and m['clip_ratio/region_mean'][0] == 0.0, (name, m)
        assert m['kl'][-1] > 1e-4, (name, m['kl'])
        assert max(m['clip_ratio/region_mean'][2:]) > 0, (name, m['clip_ratio/region_mean'])
        # one generation: the reward metrics are logged at step 1 only
        assert m['reward'][0] is not None and all(v is None for v in m['reward'][1:]), m['reward']
    # GSPO's sequence-level ratio clips whole completions: another clip share than the token-level one
    assert trajectory(results, 'grpo_gspo')['metrics']['clip_ratio/region_mean'] != \
        trajectory(results, 'grpo')['metrics']['clip_ratio/region_mean']


def test_engine_holds_the_pushed_weights(results):
    """rollout/logp_diff (trainer vs engine log-probs of the sampled tokens): ~0 on the first step of every
    generation — also with LoRA, whose adapted weights the engine gets merged — and clearly not once the policy has
    moved (later steps of a generation; every later step when the engine is never synced again). Step 1's
    learning rate is 0 (one warm-up step)."""
    one_generation = trajectory(results, 'grpo')['metrics']['rollout/logp_diff']
    assert one_generation[0] <= 1e-5 and one_generation[2] > 1e-3, one_generation
    lora = trajectory(results, 'lora')['metrics']['rollout/logp_diff']
    assert lora[0] <= 1e-5 and lora[2] <= 1e-5 and lora[3] > 1e-3, lora
    stale = trajectory(results, 'lora_negative_no_sync')['metrics']['rollout/logp_diff']
    assert stale[0] <= 1e-5 and stale[2] > 1e-3, stale


def test_resume_continues_exactly(results):
    full, resumed = trajectory(results, 'grpo8'), trajectory(results, 'grpo8_resume')
    assert resumed['step'] == full['step'] == [1, 2, 3, 4, 5, 6, 7, 8]  # steps 1-4: the checkpoint's log history
    assert resumed['loss'] == full['loss'] and resumed['grad_norm'] == full['grad_norm']
    assert resumed['metrics']['reward'][4] == full['metrics']['reward'][4]  # the second generation, made alike


def test_negative_control_per_rank_normalisation_differs(results):
    lengths = trajectory(results, 'control')['metrics']
    assert lengths['completions/min_length'][0] < lengths['completions/max_length'][0]  # ranks' token counts differ
    got, want = trajectory(results, 'control_dp2_negative_per_rank_norm'), trajectory(results, 'control')
    assert max_diff(got['loss'], want['loss']) > 100 * LOSS_TOL, (got['loss'], want['loss'])
