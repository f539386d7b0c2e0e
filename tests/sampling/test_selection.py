"""Which samples are kept: ms-swift's quirks (1.6 #3, #4, #11 in the notes) must be absent."""
from megaswift.sampling import Candidate, build_prompt, select


def cands(orms, prms=None):
    return [Candidate(i, f's{i}', o, None if prms is None else prms[i]) for i, o in enumerate(orms)]


def test_no_reward_keeps_every_sample():
    sel = select(cands([None] * 3), n_best_to_keep=1)
    assert [c.text for c in sel.kept] == ['s0', 's1', 's2'] and sel.rejected is None


def test_failing_samples_are_never_kept_and_worst_is_rejected():
    sel = select(cands([0.0, 1.0, 0.0, 1.0]), n_best_to_keep=5)
    assert [c.text for c in sel.kept] == ['s1', 's3']
    assert sel.rejected.text == 's2'  # worst score, last index on ties


def test_top_k_is_taken_after_filtering():
    # ms-swift sliced the top-k first and could keep fewer valid samples than exist
    sel = select(cands([1.0, 1.0, 1.0, 0.0], prms=[0.9, -1.0, 0.5, 0.0]), n_best_to_keep=2)
    assert [c.text for c in sel.kept] == ['s0', 's2']  # s1 fails the PRM threshold


def test_no_passing_sample_skips_prompt():
    sel = select(cands([0.0, 0.0]), n_best_to_keep=2)
    assert sel.kept == [] and sel.skipped == 'no_passing_sample'


def test_easy_query_threshold_uses_the_pass_rate():
    assert select(cands([1.0, 1.0, 1.0, 0.0]), 2, easy_query_threshold=0.75).skipped == 'easy_query'
    assert select(cands([1.0, 1.0, 0.0, 0.0]), 2, easy_query_threshold=0.75).skipped is None


def test_ground_truth_is_not_a_candidate_and_system_is_applied():
    row = {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'GT'}]}
    p = build_prompt(row, 'f:1', system='be brief')
    assert p.messages == [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'q'}]
    assert p.columns['solution'] == 'GT'  # reference kept for the rewards, not in the prompt
    row2 = {**row, 'solution': '5'}
    assert build_prompt(row2, 'f:1').columns['solution'] == '5'
