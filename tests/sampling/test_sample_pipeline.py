"""`megaswift sample` end to end on a tiny random model: sharding, caching, two-stage scoring, bad input."""
import json
from pathlib import Path

import pytest
from testing_utils import read_jsonl

from megaswift.arguments.sampling import SamplingArguments
from megaswift.dataset import row_id
from megaswift.pipelines.sample import sample_main
from megaswift.sampling.output import OutputError

REPO = Path(__file__).resolve().parents[2]


def args(model, dataset, out, **kw):
    base = dict(model=model, dataset=[dataset], output_dir=str(out), num_return_sequences=3, max_new_tokens=6,
                temperature=1.0, torch_dtype='float32')
    base.update(kw)
    return SamplingArguments(**base)


def test_no_reward_writes_every_sample(tiny_llama_dir, math_file, math_rows, tmp_path):
    path = sample_main(args(tiny_llama_dir, math_file, tmp_path, output_file='all.jsonl', num_sampling_batch_size=3))
    lines = read_jsonl(path)
    assert len(lines) == 7 * 3  # 7 rows, batches of 3: the last partial batch is not dropped
    assert {x['id'] for x in lines} == {row_id(r) for r in math_rows}
    for x in lines:
        assert x['messages'][-1]['role'] == 'assistant' and x['messages'][-2]['role'] == 'user'
        assert 'rejected_response' not in x and x['solution'] is not None
    meta = json.loads(Path(path + '.meta.json').read_text())
    assert meta['stats']['samples'] == 21 and meta['stats']['prompts'] == 7
    assert sorted(p.name for p in tmp_path.iterdir() if 'all' in p.name) == ['all.jsonl', 'all.jsonl.meta.json']


def test_shards_cover_every_row_once_with_distinct_files(tiny_llama_dir, math_file, math_rows, tmp_path):
    ids, names = [], set()
    for i in range(3):
        path = sample_main(args(tiny_llama_dir, math_file, tmp_path, data_range=[i, 3], num_return_sequences=1,
                                num_sampling_batch_size=2))
        names.add(Path(path).name)
        ids += [x['id'] for x in read_jsonl(path)]
    assert sorted(ids) == sorted(row_id(r) for r in math_rows)  # 7 rows over 3 shards: 3 + 2 + 2, none dropped
    assert len(names) == 3 and all('-shard' in n for n in names)


def test_existing_output_is_an_error_unless_override(tiny_llama_dir, math_file, tmp_path):
    a = args(tiny_llama_dir, math_file, tmp_path, output_file='o.jsonl', num_return_sequences=1, max_new_tokens=2)
    sample_main(a)
    with pytest.raises(OutputError, match='already exists; pass --override_exist_file'):
        sample_main(a)
    a.override_exist_file = True
    sample_main(a)


def test_two_stage_scoring_without_the_policy(tiny_llama_dir, math_file, tmp_path):
    """Stage 1 samples; stage 2 scores the cache with --sampler_engine no and the math ORM."""
    stage1 = sample_main(args(tiny_llama_dir, math_file, tmp_path, output_file='s1.jsonl', num_return_sequences=2))
    # plant one correct answer per prompt, as a stronger policy would have written
    lines = read_jsonl(stage1)
    for x in lines[::2]:
        x['messages'][-1]['content'] = f"so it is \\boxed{{{x['solution']}}}"
    Path(stage1).write_text(''.join(json.dumps(x) + '\n' for x in lines))
    stage2 = sample_main(SamplingArguments(sampler_engine='no', cache_files=[stage1], orm_model='math',
                                           n_best_to_keep=2, output_dir=str(tmp_path), output_file='s2.jsonl'))
    kept = read_jsonl(stage2)
    assert len(kept) == 7  # one passing sample per prompt; the failing one is its rejected_response
    for x in kept:
        assert x['messages'][-1]['content'] == f"so it is \\boxed{{{x['solution']}}}"
        assert x['rejected_response'] != x['messages'][-1]['content']
    # the same with the dataset given: ids computed from the dataset must match the cache
    again = sample_main(SamplingArguments(sampler_engine='no', cache_files=[stage1], dataset=[math_file],
                                          orm_model='math', output_dir=str(tmp_path), output_file='s3.jsonl'))
    assert [x['id'] for x in read_jsonl(again)] == [x['id'] for x in kept]


def test_cache_without_a_prompt_is_an_error(tiny_llama_dir, math_file, tmp_path):
    cache = tmp_path / 'c.jsonl'
    cache.write_text(json.dumps({'id': 'abc', 'messages': [{'role': 'user', 'content': 'q'},
                                                           {'role': 'assistant', 'content': 'a'}]}) + '\n')
    with pytest.raises(OutputError, match='7 prompts have no cached samples'):
        sample_main(SamplingArguments(sampler_engine='no', cache_files=[str(cache)], dataset=[math_file],
                                      orm_model='math', output_dir=str(tmp_path)))


def test_plugin_prm_and_orm_filter_and_rank(tiny_llama_dir, math_file, tmp_path):
    plugins = [str(REPO / 'examples/plugins/custom_prm.py'), str(REPO / 'examples/plugins/custom_orm.py')]
    path = sample_main(args(tiny_llama_dir, math_file, tmp_path, output_file='p.jsonl', external_plugins=plugins,
                            prm_model='length_prm', prm_threshold=-1e9, num_return_sequences=4, n_best_to_keep=2))
    lines = read_jsonl(path)
    assert len(lines) == 7 * 2 and all('rejected_response' in x for x in lines)


def test_cli_bad_inputs_fail_with_one_clear_line(run_main, tiny_llama_dir, tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"query": "ok"}\n{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}\n')
    r = run_main(['sample', '--model', tiny_llama_dir, '--dataset', bad, '--output_dir', tmp_path])
    assert r.returncode == 1
    assert f"{bad}:2: field 'messages[1].role': unknown role 'robot'" in r.stderr
    assert 'Traceback' not in r.stderr
    good = tmp_path / 'good.jsonl'
    good.write_text('{"query": "ok"}\n')
    r = run_main(['sample', '--model', 'nobody/nothing', '--dataset', good, '--output_dir', tmp_path])
    assert r.returncode == 1 and "model 'nobody/nothing' is neither a local directory nor embedded" in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) > 40 and 'Traceback' not in r.stderr
    r = run_main(['sample', '--model', tiny_llama_dir, '--dataset', bad, '--n_best', '2'])
    assert r.returncode == 2 and "unknown argument '--n_best'" in r.stderr
    r = run_main(['sampel'])
    assert r.returncode == 2 and "did you mean 'sample'" in r.stderr


def test_crash_keeps_committed_batches_and_resume_refuses_an_edited_dataset(tiny_llama_dir, math_file, tmp_path):
    from megaswift.rewards import ORM, orms

    class CrashOnThirdCall(ORM):
        calls = 0

        def __call__(self, completions, **columns):
            CrashOnThirdCall.calls += 1
            if CrashOnThirdCall.calls == 3:
                raise RuntimeError('reward server went away')
            return [1.0] * len(completions)

    orms['crash_third'] = CrashOnThirdCall
    try:
        a = args(tiny_llama_dir, math_file, tmp_path, output_file='c.jsonl', orm_model='crash_third',
                 num_sampling_batch_size=2, num_return_sequences=2, n_best_to_keep=1)
        with pytest.raises(RuntimeError, match='went away'):
            sample_main(a)
        assert not (tmp_path / 'c.jsonl').exists()
        assert len(read_jsonl(tmp_path / 'c.jsonl.part')) == 4  # 2 committed batches x 2 prompts x 1 kept
        lines = Path(math_file).read_text().splitlines()
        Path(math_file).write_text('\n'.join(lines[:3] + [lines[4], lines[3]] + lines[5:]) + '\n')
        a.resume = True
        with pytest.raises(OutputError, match='prompts_md5'):
            sample_main(a)
        Path(math_file).write_text('\n'.join(lines) + '\n')
        path = sample_main(a)  # the original data resumes and completes
        assert len(read_jsonl(path)) == 7
    finally:
        del orms['crash_third']


def test_a_run_that_fails_before_its_first_batch_leaves_no_files(tiny_llama_dir, math_file, tmp_path):
    from megaswift.rewards import ORM, orms

    class CrashAtOnce(ORM):
        def __call__(self, completions, **columns):
            raise RuntimeError('reward server is down')

    orms['crash_at_once'] = CrashAtOnce
    out = tmp_path / 'new' / 'samples'
    try:
        with pytest.raises(RuntimeError, match='is down'):
            sample_main(args(tiny_llama_dir, math_file, out, orm_model='crash_at_once', num_return_sequences=1,
                             max_new_tokens=2))
    finally:
        del orms['crash_at_once']
    assert not (tmp_path / 'new').exists()  # nor the folders it made: nothing to resume, nothing half-written


def test_agent_rows_with_integer_ids_are_sampled(tiny_llama_dir, tmp_path):
    call = {'role': 'tool_call', 'content': {'name': 'add', 'arguments': '{"a": 2, "b": 3}'}}
    rows = [{'id': 7, 'tools': [{'type': 'function', 'function': {'name': 'add', 'parameters': {'type': 'object'}}}],
             'messages': [{'role': 'user', 'content': 'Add 2 and 3.'}, call, {'role': 'tool_response', 'content': '5'},
                          {'role': 'assistant', 'content': 'It is 5.'}]},
            {'id': '8', 'messages': [{'role': 'user', 'content': 'Hi'}]}]
    data = tmp_path / 'agent.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    lines = read_jsonl(sample_main(args(tiny_llama_dir, str(data), tmp_path, num_return_sequences=1,
                                        max_new_tokens=2)))
    assert [line['id'] for line in lines] == ['7', '8']
    assert lines[0]['messages'][1]['content'] == json.dumps(call['content'])
