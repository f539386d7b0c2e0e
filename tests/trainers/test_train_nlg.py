"""``megaswift sft --eval_metric nlg`` through the CLI: greedy generation on megatron-core at every evaluation.

- the texts written to ``predict/step-N.jsonl`` are what HF ``generate`` (greedy) gives on the checkpoint saved
  at that step, for the row's prompt built by the tokenizer's own chat template;
- the logged ``eval_rouge-*`` / ``eval_bleu-4`` are in [0, 100], equal ``nlg_scores`` of those texts, and are
  above 0 once the model has learnt something;
- TP=2 + sequence parallel and DP=2 (with ``--cross_entropy_impl torch``) generate the same texts as TP=1;
- the training losses, grad norms and eval losses are identical with and without ``--eval_metric nlg`` (on a
  model with attention dropout, so training draws random numbers around the evaluations), and the CPU step
  logs carry no ``mfu``;
- ``--pipeline_model_parallel_size 2`` with nlg fails in one line before any model is built.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from testing_utils import build_tiny_model, read_jsonl
from train_cases import WORDS, write_chat_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NLG_KEYS = ('eval_rouge-1', 'eval_rouge-2', 'eval_rouge-l', 'eval_bleu-4')
MAX_NEW = 12


def cli(args, env: dict, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'NPROC_PER_NODE')}
    full.update(env, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    full.setdefault('OMP_NUM_THREADS', '1')
    if nproc > 1:
        full['NPROC_PER_NODE'] = str(nproc)
    proc = subprocess.run([sys.executable, '-m', 'megaswift.cli.main', *map(str, args)], env=full,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f'megaswift {" ".join(map(str, args))} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
    return proc


def write_prefixed_chat_data(path: Path, n: int = 40, seed: int = 1) -> str:
    """Every answer starts with 'omega psi': a few steps teach it, so ROUGE is above 0."""
    rng = random.Random(seed)
    with open(path, 'w', encoding='utf-8') as f:
        for _ in range(n):
            q = ' '.join(rng.choices(WORDS, k=rng.randint(1, 6)))
            a = 'omega psi ' + ' '.join(rng.choices(WORDS, k=rng.randint(1, 8)))
            f.write(json.dumps({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]})
                    + '\n')
    return str(path)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp('train_nlg')
    # an untied head: a random tiny model then generates varied tokens (a tied one repeats its last input)
    model = build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=4, tie_word_embeddings=False,
                             num_key_value_heads=2)
    dropout_model = build_tiny_model(root / 'llama_dropout', 'llama', smollm2_dir, seed=5, tie_word_embeddings=False,
                                     num_key_value_heads=2, attention_dropout=0.1)
    data = write_chat_data(root / 'chat.jsonl', n=40, seed=1)
    common = ['--model', model, '--dataset', data, '--max_length', '64', '--packing', 'true', '--global_batch_size',
              '4', '--max_steps', '4', '--logging_steps', '1', '--lr', '1e-4', '--split_dataset_ratio', '0.2',
              '--eval_steps', '2', '--max_new_tokens', str(MAX_NEW)]
    nlg = ['--eval_metric', 'nlg']
    no_save = ['--save_steps', '100', '--save_last', 'false']
    env = {'MEGASWIFT_CACHE': str(root / 'cache'), 'HF_HUB_OFFLINE': '1'}
    out = {name: root / name for name in ('nlg', 'tp2_sp', 'dp2_torch_ce', 'learned', 'learned_plain')}
    cli(['sft', *common, *nlg, '--save_steps', '2', '--output_dir', out['nlg']], env)  # HF checkpoints at 2, 4
    cli(['sft', *common, *nlg, *no_save, '--tensor_model_parallel_size', '2', '--sequence_parallel', 'true',
         '--output_dir', out['tp2_sp']], env, nproc=2)
    cli(['sft', *common, *nlg, *no_save, '--cross_entropy_impl', 'torch', '--output_dir', out['dp2_torch_ce']], env,
        nproc=2)
    learned = ['--model', dropout_model, '--dataset', write_prefixed_chat_data(root / 'prefixed.jsonl'), '--lr',
               '2e-3']
    cli(['sft', *common, *learned, *nlg, '--save_steps', '100', '--output_dir', out['learned']], env)
    cli(['sft', *common, *learned, *no_save, '--output_dir', out['learned_plain']], env)
    return {'root': root, 'model': model, 'data': data, 'common': common, 'env': env, **out}


def evals(out: Path) -> dict[int, dict]:
    return {r['step']: r for r in read_jsonl(out / 'logging.jsonl') if 'eval_loss' in r}


def trains(out: Path) -> dict[int, dict]:
    return {r['step']: r for r in read_jsonl(out / 'logging.jsonl') if 'loss' in r}


def predictions(out: Path, step: int) -> list[dict]:
    return read_jsonl(out / 'predict' / f'step-{step}.jsonl')


def test_scores_are_logged_from_the_generated_texts(runs):
    from megaswift.metrics import nlg_scores
    answers = {json.loads(line)['messages'][1]['content'] for line in Path(runs['data']).read_text().splitlines()}
    for name, steps in (('nlg', (2, 4)), ('learned', (2, 4))):
        logged = evals(runs[name])
        assert sorted(logged) == list(steps)
        for step in steps:
            rows = predictions(runs[name], step)
            assert [r['index'] for r in rows] == list(range(8))  # 20% of 40 rows held out, in dataset order
            scores = nlg_scores([r['response'] for r in rows], [r['labels'] for r in rows])
            for key in NLG_KEYS:
                assert 0.0 <= logged[step][key] <= 100.0, (name, step, logged[step])
                assert logged[step][key] == pytest.approx(scores[key[len('eval_'):]], abs=1e-9)
            if name == 'nlg':  # the references: the assistant answers, decoded without <|im_end|>
                assert all(r['labels'] in answers for r in rows), rows
    learned = evals(runs['learned'])[4]
    assert learned['eval_rouge-1'] > 0 and learned['eval_bleu-4'] > 0, learned


def test_generation_matches_hf_greedy_on_the_saved_weights(runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(runs['model'])
    query = {}
    for path in (runs['data'], runs['root'] / 'prefixed.jsonl'):
        for line in Path(path).read_text().splitlines():
            messages = json.loads(line)['messages']
            query[messages[1]['content']] = messages[0]
    for name, step in (('nlg', 2), ('nlg', 4), ('learned', 4)):
        rows = predictions(runs[name], step)
        if name == 'nlg':
            assert len({r['response'] for r in rows}) > 4, rows  # varied texts: a meaningful comparison
        # (with attention dropout in 'learned': generation runs in eval mode, as HF's)
        model = AutoModelForCausalLM.from_pretrained(runs[name] / f'checkpoint-{step}', dtype=torch.float32).eval()
        for r in rows:
            prompt = tok.apply_chat_template([query[r['labels']]], add_generation_prompt=True, return_tensors='pt',
                                             return_dict=True)['input_ids']
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW,
                                     do_sample=False, eos_token_id=[tok.eos_token_id], pad_token_id=tok.eos_token_id)
            new = out[0, prompt.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            assert r['response'] == tok.decode(new, skip_special_tokens=True), (name, step, r)


def test_training_is_unchanged_by_generation(runs):
    with_nlg, without = trains(runs['learned']), trains(runs['learned_plain'])
    assert sorted(with_nlg) == sorted(without) == [1, 2, 3, 4]
    for step, rec in without.items():
        for key in ('loss', 'grad_norm', 'lr'):
            assert with_nlg[step][key] == rec[key], (step, key, with_nlg[step], rec)
    e_with, e_without = evals(runs['learned']), evals(runs['learned_plain'])
    assert sorted(e_without) == [2, 4]
    for step, rec in e_without.items():
        assert not set(NLG_KEYS) & set(rec)
        for key in ('eval_loss', 'eval_acc', 'eval_tokens'):
            assert e_with[step][key] == rec[key]
    for name in ('nlg', 'tp2_sp', 'dp2_torch_ce', 'learned', 'learned_plain'):
        assert not any('mfu' in r for r in read_jsonl(runs[name] / 'logging.jsonl'))  # GPU only


@pytest.mark.parametrize('layout', ['tp2_sp', 'dp2_torch_ce'])
def test_parallel_layouts_generate_the_same_texts(runs, layout):
    for step in (2, 4):
        assert predictions(runs[layout], step) == predictions(runs['nlg'], step), (layout, step)
        got, want = evals(runs[layout])[step], evals(runs['nlg'])[step]
        assert {k: got[k] for k in NLG_KEYS} == {k: want[k] for k in NLG_KEYS}


def test_pipeline_parallel_is_rejected_before_the_model_is_built(runs, tmp_path):
    proc = cli(['sft', *runs['common'], '--eval_metric', 'nlg', '--pipeline_model_parallel_size', '2',
                '--output_dir', tmp_path / 'pp2'], runs['env'], nproc=2, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if 'megaswift sft: error:' in line]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert '--eval_metric nlg generates text' in lines[0] and '--pipeline_model_parallel_size 2 is not supported' \
        in lines[0], lines[0]
    assert 'encoding train set' not in proc.stderr and 'parameters on this rank' not in proc.stderr
    assert not (tmp_path / 'pp2').exists()
