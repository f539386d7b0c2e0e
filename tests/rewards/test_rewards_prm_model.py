"""RewardModelPRM on tiny random-init Llama reward models with SmolLM2's real tokenizer."""
from __future__ import annotations

import math

import pytest

from megaswift.rewards import ReducedReward, RewardModelPRM, get_orm, get_prm

MESSAGES = [{'role': 'user', 'content': 'What is 2 + 3?'}]
COMPLETIONS = ['2 + 3 = 5, so the answer is \\boxed{5}.', 'Five.',
               'First add the ones.\n\n2 + 3 = 5.\n\nThe answer is 5.<|im_end|>']


def _build(out, tokenizer_dir, kind: str, extra_step_token: bool = False) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if extra_step_token:
        tok.add_special_tokens({'additional_special_tokens': ['<extra_0>']})
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      num_labels=1 if kind == 'seq' else 2, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = (LlamaForSequenceClassification if kind == 'seq' else LlamaForTokenClassification)(cfg)
    with torch.no_grad():  # a visible score head: the default init gives logits too close to 0 to compare
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope='module')
def seq_rm_dir(tmp_path_factory, smollm2_dir):
    return _build(tmp_path_factory.mktemp('seq_rm'), smollm2_dir, 'seq')


@pytest.fixture(scope='module')
def prm_dir(tmp_path_factory, smollm2_dir):
    return _build(tmp_path_factory.mktemp('tok_prm'), smollm2_dir, 'tok', extra_step_token=True)


@pytest.fixture(scope='module')
def plain_prm_dir(tmp_path_factory, smollm2_dir):
    return _build(tmp_path_factory.mktemp('tok_prm_plain'), smollm2_dir, 'tok')


def _reference(model_dir: str, cls_name: str, content: str):
    """A hand-run forward pass of a freshly loaded model on one unpadded conversation."""
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = getattr(transformers, cls_name).from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(MESSAGES + [{'role': 'assistant', 'content': content}], tokenize=False)
    ids = tok(text, add_special_tokens=False)['input_ids']
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    return tok, ids, out


def test_sequence_rm_scores_match_a_hand_forward_pass(seq_rm_dir):
    prm = get_prm(seq_rm_dir, batch_size=2)
    assert isinstance(prm, RewardModelPRM) and prm.kind == 'outcome'
    scores = prm(COMPLETIONS, messages=[MESSAGES] * 3, solution=[None] * 3)
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 3
    assert prm(COMPLETIONS, messages=[MESSAGES] * 3) == scores  # deterministic
    one_by_one = RewardModelPRM(seq_rm_dir, batch_size=1)(COMPLETIONS, messages=[MESSAGES] * 3)
    assert one_by_one == pytest.approx(scores, abs=1e-4)  # left padding does not change scores
    for i in (0, 2):
        _, _, logits = _reference(seq_rm_dir, 'LlamaForSequenceClassification', COMPLETIONS[i])
        assert scores[i] == pytest.approx(float(logits[0]), abs=1e-4)


def test_sequence_rm_as_orm(seq_rm_dir):
    orm = get_orm(seq_rm_dir)
    assert isinstance(orm, ReducedReward)
    out = orm(COMPLETIONS[:2], messages=[MESSAGES] * 2)
    assert out == pytest.approx(orm.prm(COMPLETIONS[:2], messages=[MESSAGES] * 2))


def test_process_rm_with_step_token_matches_hand_forward_pass(prm_dir):
    import torch
    prm = get_prm(prm_dir, batch_size=8)
    assert prm.kind == 'process' and prm.step_token == '<extra_0>'
    scores = prm(COMPLETIONS, messages=[MESSAGES] * 3)
    assert [len(s) for s in scores] == [1, 1, 3]
    assert all(0.0 < v < 1.0 for s in scores for v in s)
    steps = ['First add the ones.', '2 + 3 = 5.', 'The answer is 5.<|im_end|>']
    tok, ids, logits = _reference(prm_dir, 'LlamaForTokenClassification', '<extra_0>'.join(steps) + '<extra_0>')
    sep_id = tok.convert_tokens_to_ids('<extra_0>')
    positions = [i for i, t in enumerate(ids) if t == sep_id]
    expected = torch.softmax(logits[positions], dim=-1)[:, 1].tolist()
    assert scores[2] == pytest.approx(expected, abs=1e-4)


def test_process_rm_without_step_token_uses_separator_text(plain_prm_dir):
    prm = RewardModelPRM(plain_prm_dir)
    assert prm.step_token == '\n\n'
    completions = ['one step only', 'a\n\nb\n\nc\n\n\n\nd', '', 'x ### y ### z']
    scores = prm(completions, messages=[MESSAGES, None, MESSAGES, MESSAGES])
    assert [len(s) for s in scores] == [1, 4, 1, 1]
    custom = RewardModelPRM(plain_prm_dir, step_separator='###')
    assert custom.step_token == '###' and len(custom(['x ### y ### z'])[0]) == 3
    assert all(math.isfinite(v) for s in scores for v in s)


def test_non_reward_architecture_is_rejected(tiny_llama_dir):
    with pytest.raises(ValueError, match='LlamaForCausalLM'):
        RewardModelPRM(tiny_llama_dir)
