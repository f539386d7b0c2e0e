"""Bad models, output folders and rows end in one line, ``megaswift <cmd>: error: ...``, before any model is built,
and leave no files behind.

Most runs call the CLI's ``main`` in this process (the same code as the ``megaswift`` script, without a Python
start-up each); one runs the script itself to check the whole process's output.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from megaswift.cli.main import main

ROW = {'messages': [{'role': 'user', 'content': 'What is 2 + 3?'}, {'role': 'assistant', 'content': '5'}],
       'rejected_response': '6'}


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / 'data.jsonl'
    path.write_text(json.dumps(ROW) + '\n')
    return str(path)


@pytest.fixture
def no_weights_dir(tmp_path, tiny_llama_dir) -> str:
    """A model folder with config.json and the tokenizer but no weight file."""
    out = tmp_path / 'no_weights'
    out.mkdir()
    for f in Path(tiny_llama_dir).iterdir():
        if not f.name.endswith('.safetensors'):
            shutil.copy(f, out / f.name)
    return str(out)


def run(capsys, argv: list[str]) -> str:
    """The last stderr line of ``megaswift ARGV``, which must fail with exit code 1."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_sample_without_weights_is_one_line_and_leaves_no_files(run_cli, no_weights_dir, data, tmp_path):
    out = tmp_path / 'samples'
    r = run_cli(['sample', '--model', no_weights_dir, '--dataset', data, '--output_dir', out], check=False)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"megaswift sample: error: --model: model folder '{no_weights_dir}' has a config.json but no weights: "
        'expected model.safetensors or model.safetensors.index.json or pytorch_model.bin or '
        'pytorch_model.bin.index.json')
    assert not out.exists()  # no .part / .state.json of a run that never started


@pytest.mark.parametrize('command, flags', [
    ('sft', []),
    ('rlhf', ['--rlhf_type', 'dpo']),
])
def test_training_without_weights_fails_before_any_file(capsys, no_weights_dir, data, tmp_path, command, flags):
    out = tmp_path / 'run'
    line = run(capsys, [command, '--model', no_weights_dir, '--dataset', data, '--output_dir', out, '--max_steps', 1,
                        *flags])
    assert line.startswith(f"megaswift {command}: error: --model: model folder '{no_weights_dir}' has a config.json "
                           'but no weights: expected model.safetensors or model.safetensors.index.json')
    assert not out.exists()


def test_reference_model_without_weights_is_named(capsys, tiny_llama_dir, no_weights_dir, data, tmp_path):
    line = run(capsys, ['rlhf', '--rlhf_type', 'dpo', '--model', tiny_llama_dir, '--ref_model', no_weights_dir,
                        '--dataset', data, '--output_dir', tmp_path / 'run', '--max_steps', 1])
    assert line.startswith(f"megaswift rlhf: error: --ref_model: model folder '{no_weights_dir}' has a config.json")


def test_incomplete_sharded_model_names_the_missing_shard(capsys, no_weights_dir, data, tmp_path):
    index = {'metadata': {}, 'weight_map': {'model.embed_tokens.weight': 'model-00001-of-00002.safetensors'}}
    (Path(no_weights_dir) / 'model.safetensors.index.json').write_text(json.dumps(index))
    line = run(capsys, ['sample', '--model', no_weights_dir, '--dataset', data, '--output_dir', tmp_path / 's'])
    assert "is incomplete: shard 'model-00001-of-00002.safetensors'" in line
    assert "tensor 'model.embed_tokens.weight'" in line


def unwritable_output(tmp_path: Path, how: str) -> tuple[Path, str]:
    """An output folder that cannot be made: under a file, or in a read-only folder (not read-only for root)."""
    if how == 'under_a_file':
        (tmp_path / 'a_file').write_text('x')
        return tmp_path / 'a_file' / 'out', f"'{tmp_path / 'a_file'}' in its path is a file, not a folder"
    if os.geteuid() == 0:
        pytest.skip('root writes into read-only folders')
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    return locked / 'out', f"cannot write in '{locked}' (Permission denied)"


@pytest.mark.parametrize('how', ['under_a_file', 'read_only'])
@pytest.mark.parametrize('command, flags', [
    ('sample', ['--dataset', '{data}']),
    ('sft', ['--dataset', '{data}', '--max_steps', '1']),
    ('export', ['--to_mcore', 'true']),
])
def test_unwritable_output_dir_fails_before_the_model_is_built(capsys, tiny_llama_dir, data, tmp_path, command,
                                                               flags, how):
    out, reason = unwritable_output(tmp_path, how)
    line = run(capsys, [command, '--model', tiny_llama_dir, '--output_dir', out,
                        *[f.format(data=data) for f in flags]])
    assert line == f"megaswift {command}: error: --output_dir '{out}': {reason}"


@pytest.mark.parametrize('messages, error', [
    ([ROW['messages'][0], {'role': 'tool_call', 'content': '{"name": "add", "arguments": "[2, 3]"}'},
      {'role': 'tool_response', 'content': '5'}, ROW['messages'][1]],
     "field 'messages[1].content.arguments': must be a JSON object (or a string of one), got list [2, 3]"),
    ([{'role': 'system', 'content': 'Be brief.'}, ROW['messages'][1]],
     "field 'messages': nothing to answer: the conversation has no user turn before the last assistant turn"),
])
def test_sample_rejects_a_bad_row_before_loading_the_model(capsys, tiny_llama_dir, tmp_path, messages, error):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps({'messages': messages}) + '\n')
    out = tmp_path / 'samples'
    line = run(capsys, ['sample', '--model', tiny_llama_dir, '--dataset', bad, '--output_dir', out])
    assert line == f'megaswift sample: error: {bad}:1: {error}'
    assert not out.exists()
