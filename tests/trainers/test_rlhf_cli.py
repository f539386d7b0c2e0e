"""``megaswift rlhf`` from the command line: a bad row or flag fails before any model is built, with one line
naming the file, line and field (or the flag); a good run writes its preference metrics to logging.jsonl."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

CHOSEN = [{'role': 'user', 'content': 'two plus two'}, {'role': 'assistant', 'content': 'four'}]


def write_rows(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def rlhf_args(model, data, out, *extra):
    return ['rlhf', '--model', model, '--dataset', data, '--output_dir', out, '--max_steps', '1',
            '--global_batch_size', '2', '--micro_batch_size', '1', '--max_length', '64', *extra]


@pytest.mark.parametrize('rlhf_type, bad_row, field', [
    ('dpo', {'messages': CHOSEN}, 'rejected_response'),                                 # no rejected side
    ('dpo', {'messages': CHOSEN, 'rejected_response': 'five', 'margin': 'big'}, 'margin'),
    ('rm', {'messages': CHOSEN, 'rejected_messages': CHOSEN[:1]}, 'rejected_messages'),  # ends without an answer
    ('kto', {'messages': CHOSEN}, 'label'),                                              # no label
])
def test_bad_rows_fail_with_file_line_and_field(run_main, tiny_llama_dir, tmp_path, rlhf_type, bad_row, field):
    good = {'messages': CHOSEN, 'rejected_response': 'five'} if rlhf_type != 'kto' else {'messages': CHOSEN,
                                                                                          'label': True}
    data = write_rows(tmp_path / 'data.jsonl', [good, good, bad_row])
    proc = run_main(rlhf_args(tiny_llama_dir, data, tmp_path / 'out', '--rlhf_type', rlhf_type))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert 'data.jsonl:3' in last and field in last, last
    assert not (tmp_path / 'out' / 'logging.jsonl').exists()


@pytest.mark.parametrize('flags, message', [
    (['--rlhf_type', 'dpo', '--loss_type', 'sigmoid', 'hingee'], "unknown DPO loss type(s) ['hingee']"),
    (['--rlhf_type', 'dpoo'], "--rlhf_type: unknown value 'dpoo'"),
    (['--rlhf_type', 'kto', '--loss_type', 'ipo'], '--loss_type selects DPO variants'),
    (['--rlhf_type', 'gkd'], '--rlhf_type gkd needs --teacher_model'),
    (['--rlhf_type', 'rm', '--precompute_ref_log_probs', 'true'], 'only dpo and kto use a reference model'),
    (['--rlhf_type', 'dpo', '--seq_kd', 'true'], '--lmbda and --seq_kd are GKD options'),
    (['--rlhf_type', 'dpo', '--streaming', 'true', '--precompute_ref_log_probs', 'true'],
     '--precompute_ref_log_probs needs the whole dataset'),
    (['--rlhf_type', 'gkd', '--teacher_model', 't', '--lmbda', '1.5'], '--lmbda: a probability in [0, 1]'),
    (['--rlhf_type', 'gkd', '--teacher_model', 't', '--lmbda', '0.5', '--pipeline_model_parallel_size', '2'],
     '--lmbda > 0 generates completions during training'),
])
def test_bad_flags_fail_at_parse_time(run_main, tmp_path, flags, message):
    proc = run_main(rlhf_args('unused', 'unused.jsonl', tmp_path / 'out', *flags))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]


def test_dpo_run_logs_its_metrics(run_cli, tiny_llama_dir, tmp_path):
    rows = [{'messages': CHOSEN, 'rejected_response': 'five'},
            {'messages': [{'role': 'user', 'content': 'one plus one'}, {'role': 'assistant', 'content': 'two'}],
             'rejected_messages': [{'role': 'user', 'content': 'one plus one'},
                                   {'role': 'assistant', 'content': 'three'}]}]
    data = write_rows(tmp_path / 'pairs.jsonl', rows)
    run_cli(rlhf_args(tiny_llama_dir, data, tmp_path / 'out', '--rlhf_type', 'dpo', '--save_steps', '100',
                      '--save_last', 'false', '--logging_steps', '1'))
    logs = [json.loads(line) for line in (tmp_path / 'out' / 'logging.jsonl').read_text().splitlines()]
    step = next(line for line in logs if line.get('step') == 1)
    for key in ('loss', 'rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
                'logps/chosen', 'logps/rejected', 'nll_loss'):
        assert key in step, step
    assert abs(step['loss'] - 0.6931471805599453) < 1e-6  # policy == reference at step 1


def test_kto_kill9_then_resume_equals_an_uninterrupted_run(run_cli, tiny_llama_dir, tmp_path):
    """KTO (reference + policy passes, the step's KL reference point): killed with SIGKILL after the step-3
    checkpoint, ``--resume_from_checkpoint true`` continues with the uninterrupted run's logs, bit for bit."""
    import signal

    from rlhf_cases import write_preference_data
    from test_train_cli import KILL_PLUGIN, read_logs
    data = write_preference_data(tmp_path)['kto']
    env = {'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    common = ['rlhf', '--rlhf_type', 'kto', '--model', tiny_llama_dir, '--dataset', data, '--max_length', '48',
              '--packing', 'true', '--global_batch_size', '4', '--max_steps', '6', '--save_steps', '3',
              '--logging_steps', '1', '--lr', '1e-3', '--warmup_steps', '1', '--save_safetensors', 'false']
    a, b = tmp_path / 'a', tmp_path / 'b'
    run_cli([*common, '--output_dir', a], env=env)
    plugin = tmp_path / 'kill_at_step5.py'
    plugin.write_text(KILL_PLUGIN)
    killed = run_cli([*common, '--output_dir', b, '--external_plugins', plugin], env=env, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (b / 'latest_checkpointed_iteration.txt').read_text() == '3'
    run_cli([*common, '--output_dir', b, '--resume_from_checkpoint', 'true'], env=env)
    want, got = read_logs(a), read_logs(b)
    assert sorted(got) == sorted(want) and len(want) == 6
    for key, rec in want.items():
        for field in ('loss', 'grad_norm', 'lr', 'kl', 'rewards/chosen', 'rewards/rejected'):
            assert got[key].get(field) == rec.get(field), (key, field, got[key], rec)


def test_ref_model_given_as_an_embedded_model_id(run_cli, smollm2_dir, tiny_llama_dir, tmp_path):
    """``--ref_model`` resolves like ``--model`` (here the embedded SmolLM2's id, no hub): before, preflight
    resolved it but the trainer built the reference from the raw id and failed with a hub traceback."""
    data = write_rows(tmp_path / 'pairs.jsonl', [{'messages': CHOSEN, 'rejected_response': 'five'}] * 2)
    run_cli(rlhf_args(tiny_llama_dir, data, tmp_path / 'out', '--rlhf_type', 'dpo', '--logging_steps', '1',
                      '--ref_model', 'HuggingFaceTB/SmolLM2-135M-Instruct', '--save_last', 'false'))
    step = json.loads((tmp_path / 'out' / 'logging.jsonl').read_text().splitlines()[0])
    assert step['step'] == 1 and abs(step['loss'] - 0.6931471805599453) > 1e-3  # another model than the policy
