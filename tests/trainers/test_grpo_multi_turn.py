"""Multi-turn GRPO rollouts (``--multi_turn_scheduler``, ``--max_turns``; ``trainers/grpo/multi_turn.py``).

- token-exact sequences: a scheduler that appends one fixed user turn gives prompt + the engine's turn-1 tokens +
  the appended turn's tokens (as the chat template renders them after the turn) + the engine's turn-2 tokens, and
  the trainer's sequences label exactly the generated tokens; turn 2 is generated from exactly that prefix, with
  the seed derived from turn 1's; without a scheduler (or ``--max_turns 1``) the sequences are single-turn;
- ``--max_turns`` is honoured;
- ``megaswift rlhf --rlhf_type grpo --multi_turn_scheduler`` trains and logs whole conversations (the reward sees the
  ``turns`` column), and the same run without the scheduler stays single-turn;
- an unknown scheduler is a one-line error listing the registered ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import grpo_multi_turn_plugin as plugin
from grpo_cases import write_prompts
from train_cases import WORDS
from testing_utils import build_tiny_model, read_jsonl

REPO = Path(__file__).resolve().parents[2]
PLUGIN = str(Path(__file__).resolve().parent / 'grpo_multi_turn_plugin.py')
REWARD_PLUGIN = str(Path(__file__).resolve().parent / 'grpo_reward_plugin.py')  # vowel_share: rewards that differ
MAX_LENGTH, MAX_COMPLETION = 256, 16
G = 4

pytestmark = pytest.mark.slow


def make_stopping(model_dir: str) -> None:
    """Make the random model stop: the end-of-sequence id becomes 0 (``<|endoftext|>``, never in a prompt) and its
    tied embedding row a random vector scaled so that, at the positions of sampled completions, the stop token has
    probability 0.08 to 0.3 (``grpo_cases.make_stopping`` calibrates on prompt positions instead)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    probe = tok.apply_chat_template([{'role': 'user', 'content': ' '.join(WORDS[:4])}], add_generation_prompt=True,
                                    return_dict=True, return_tensors='pt')['input_ids']
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = model.generate(probe, do_sample=True, max_new_tokens=MAX_COMPLETION, num_return_sequences=4,
                                 eos_token_id=None, pad_token_id=0)
    table = model.get_input_embeddings().weight.data
    scale = table.std()
    for factor, seed in ((f, s) for f in (20, 40, 60, 80, 120, 160) for s in range(10)):
        table[0] = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed)) * scale * factor
        with torch.no_grad():
            p_stop = torch.softmax(model(sampled).logits[:, probe.shape[1] - 1:-1], -1)[..., 0]
        if 0.08 <= float(p_stop.mean()) <= 0.3:
            break
    else:
        raise AssertionError('no end-of-sequence row gives a stop probability in [0.08, 0.3]')
    model.config.eos_token_id = model.generation_config.eos_token_id = 0
    model.save_pretrained(model_dir)


class Recorder:
    """A generation source that keeps every request and reply (the engine's token ids)."""

    def __init__(self, source):
        self.source, self.version, self.calls = source, None, []

    def generate(self, requests):
        reply = self.source.generate(requests)
        self.calls.append((requests, reply['results']))
        return reply


@pytest.fixture(scope='module')
def setup(tmp_path_factory, smollm2_dir):
    from megaswift.dataset.loader import load_rows
    from megaswift.model import load_tokenizer
    from megaswift.template import get_template
    from megaswift.trainers.grpo.data import encode_prompts
    from megaswift.trainers.grpo.generation import ColocateSource
    root = tmp_path_factory.mktemp('grpo_multi_turn')
    model = build_tiny_model(root / 'llama', 'llama', smollm2_dir, seed=0, num_hidden_layers=4,
                             num_key_value_heads=2)
    make_stopping(model)  # most completions end on a stop token within MAX_COMPLETION tokens
    files = write_prompts(root, n=8)
    tokenizer = load_tokenizer(model)
    encoder = get_template(tokenizer, max_length=MAX_LENGTH)
    prompts = encode_prompts(load_rows([files['prompts']], 42, chat=True), encoder, MAX_LENGTH - MAX_COMPLETION)
    source = ColocateSource('transformers', model, 'float32', True)
    yield {'root': root, 'model': model, 'tokenizer': tokenizer, 'encoder': encoder, 'prompts': prompts,
           'source': source, 'prompts_file': files['prompts']}
    source.close()


def _rollout(setup, scheduler, prompt_ids=(0, 1, 2, 3)):
    """(recorder, first-turn requests, conversations) of ``scheduler`` on ``prompt_ids``."""
    from megaswift.trainers.grpo.generation import generate_checked
    from megaswift.trainers.grpo.multi_turn import MultiTurnRollout
    from megaswift.trainers.rollout import sample_seed
    prompts, rec = setup['prompts'], Recorder(setup['source'])
    requests = [{'prompt_token_ids': prompts.ids[i], 'n': G, 'temperature': 1.0, 'top_p': 1.0, 'top_k': -1,
                 'max_tokens': MAX_COMPLETION, 'seed': sample_seed(42, 0, i)} for i in prompt_ids]
    results = generate_checked(rec, requests)
    rollout = MultiTurnRollout(scheduler, setup['encoder'], setup['tokenizer'], MAX_LENGTH, MAX_COMPLETION)
    return rec, requests, rollout, rollout.run(rec, prompts, list(prompt_ids), requests, results)


def _bridge_text(stopped_on_end: bool, content: str) -> str:
    """ChatML (SmolLM2's template) after an assistant turn's content: end of turn, the user turn, the prompt."""
    end = '' if stopped_on_end else '<|im_end|>'
    return f'{end}\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n'


def test_fixed_user_turn_is_token_exact(setup):
    from megaswift.trainers.grpo.trainer import GrpoTrainer
    from megaswift.trainers.rollout import sample_seed
    from megaswift.utils.constants import IGNORE_INDEX
    tok, prompts = setup['tokenizer'], setup['prompts']
    rec, requests, rollout, convs = _rollout(setup, plugin.AskOnce())
    (first_requests, first), second = rec.calls[0], rec.calls[1:]
    assert first_requests == requests and len(second) == 1  # one batched request for every open conversation
    turn2_requests, turn2 = second[0]
    end_id = tok.convert_tokens_to_ids('<|im_end|>')
    two = 0
    for c, conv in enumerate(convs):
        p, k = divmod(c, G)
        t1 = first[p]['completions'][k]
        prompt = prompts.ids[p]
        assert conv.prompt_ids == prompt and conv.ids[:len(t1['token_ids'])] == t1['token_ids']
        if t1['finish_reason'] == 'length':  # a truncated turn ends the conversation
            assert conv.turns == 1 and conv.ids == t1['token_ids'] and set(conv.mask) == {1}
            continue
        two += 1
        stopped_on_end = t1['token_ids'][-1] == end_id
        bridge = tok(_bridge_text(stopped_on_end, plugin.FOLLOW_UP), add_special_tokens=False)['input_ids']
        j = next(j for j, r in enumerate(turn2_requests) if r['prompt_token_ids'] == prompt + t1['token_ids'] + bridge
                 and r['seed'] == sample_seed(requests[p]['seed'], 2, k))
        t2 = turn2[j]['completions'][0]['token_ids']
        assert turn2_requests[j]['n'] == 1
        room = MAX_LENGTH - len(prompt + t1['token_ids'] + bridge)
        assert turn2_requests[j]['max_tokens'] == min(MAX_COMPLETION, room)
        assert conv.ids == t1['token_ids'] + bridge + t2 and conv.turns == 2
        assert conv.mask == [1] * len(t1['token_ids']) + [0] * len(bridge) + [1] * len(t2)
        assert [m['role'] for m in conv.messages[-3:]] == ['assistant', 'user', 'assistant']
        assert conv.messages[-2]['content'] == plugin.FOLLOW_UP
        assert conv.messages[-1]['content'] == tok.decode(t2, skip_special_tokens=True)
    assert two >= 4 and len(turn2_requests) == two, (two, len(turn2_requests))
    # the trainer's sequences: input_ids = prompt + everything after it, labels exactly on the generated tokens
    batch = {'prompt_ids': [0, 1, 2, 3], 'texts': [''] * len(convs), 'per_func': [[0.0]] * len(convs),
             'total': [float(c % 3) for c in range(len(convs))], **rollout.batch_columns(convs)}
    stub = SimpleNamespace(args=SimpleNamespace(num_generations=G, advantage_estimator='grpo', scale_rewards='group',
                                                overlong_filter=False), prompts=prompts)
    gen = GrpoTrainer._assemble(stub, [(batch, p) for p in range(4)])
    assert gen['turns'] == [c.turns for c in convs] and gen['conversation'][0] == convs[0].messages
    for conv, seq in zip(convs, GrpoTrainer._sequences(stub, gen)):
        assert seq['input_ids'].tolist() == conv.prompt_ids + conv.ids
        want = [IGNORE_INDEX] * len(conv.prompt_ids) + [t if m else IGNORE_INDEX for t, m in zip(conv.ids, conv.mask)]
        assert seq['labels'].tolist() == want
    # the reward functions see the last turn and the conversation it answers
    texts, columns = rollout.reward_inputs(convs, prompts.reward_columns([c.owner for c in convs],
                                                                        [c.last_ids for c in convs]))
    assert texts == [c.messages[-1]['content'] for c in convs] and columns['turns'] == [c.turns for c in convs]
    assert all(m == c.messages[:-1] for m, c in zip(columns['messages'], convs))


def test_max_turns_and_single_turn_control(setup):
    rec, _, _, convs = _rollout(setup, plugin.AlwaysAsk(max_turns=3), prompt_ids=(4, 5))
    assert len(rec.calls) == 3  # turns 2 and 3, batched
    assert max(c.turns for c in convs) == 3
    for conv in convs:
        assert conv.turns <= 3 and sum(m['role'] == 'assistant' for m in conv.messages) == conv.turns
        if conv.turns < 3:
            assert conv.finish == 'length', conv  # ended by a truncated turn, not by the scheduler
    # control: max_turns 1 never continues; the conversations are the first turn's completions
    rec, _, _, convs = _rollout(setup, plugin.AlwaysAsk(max_turns=1), prompt_ids=(4, 5))
    assert len(rec.calls) == 1
    first = [c for r in rec.calls[0][1] for c in r['completions']]
    assert [c.ids for c in convs] == [c['token_ids'] for c in first] and all(set(c.mask) == {1} for c in convs)


def test_bridge_after_a_stop_token(setup):
    """The template's end of turn is left out when the model generated it (its stop token), kept otherwise (another
    stop token, or a truncated turn a scheduler continues)."""
    from megaswift.trainers.grpo.multi_turn import MultiTurnRollout
    tok = setup['tokenizer']
    rollout = MultiTurnRollout(plugin.AskOnce(), setup['encoder'], tok, MAX_LENGTH, MAX_COMPLETION)
    history, appended = setup['prompts'].prompts[0].messages, [{'role': 'user', 'content': 'again'}]
    end_id = tok.convert_tokens_to_ids('<|im_end|>')
    for last_ids, stopped_on_end in (([11, end_id], True), ([11, 0], False), ([], False)):
        want = tok(_bridge_text(stopped_on_end, 'again'), add_special_tokens=False)['input_ids']
        assert rollout.bridge_ids(history, 'hello', appended, last_ids) == want


def test_math_retry_scheduler():
    from megaswift.trainers.grpo.multi_turn import multi_turns
    s = multi_turns['math_retry'](max_turns=2)
    assert s.step([], 'so the answer is \\boxed{4}', {'solution': '4'}, 1) is None
    assert s.step([], 'the answer is 5', {'solution': '4'}, 1)[0]['role'] == 'user'
    assert s.step([], 'the answer is 5', {'solution': None}, 1) is None
    assert s.check_finished([], 'x', 'stop', 2) and s.check_finished([], 'x', 'length', 1)
    assert not s.check_finished([], 'x', 'stop', 1)


# ---------------------------------------------------------------------------------------------- the CLI
def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
                PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


def _cmd(setup, out: Path, *flags) -> list[str]:
    return [sys.executable, '-m', 'megaswift.cli.main', 'rlhf', '--rlhf_type', 'grpo', '--model', setup['model'],
            '--dataset', setup['prompts_file'], '--external_plugins', PLUGIN, REWARD_PLUGIN,
            '--reward_funcs', 'turn_count', 'vowel_share',
            '--num_generations', '4', '--global_batch_size', '8', '--micro_batch_size', '4',
            '--max_completion_length', str(MAX_COMPLETION), '--max_length', '128', '--temperature', '1.0',
            '--beta', '0.0', '--lr', '1e-5', '--logging_steps', '1', '--seed', '42', '--save_last', 'false',
            '--save_safetensors', 'false', '--save_steps', '1000', '--max_steps', '2', '--log_completions', 'true',
            '--output_dir', str(out), *flags]


def test_cli_trains_and_logs_conversations(setup):
    root = setup['root']
    runs = {}
    for name, flags in (('multi', ('--multi_turn_scheduler', 'ask_once', '--max_turns', '2')), ('single', ())):
        proc = subprocess.run(_cmd(setup, root / name, *flags), env=_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = ([r for r in read_jsonl(root / name / 'logging.jsonl') if 'loss' in r],
                      read_jsonl(root / name / 'completions.jsonl'))
    logs, rows = runs['multi']
    assert len(logs) == 2 and all(r['loss'] == r['loss'] and r['grad_norm'] > 0 for r in logs)
    assert len(rows) == 16 and {r['turns'] for r in rows} <= {1, 2} and any(r['turns'] == 2 for r in rows)
    for r in rows:
        conv = r['conversation']
        assert conv[:len(r['prompt'])] == r['prompt'] and conv[-1] == {'role': 'assistant', 'content': r['completion']}
        assert sum(m['role'] == 'assistant' for m in conv) == r['turns'] == r['rewards']['turn_count']
        if r['turns'] == 2:
            assert conv[len(r['prompt']) + 1] == {'role': 'user', 'content': plugin.FOLLOW_UP}
    mean_turns = sum(r['turns'] for r in rows[:8]) / 8
    assert abs(logs[0]['completions/mean_turns'] - mean_turns) < 1e-9
    assert abs(logs[0]['rewards/turn_count/mean'] - mean_turns) < 1e-9
    # the control: the same run without a scheduler is single-turn (and its first turns are the same completions)
    single_logs, single_rows = runs['single']
    assert all('conversation' not in r and r['rewards']['turn_count'] == 1.0 for r in single_rows)
    assert 'completions/mean_turns' not in single_logs[0]
    first_turns = [r['conversation'][len(r['prompt'])]['content'] for r in rows[:8]]
    assert first_turns == [r['completion'] for r in single_rows[:8]]


def test_cli_unknown_scheduler_is_one_line(setup):
    proc = subprocess.run(_cmd(setup, setup['root'] / 'unknown', '--multi_turn_scheduler', 'ask_twice'), env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if 'error' in line.lower()]  # (besides INFO lines)
    assert len(lines) == 1 and "unknown 'ask_twice'" in lines[0] and 'Traceback' not in proc.stderr, proc.stderr
    for name in ('always_ask', 'ask_once', 'math_retry'):
        assert name in lines[0]
    proc = subprocess.run(_cmd(setup, setup['root'] / 'unknown', '--max_turns', '2'), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and '--max_turns needs --multi_turn_scheduler' in proc.stderr

