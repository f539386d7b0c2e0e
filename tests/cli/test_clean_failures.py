"""Bad models, output folders and rows end in one line, ``megaswift <cmd>: error: ...``, before any model is built,
and leave no files behind.

Most runs call the CLI's ``main`` in this process (the same code as the ``megaswift`` script, without a Python
start-up each); one runs the script itself to check the whole process's output.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest


ROW = {'messages': [{'role': 'user', 'content': 'What is 2 + 3?'}, {'role': 'assistant', 'content': '5'}],
       'rejected_response': '6'}


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / 'data.jsonl'
    path.write_text(json.dumps(ROW) + '\n')
    return str(path)


def broken_copy(tmp_path: Path, model_dir: str, what: str) -> str:
    """A copy of ``model_dir`` with ``what`` broken: 'no_weights', 'no_tokenizer' or 'bad_config'."""
    out = tmp_path / what
    out.mkdir()
    dropped = {'no_weights': ('.safetensors',), 'no_tokenizer': ('tokenizer.json', 'tokenizer_config.json')}
    for f in Path(model_dir).iterdir():
        if not f.name.endswith(dropped.get(what, ())):
            shutil.copy(f, out / f.name)
    if what == 'bad_config':
        (out / 'config.json').write_text('{"model_type": "llama", ')
    return str(out)


@pytest.fixture
def no_weights_dir(tmp_path, tiny_llama_dir) -> str:
    return broken_copy(tmp_path, tiny_llama_dir, 'no_weights')


def run(run_main, argv: list[str]) -> str:
    """The last stderr line of ``megaswift ARGV`` run in this process, which must fail with exit code 1."""
    proc = run_main(argv)
    assert proc.returncode == 1, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_sample_without_weights_is_one_line_and_leaves_no_files(run_cli, no_weights_dir, data, tmp_path):
    out = tmp_path / 'samples'
    r = run_cli(['sample', '--model', no_weights_dir, '--dataset', data, '--output_dir', out], check=False)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"megaswift sample: error: --model: model folder '{no_weights_dir}' has a config.json but no weights: "
        'expected model.safetensors or model.safetensors.index.json or pytorch_model.bin or '
        'pytorch_model.bin.index.json')
    assert not out.exists()  # no .part / .state.json of a run that never started


NO_WEIGHTS = "has a config.json but no weights: expected model.safetensors or model.safetensors.index.json"
NO_TOKENIZER = 'cannot load the tokenizer of model folder'
BAD_CONFIG = ("cannot read the HF config of '{model}': It looks like the config file at '{model}/config.json' is not "
              'a valid')


BROKEN_MODEL_CASES = [
    ('sft', ['--max_steps', '1'], 'no_weights', f"model folder '{{model}}' {NO_WEIGHTS}"),
    ('rlhf', ['--rlhf_type', 'dpo'], 'no_weights', f"model folder '{{model}}' {NO_WEIGHTS}"),
    ('sample', [], 'no_tokenizer', f"{NO_TOKENIZER} '{{model}}'"),
    ('sft', [], 'no_tokenizer', f"{NO_TOKENIZER} '{{model}}'"),
    ('sample', [], 'bad_config', BAD_CONFIG),
    ('sft', [], 'bad_config', BAD_CONFIG),
]


@pytest.mark.parametrize('command, flags, what, error', BROKEN_MODEL_CASES,
                         ids=[f'{case[0]}-{case[2]}' for case in BROKEN_MODEL_CASES])
def test_broken_model_folder_fails_before_any_file(run_main, tiny_llama_dir, data, tmp_path, command, flags, what,
                                                   error):
    model, out = broken_copy(tmp_path, tiny_llama_dir, what), tmp_path / 'run'
    line = run(run_main, [command, '--model', model, '--dataset', data, '--output_dir', out, *flags])
    assert line.startswith(f'megaswift {command}: error: --model: ' + error.format(model=model)), line
    assert not out.exists()


@pytest.mark.parametrize('what', ['no_tokenizer', 'bad_config'])
def test_template_with_a_broken_model_folder(run_main, tiny_llama_dir, data, tmp_path, what):
    model = broken_copy(tmp_path, tiny_llama_dir, what)
    line = run(run_main, ['template', '--model', model, '--data', data])
    assert line.startswith(f"megaswift template: error: --model: {NO_TOKENIZER} '{model}'"), line


@pytest.mark.parametrize('command', ['deploy', 'rollout'])
def test_servers_without_weights_fail_in_one_line(run_main, no_weights_dir, command):
    line = run(run_main, [command, '--model', no_weights_dir, '--port', '0'])
    assert line.startswith(f"megaswift {command}: error: --model: model folder '{no_weights_dir}' {NO_WEIGHTS}")


def test_reference_model_without_weights_is_named(run_main, tiny_llama_dir, no_weights_dir, data, tmp_path):
    line = run(run_main, ['rlhf', '--rlhf_type', 'dpo', '--model', tiny_llama_dir, '--ref_model', no_weights_dir,
                        '--dataset', data, '--output_dir', tmp_path / 'run', '--max_steps', 1])
    assert line.startswith(f"megaswift rlhf: error: --ref_model: model folder '{no_weights_dir}' has a config.json")


def test_incomplete_sharded_model_names_the_missing_shard(run_main, no_weights_dir, data, tmp_path):
    index = {'metadata': {}, 'weight_map': {'model.embed_tokens.weight': 'model-00001-of-00002.safetensors'}}
    (Path(no_weights_dir) / 'model.safetensors.index.json').write_text(json.dumps(index))
    line = run(run_main, ['sample', '--model', no_weights_dir, '--dataset', data, '--output_dir', tmp_path / 's'])
    assert "is incomplete: shard 'model-00001-of-00002.safetensors'" in line
    assert "tensor 'model.embed_tokens.weight'" in line


def unwritable_output(tmp_path: Path, how: str) -> tuple[Path, str]:
    """An output folder that cannot be made: under a file, or in a read-only folder (as root, whom folder modes do
    not stop: in sysfs, where nobody can create files)."""
    if how == 'under_a_file':
        (tmp_path / 'a_file').write_text('x')
        return tmp_path / 'a_file' / 'out', f"'{tmp_path / 'a_file'}' in its path is a file, not a folder"
    if os.geteuid() == 0:
        sysfs = Path('/sys')
        try:
            with tempfile.TemporaryFile(dir=sysfs):
                pass
        except PermissionError:
            return sysfs / 'megaswift_out', f"cannot write in '{sysfs}' (Permission denied)"
        except OSError:
            pass
        pytest.skip('root writes into read-only folders, and /sys takes files here')
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o555)
    return locked / 'out', f"cannot write in '{locked}' (Permission denied)"


@pytest.mark.parametrize('how', ['under_a_file', 'read_only'])
@pytest.mark.parametrize('command, flags', [
    ('sample', ['--dataset', '{data}']),
    ('sft', ['--dataset', '{data}', '--max_steps', '1']),
    ('export', ['--to_mcore', 'true']),
], ids=['sample', 'sft', 'export'])
def test_unwritable_output_dir_fails_before_the_model_is_built(run_main, tiny_llama_dir, data, tmp_path, command,
                                                               flags, how):
    out, reason = unwritable_output(tmp_path, how)
    line = run(run_main, [command, '--model', tiny_llama_dir, '--output_dir', out,
                        *[f.format(data=data) for f in flags]])
    assert line == f"megaswift {command}: error: --output_dir '{out}': {reason}"


@pytest.mark.parametrize('messages, error', [
    ([ROW['messages'][0], {'role': 'tool_call', 'content': '{"name": "add", "arguments": "[2, 3]"}'},
      {'role': 'tool_response', 'content': '5'}, ROW['messages'][1]],
     "field 'messages[1].content.arguments': must be a JSON object (or a string of one), got list [2, 3]"),
    ([{'role': 'system', 'content': 'Be brief.'}, ROW['messages'][1]],
     "field 'messages': nothing to answer: the conversation has no user turn before the last assistant turn"),
], ids=['tool_call_arguments', 'no_user_turn'])
def test_sample_rejects_a_bad_row_before_loading_the_model(run_main, tiny_llama_dir, tmp_path, messages, error):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps({'messages': messages}) + '\n')
    out = tmp_path / 'samples'
    line = run(run_main, ['sample', '--model', tiny_llama_dir, '--dataset', bad, '--output_dir', out])
    assert line == f'megaswift sample: error: {bad}:1: {error}'
    assert not out.exists()


@pytest.mark.parametrize('architecture', ['LlamaForCausalLM', 'LlamaForSequenceClassification'])
def test_sample_with_an_unusable_reward_model_fails_in_one_line(run_main, tiny_llama_dir, no_weights_dir, data, tmp_path,
                                                                architecture):
    config = Path(no_weights_dir) / 'config.json'  # a causal LM is no reward model; a classifier has no weights here
    config.write_text(json.dumps({**json.loads(config.read_text()), 'architectures': [architecture]}))
    out = tmp_path / 'samples'
    line = run(run_main, ['sample', '--model', tiny_llama_dir, '--orm_model', no_weights_dir, '--dataset', data,
                        '--output_dir', out])
    assert line.startswith(f"megaswift sample: error: --orm_model '{no_weights_dir}': "), line
    assert not out.exists()


@pytest.mark.parametrize('state, output_file, error', [
    ('{"next_batch": 0', 'r.jsonl', 'cannot resume from {dir}/r.jsonl.state.json: it is unreadable or not JSON'),
    ('[1]', 'r.jsonl', 'cannot resume from {dir}/r.jsonl.state.json: it is not a sample state file'),
    ('[1]', None, '--resume: no unfinished run in {dir} matches these arguments'),
], ids=['torn', 'not_a_state', 'not_a_state_found'])
def test_resume_from_a_broken_state_file_fails_in_one_line(run_main, tiny_llama_dir, data, tmp_path, state, output_file,
                                                           error):
    out = tmp_path / 'samples'
    out.mkdir()
    (out / 'r.jsonl.state.json').write_text(state)
    (out / 'r.jsonl.part').write_text('')
    line = run(run_main, ['sample', '--model', tiny_llama_dir, '--dataset', data, '--output_dir', out, '--resume', 'true',
                        *(['--output_file', output_file] if output_file else [])])
    assert line.startswith('megaswift sample: error: ' + error.format(dir=out)), line
    assert sorted(p.name for p in out.iterdir()) == ['r.jsonl.part', 'r.jsonl.state.json']  # a run's state is kept
