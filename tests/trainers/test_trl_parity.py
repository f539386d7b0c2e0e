"""``megaswift rlhf`` against TRL 1.16's trainers: the first step's loss (and its metrics) of DPO (sigmoid, ipo),
KTO and reward modelling on a tiny random Llama, with a reference model that differs from the policy (policy ==
reference would pin DPO at log 2 and KTO at 0.5 whatever the code did).

megaswift runs through its CLI (``--logging_steps 1``: the step-1 line of ``logging.jsonl`` is computed before the
first update, over the global batch of 4 rows); TRL's side is its trainer's ``compute_loss`` on the first batch of its
own dataloader (one batch of the same 4 rows), the exact value rather than the logged one rounded to 4 digits.

Both sides score the same token ids, asserted first:

- DPO and KTO: TRL's *standard* format, the prompt rendered by the tokenizer's chat template (generation prompt
  included) and the bare answer, to which TRL appends the EOS ``<|im_end|>``. megaswift's sequences end in one
  more token, the ``\\n`` after ``<|im_end|>``, which it does not score and which no scored position attends to.
  TRL's *conversational* format does score that ``\\n`` (its completion is the chat template's rendering of the
  assistant turn, ``answer<|im_end|>\\n``), so the log-probs differ by one token per sequence there.
- KTO's mismatched (KL) completions: megaswift pairs row i's prompt with row (i + 1) % n's answer
  (``dataset.add_kl_responses``); TRL rotates the other way inside each batch, row i with row i - 1. TRL gets the
  rows in reverse order, which makes the two sets of pairs the same.
- Reward model: TRL's conversational format, whose sequences are megaswift's, ``\\n`` included; both take the
  reward at the last token (HF pools at the last token that is not the pad id, ``<|im_end|>`` here, so the
  sequence must not end with it: the standard format would pool one token early). TRL's ``score.weight`` is set to
  megaswift's value-head initialisation.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testing_utils import build_tiny_model, template_in_mode

pytestmark = pytest.mark.slow
trl = pytest.importorskip('trl')

REPO = Path(__file__).resolve().parents[2]
BETA = 0.1
MAX_LENGTH = 128
NEWLINE = 198  # SmolLM2's '\n'
# (prompt, chosen, rejected): answers of different lengths, so TRL's padded batch has padding
QA = [('two plus two', 'four', 'five'),
      ('name a colour', 'blue is a colour', 'seven'),
      ('capital of France?', 'Paris', 'the capital is Rome, I think'),
      ('say hi', 'hi there!', 'no')]
RUNS = {'sigmoid': ('dpo', 'pairs', ['--loss_type', 'sigmoid']), 'ipo': ('dpo', 'pairs', ['--loss_type', 'ipo']),
        'kto': ('kto', 'kto', []), 'rm': ('rm', 'pairs', [])}


def pair_rows():
    return [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': c}], 'rejected_response': r}
            for q, c, r in QA]


def kto_rows():
    """Undesirable, desirable, undesirable, desirable: rows 0 and 2 answer with the rejected response."""
    return [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': c if i % 2 else r}],
             'label': bool(i % 2)} for i, (q, c, r) in enumerate(QA)]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, smollm2_dir):
    """Policy (seed 0) and reference (seed 1): tiny Llamas with a wide init, so the two disagree visibly and the
    losses sit far from their policy == reference values; the data; megaswift's four step-1 records."""
    root = tmp_path_factory.mktemp('trl_parity')
    policy = build_tiny_model(root / 'policy', 'llama', smollm2_dir, seed=0, initializer_range=0.2)
    ref = build_tiny_model(root / 'ref', 'llama', smollm2_dir, seed=1, initializer_range=0.2)
    data = {}
    for name, rows in (('pairs', pair_rows()), ('kto', kto_rows())):
        data[name] = root / f'{name}.jsonl'
        data[name].write_text(''.join(json.dumps(r) + '\n' for r in rows))
    env = {**os.environ, 'MEGASWIFT_CACHE': str(root / 'cache'), 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    procs = {}
    for name, (rlhf_type, dataset, extra) in RUNS.items():  # all four at once: mostly start-up time
        ref_args = ['--ref_model', ref, '--beta', BETA] if rlhf_type != 'rm' else []
        args = ['rlhf', '--rlhf_type', rlhf_type, '--model', policy, *ref_args, '--dataset', data[dataset],
                '--output_dir', root / name, '--global_batch_size', len(QA), '--micro_batch_size', 1,
                '--packing', 'false', '--max_length', MAX_LENGTH, '--max_steps', 1, '--lr', 1e-6,
                '--save_last', 'false', '--save_steps', 1000, '--logging_steps', 1, *extra]
        procs[name] = subprocess.Popen([sys.executable, '-m', 'megaswift.cli.main', *map(str, args)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f'megaswift rlhf ({name}) failed:\n{out[-6000:]}'
        records = [json.loads(line) for line in (root / name / 'logging.jsonl').read_text().splitlines() if line]
        logs[name] = next(r for r in records if r.get('step') == 1)
    return {'root': root, 'policy': policy, 'ref': ref, 'logs': logs}


@pytest.fixture(scope='module')
def tokenizer(setup):
    from megaswift.model import load_tokenizer
    return load_tokenizer(setup['policy'])


def split_scored(ids, labels):
    """A megaswift sequence as (prompt, scored completion, unscored tail); the scored tokens are contiguous and
    are the sequence's own tokens (labels are not shifted in the encoding)."""
    from megaswift.template import IGNORE_INDEX
    at = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    first, last = at[0], at[-1]
    assert at == list(range(first, last + 1)) and labels[first:last + 1] == ids[first:last + 1]
    return ids[:first], ids[first:last + 1], ids[last + 1:]


def standard_prompt(tokenizer, row):
    return tokenizer.apply_chat_template(row['messages'][:-1], add_generation_prompt=True, tokenize=False)


def trl_pairs(tokenizer, fmt):
    out = []
    for row in pair_rows():
        chosen, rejected = row['messages'][-1]['content'], row['rejected_response']
        if fmt == 'standard':  # TRL appends the EOS
            out.append({'prompt': standard_prompt(tokenizer, row), 'chosen': chosen, 'rejected': rejected})
        else:
            out.append({'prompt': row['messages'][:-1], 'chosen': [{'role': 'assistant', 'content': chosen}],
                        'rejected': [{'role': 'assistant', 'content': rejected}]})
    return out


def trl_kto_rows(tokenizer):
    """TRL's unpaired standard rows, in reverse order (see the module docstring)."""
    rows = [{'prompt': standard_prompt(tokenizer, r), 'completion': r['messages'][-1]['content'], 'label': r['label']}
            for r in kto_rows()]
    return rows[::-1]


def trl_args(config_cls, out, **kwargs):
    return config_cls(output_dir=str(out), use_cpu=True, report_to=[], max_steps=1, per_device_train_batch_size=len(QA),
                      learning_rate=1e-6, logging_steps=1, bf16=False, save_strategy='no', max_length=MAX_LENGTH,
                      **kwargs)


def causal_lm(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype='float32')


def dpo_trainer(setup, tokenizer, fmt, loss_type='sigmoid'):
    from datasets import Dataset
    args = trl_args(trl.DPOConfig, setup['root'] / f'trl_dpo_{fmt}_{loss_type}', beta=BETA, loss_type=[loss_type])
    return trl.DPOTrainer(model=causal_lm(setup['policy']), ref_model=causal_lm(setup['ref']), args=args,
                          train_dataset=Dataset.from_list(trl_pairs(tokenizer, fmt)), processing_class=tokenizer)


def kto_trainer(setup, tokenizer):
    from datasets import Dataset
    return trl.KTOTrainer(model=causal_lm(setup['policy']), ref_model=causal_lm(setup['ref']),
                          args=trl_args(trl.KTOConfig, setup['root'] / 'trl_kto', beta=BETA),
                          train_dataset=Dataset.from_list(trl_kto_rows(tokenizer)), processing_class=tokenizer)


def reward_trainer(setup, tokenizer):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(setup['policy'], num_labels=1, dtype='float32')
    hidden = model.config.hidden_size
    with torch.no_grad():  # megaswift/megatron/heads.py ValueHead's initial weight
        model.score.weight.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(0),
                                             dtype=torch.float32) / hidden ** 0.5)
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    return trl.RewardTrainer(model=model, args=trl_args(trl.RewardConfig, setup['root'] / 'trl_rm'),
                             train_dataset=Dataset.from_list(trl_pairs(tokenizer, 'conversational')),
                             processing_class=tokenizer)


def first_step(trainer):
    """TRL's loss on the first batch of its train dataloader, in train mode, and the metrics it recorded."""
    import torch
    batch = next(iter(trainer.get_train_dataloader()))
    rows = len(batch['label']) if 'label' in batch else len(batch['input_ids']) // 2  # KTO: one sequence a row
    assert rows == len(QA)  # every row in the one batch
    trainer.model.train()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, batch))
    return loss, {k: v[-1] for k, v in trainer._metrics['train'].items()}


TOL = 1e-4


def close(a, b, tol=TOL):
    return abs(a - b) <= tol


# -- the token ids both sides score ---------------------------------------------------------------------------------

def test_dpo_and_rm_score_the_same_token_ids(setup, tokenizer):
    template = template_in_mode(tokenizer, 'rlhf')
    ours = [template.encode(row) for row in pair_rows()]
    standard = dpo_trainer(setup, tokenizer, 'standard').train_dataset
    conversational = dpo_trainer(setup, tokenizer, 'conversational').train_dataset
    rm = reward_trainer(setup, tokenizer).train_dataset
    for enc, std, conv, rm_row in zip(ours, standard, conversational, rm):
        for side in ('chosen', 'rejected'):
            ids, labels = enc[f'{side}_input_ids'], enc[f'{side}_labels']
            prompt, completion, tail = split_scored(ids, labels)
            assert std['prompt_ids'] == prompt and std[f'{side}_ids'] == completion
            assert completion[-1] == tokenizer.eos_token_id and tail == [NEWLINE]  # megaswift: '\n' not scored
            # TRL's conversational format scores that '\n' as well: one token more per sequence
            assert conv['prompt_ids'] == prompt and conv[f'{side}_ids'] == completion + [NEWLINE]
            # reward model: the whole sequence, the reward at its last token, which is not the pad id
            assert rm_row[f'{side}_ids'] == ids and ids[-1] != tokenizer.pad_token_id


def test_kto_scores_the_same_token_ids_and_kl_pairs(setup, tokenizer):
    from megaswift.dataset import Dataset, add_kl_responses
    template = template_in_mode(tokenizer, 'kto')
    ours = [template.encode(row) for row in add_kl_responses(Dataset(kto_rows(), [None] * len(QA))).rows]
    theirs = kto_trainer(setup, tokenizer).train_dataset
    for enc, row in zip(ours, reversed(list(theirs))):
        prompt, completion, tail = split_scored(enc['input_ids'], enc['labels'])
        kl_prompt, kl_completion, kl_tail = split_scored(enc['kl_input_ids'], enc['kl_labels'])
        assert row['label'] == bool(enc['label'])
        assert row['prompt_ids'] == prompt == kl_prompt and tail == kl_tail == [NEWLINE]
        assert row['completion_ids'] == completion and row['KL_completion_ids'] == kl_completion


# -- the first step's loss ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo'])
def test_dpo_first_step_matches_trl(setup, tokenizer, loss_type):
    ours = setup['logs'][loss_type]
    loss, metrics = first_step(dpo_trainer(setup, tokenizer, 'standard', loss_type))
    policy_is_ref = math.log(2) if loss_type == 'sigmoid' else (1 / (2 * BETA)) ** 2
    assert abs(loss - policy_is_ref) > 100 * TOL, loss  # the reference really differs from the policy
    assert close(ours['loss'], loss), (ours['loss'], loss)
    for key in ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen',
                'logps/rejected'):
        assert close(ours[key], metrics[key]), (key, ours[key], metrics[key])


def test_kto_first_step_matches_trl(setup, tokenizer):
    ours = setup['logs']['kto']
    loss, metrics = first_step(kto_trainer(setup, tokenizer))
    assert metrics['kl'] > 0.1 and abs(loss - 0.5) > 100 * TOL, (loss, metrics)  # z0 not clamped to 0; ref != policy
    assert close(ours['loss'], loss), (ours['loss'], loss)
    for key in ('kl', 'rewards/chosen', 'rewards/rejected', 'logps/chosen', 'logps/rejected'):
        assert close(ours[key], metrics[key]), (key, ours[key], metrics[key])


def test_reward_model_first_step_matches_trl(setup, tokenizer):
    ours = setup['logs']['rm']
    loss, metrics = first_step(reward_trainer(setup, tokenizer))
    assert close(ours['loss'], loss), (ours['loss'], loss)
    assert close(ours['rewards/accuracies'], metrics['accuracy'])
    assert close(ours['rewards/margins'], metrics['margin'])
    assert close((ours['rewards/chosen'] + ours['rewards/rejected']) / 2, metrics['mean_reward'])
