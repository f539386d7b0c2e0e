"""``megaswift template``: one row in, the encoded sections out; bad rows fail with file:line."""
from __future__ import annotations

import json

import pytest

from megaswift.cli.main import main

ROW = {'messages': [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': 'It is 4.'}]}


def write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
    return path


def test_cli_prints_sections(run_cli, smollm2_dir, tmp_path):
    data = tmp_path / 'row.json'
    data.write_text(json.dumps(ROW, indent=2), encoding='utf-8')
    out = run_cli(['template', '--model', smollm2_dir, '--data', data]).stdout
    assert '[TEMPLATE] smollm2' in out
    assert '[INPUT_IDS] [1, ' in out
    assert '[INPUT] <|im_start|>system\nYou are a helpful AI assistant named SmolLM' in out
    assert '<|im_start|>assistant\nIt is 4.<|im_end|>\n' in out
    labels = next(line for line in out.splitlines() if line.startswith('[LABELS] '))
    assert labels.startswith('[LABELS] [-100 * ') and labels.endswith('It is 4.<|im_end|>[-100 * 1]')
    assert '[LOSS_SCALE]' not in out


def test_cli_reports_file_and_line_of_a_bad_row(run_main, smollm2_dir, tmp_path):
    data = write_jsonl(tmp_path / 'rows.jsonl', [ROW, {'messages': [{'role': 'robot', 'content': 'x'}]}])
    proc = run_main(['template', '--model', smollm2_dir, '--data', data, '--line', '2'])
    assert proc.returncode == 1
    assert f'{data}:2' in proc.stderr and 'messages[0].role' in proc.stderr and 'Traceback' not in proc.stderr


def test_cli_line_mode_and_formats(smollm2_dir, tmp_path, capsys):
    alpaca = {'instruction': 'Say hi', 'output': 'Hi!'}
    data = write_jsonl(tmp_path / 'rows.jsonl', [ROW, alpaca])
    assert main(['template', '--model', smollm2_dir, '--data', str(data), '--line', '2', '--template', 'qwen2_5',
                 '--mode', 'infer']) == 0
    out = capsys.readouterr().out
    assert '[TEMPLATE] qwen2_5 (row ' in out and 'rows.jsonl:2' in out
    assert out.rstrip('\n').endswith('<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant')
    assert '[LABELS]' not in out


def test_cli_loss_scale_system_and_rlhf(smollm2_dir, tmp_path, capsys):
    row = {'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b', 'loss': 0.5},
                        {'role': 'user', 'content': 'c'}, {'role': 'assistant', 'content': 'd'}],
           'rejected_response': 'e'}
    data = write_jsonl(tmp_path / 'rows.jsonl', [row])
    assert main(['template', '--model', smollm2_dir, '--data', str(data), '--system', 'Be nice.']) == 0
    out = capsys.readouterr().out
    assert '<|im_start|>system\nBe nice.<|im_end|>' in out
    scale = json.loads(next(line for line in out.splitlines() if line.startswith('[LOSS_SCALE] '))[13:])
    assert sorted(set(scale)) == [0.0, 0.5, 1.0]
    assert main(['template', '--model', smollm2_dir, '--data', str(data), '--mode', 'rlhf']) == 0
    out = capsys.readouterr().out
    for tag in ('CHOSEN_INPUT_IDS', 'CHOSEN_LABELS', 'REJECTED_INPUT', 'REJECTED_LABELS', 'REJECTED_LOSS_SCALE'):
        assert f'[{tag}] ' in out
    assert next(line for line in out.splitlines() if line.startswith('[REJECTED_LABELS] ')).endswith(
        'e<|im_end|>[-100 * 1]')


@pytest.mark.parametrize('args, message', [
    (['--line', '5'], 'rows.jsonl:5: no row starts at this line'),
    (['--max_length', '10'], "rows.jsonl:1: field 'messages': "),
    (['--template', 'qwen4'], "--template: unknown template 'qwen4'"),
    (['--template', 'llama3', '--enable_thinking', 'false'], "'llama3' template has no thinking switch"),
    (['--mode', 'eval'], "--mode: invalid choice 'eval'"),
])
def test_cli_errors(smollm2_dir, tmp_path, capsys, args, message):
    data = write_jsonl(tmp_path / 'rows.jsonl', [ROW])
    assert main(['template', '--model', smollm2_dir, '--data', str(data), *args]) in (1, 2)
    assert message in capsys.readouterr().err


def test_cli_wraps_template_errors_with_the_row_source(smollm2_dir, tmp_path, capsys):
    data = tmp_path / 'row.json'
    data.write_text('\n' + json.dumps({'messages': [{'role': 'user', 'content': 'no answer'}]}), encoding='utf-8')
    assert main(['template', '--model', smollm2_dir, '--data', str(data)]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: field 'messages': has no assistant turn to train on" in err
