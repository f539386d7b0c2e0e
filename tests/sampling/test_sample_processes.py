"""`megaswift sample` as users run it: kill -9 and resume, a real server behind the client engine, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testing_utils import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def cli_env():
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def sample_cmd(model, dataset, out, *extra):
    return [sys.executable, '-m', 'megaswift.cli.main', 'sample', '--model', model, '--dataset', dataset,
            '--output_dir', str(out), '--num_return_sequences', '2', '--max_new_tokens', '8',
            '--torch_dtype', 'float32', '--num_sampling_batch_size', '1', *map(str, extra)]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_llama_dir, math_file, tmp_path, run_cli):
    run_cli(sample_cmd(tiny_llama_dir, math_file, tmp_path / 'ref', '--output_file', 'o.jsonl')[3:])
    reference = (tmp_path / 'ref' / 'o.jsonl').read_text()

    out = tmp_path / 'killed'
    # a slow plugin reward keeps the run alive long enough to kill it between batches
    plugin = tmp_path / 'slow_orm.py'
    plugin.write_text('import time\nfrom megaswift.rewards import ORM, orms\n'
                      'class Slow(ORM):\n    def __call__(self, completions, **kw):\n'
                      '        time.sleep(0.4)\n        return [1.0] * len(completions)\norms["slow"] = Slow\n')
    extra = ['--output_file', 'o.jsonl', '--external_plugins', plugin, '--orm_model', 'slow', '--n_best_to_keep', '2']
    proc = subprocess.Popen(sample_cmd(tiny_llama_dir, math_file, out, *extra), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / 'o.jsonl.state.json'
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())['next_batch'] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())['next_batch']
    assert 3 <= done < 7, 'the kill must land mid-run'
    assert not (out / 'o.jsonl').exists(), 'an interrupted run must not look complete'

    run_cli(sample_cmd(tiny_llama_dir, math_file, out, *extra, '--resume', 'true')[3:])
    resumed = (out / 'o.jsonl').read_text()
    # the slow ORM passes everything, so with n_best_to_keep 2 each prompt keeps 1 sample + 1 rejected;
    # compare the sampled texts and ids with the uninterrupted run (which had no ORM) prompt by prompt
    ref_lines, res_lines = read_jsonl(tmp_path / 'ref' / 'o.jsonl'), [json.loads(x) for x in resumed.splitlines()]
    assert [x['id'] for x in res_lines] == [x['id'] for x in ref_lines[::2]]
    for i, x in enumerate(res_lines):
        pair = {ref_lines[2 * i]['messages'][-1]['content'], ref_lines[2 * i + 1]['messages'][-1]['content']}
        assert {x['messages'][-1]['content'], x['rejected_response']} == pair
    assert reference  # non-empty reference
    assert not state.exists() and not (out / 'o.jsonl.part').exists()


def test_resume_refuses_changed_arguments(tiny_llama_dir, math_file, tmp_path, run_cli):
    out = tmp_path / 'o'
    out.mkdir()
    (out / 'x.jsonl.part').write_text('')
    (out / 'x.jsonl.state.json').write_text(json.dumps({'next_batch': 1, 'bytes': 0, 'stats': {}, 'fingerprint': {
        'model': 'other'}}))
    r = run_cli(sample_cmd(tiny_llama_dir, math_file, out, '--output_file', 'x.jsonl', '--resume', 'true')[3:],
                check=False)
    assert r.returncode == 1 and 'cannot resume' in r.stderr and "model (was 'other'" in r.stderr
    r = run_cli(sample_cmd(tiny_llama_dir, math_file, out, '--output_file', 'x.jsonl')[3:], check=False)
    assert r.returncode == 1 and 'an unfinished run' in r.stderr and '--resume true' in r.stderr


def test_client_engine_against_megaswift_deploy(tiny_llama_dir, math_file, tmp_path, run_cli):
    server = subprocess.Popen([sys.executable, '-m', 'megaswift.cli.main', 'deploy', '--model', tiny_llama_dir,
                               '--port', '0', '--served_model_name', 'tiny', '--torch_dtype', 'float32'],
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        assert 'serving tiny at' in line, line
        url = line.split(' at ')[1].strip()
        common = ['sample', '--sampler_engine', 'client', '--dataset', math_file, '--output_dir', tmp_path,
                  '--num_return_sequences', '3', '--max_new_tokens', '6', '--engine_kwargs', json.dumps({'base_url': url})]
        run_cli(common + ['--output_file', 'plain.jsonl'])
        run_cli(common + ['--output_file', 'stream.jsonl', '--stream', 'true'])
        plain, streamed = read_jsonl(tmp_path / 'plain.jsonl'), read_jsonl(tmp_path / 'stream.jsonl')
        assert len(plain) == len(streamed) == 7 * 3
        # same seed per batch -> the same samples whether streamed or not
        assert [x['messages'][-1]['content'] for x in plain] == [x['messages'][-1]['content'] for x in streamed]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_torchrun_ranks_sample_their_own_shards(tiny_llama_dir, math_file, math_rows, tmp_path):
    env = dict(cli_env(), NPROC_PER_NODE='2')
    r = subprocess.run(sample_cmd(tiny_llama_dir, math_file, tmp_path, '--num_return_sequences', '1'), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(tmp_path.glob('*-shard*.jsonl'))
    assert [f.name.split('-shard')[1] for f in files] == ['0of2.jsonl', '1of2.jsonl']
    assert sum(len(read_jsonl(f)) for f in files) == len(math_rows)
