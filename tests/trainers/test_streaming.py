"""``--streaming true``: rows read lazily (only what the shuffle buffer needs), a seeded shuffle buffer reshuffled
every epoch, ``file:line: field`` errors, packing windows, every DP rank deriving the same steps, the stream
position restored exactly (in-process from every step, and through the CLI on a tiny model), and the flag checks.
(The DP=2 loss trajectory of a streaming run is compared in test_train_layouts.py.)
"""
from __future__ import annotations

import json

import pytest

from megaswift.arguments.train import PtArguments, SftArguments
from megaswift.cli.parser import CLIError, parse_args
from megaswift.dataset import DatasetError
from megaswift.dataset import streaming as streaming_mod
from megaswift.dataset.streaming import RowStream, StreamError, shuffle_buffer

BASE = ['--model', 'm', '--dataset', 'd.jsonl']


def chat(q: str, a: str) -> dict:
    return {'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}


def write_rows(path, n: int, start: int = 0) -> str:
    with open(path, 'w', encoding='utf-8') as f:
        for i in range(start, start + n):
            f.write(json.dumps(chat(f'question {i} ' + 'word ' * (i % 7), f'answer {i} ' + 'more ' * (i % 11))) + '\n')
    return str(path)


def lines(rows) -> list[int]:
    return [src.line for _, src in rows]


@pytest.fixture
def world(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('RANK', '0')


# ------------------------------------------------------------------------------------------ the row stream
@pytest.mark.parametrize('size', [0, 1, 5, 200])
def test_shuffle_buffer_is_a_seeded_bounded_permutation(size):
    import numpy as np

    def run(seed):
        return list(shuffle_buffer(iter(range(100)), size, np.random.default_rng(seed)))
    out = run(0)
    assert sorted(out) == list(range(100)) and out == run(0)
    if size <= 1:
        assert out == list(range(100))
    else:
        assert out != run(1)
        # a record leaves the buffer only after the buffer is full: never earlier than size - 1 places ahead
        assert all(pos >= value - (size - 1) for pos, value in enumerate(out))


def test_stream_reads_only_what_it_hands_out(tmp_path, monkeypatch):
    path = write_rows(tmp_path / 'big.jsonl', 20000)
    stream = RowStream([path], seed=0, buffer_size=16)
    stream.open(0)
    assert len(stream.take(10)) == 10 and stream.records_read <= 10 + 16  # not the 20000 rows of the file
    parsed = []
    real = streaming_mod.parse_jsonl_line
    monkeypatch.setattr(streaming_mod, 'parse_jsonl_line', lambda line, src: parsed.append(src) or real(line, src))
    stream.open(0, skip=5000)  # replay: read, never decoded or normalised
    assert parsed == [] and stream.records_read <= 10 + 16 + 5000 + 16 and stream.position == 5000
    row, src = stream.next()
    assert len(parsed) == 1
    fresh = RowStream([path], seed=0, buffer_size=16)
    assert fresh.take(5001)[-1] == (row, src)  # the same row an unskipped stream hands out there


def test_stream_epochs_are_reshuffled_permutations(tmp_path):
    path = write_rows(tmp_path / 'a.jsonl', 50)
    stream = RowStream([path], seed=3, buffer_size=8)
    stream.open(0)
    e0 = lines(stream.take(1000))
    assert sorted(e0) == list(range(1, 51)) and stream.next() is None  # the epoch ends; nothing is lost
    stream.open(1)
    e1 = lines(stream.take(1000))
    assert sorted(e1) == sorted(e0) and e1 != e0
    again = RowStream([path], seed=3, buffer_size=8)
    again.open(0)
    assert lines(again.take(1000)) == e0
    in_order = RowStream([path], seed=3, buffer_size=8, shuffle=False)
    in_order.open(0)
    assert lines(in_order.take(1000)) == list(range(1, 51))
    other = write_rows(tmp_path / 'b.jsonl', 3, start=100)
    both = RowStream([f'{path}#120', other], seed=3, buffer_size=0)  # #N over the file's size reads it again
    rows = both.take(1000)
    assert len(rows) == 123 and lines(rows)[:120] == (list(range(1, 51)) * 3)[:120]
    assert [r['messages'][0]['content'].split()[1] for r, _ in rows[120:]] == ['100', '101', '102']


def test_stream_errors_name_the_file_line_and_field(tmp_path):
    bad = tmp_path / 'bad.jsonl'
    good = json.dumps(chat('q', 'a'))
    bad.write_text('\n'.join([good, good, '{"messages": [', good]) + '\n')
    with pytest.raises(DatasetError, match=r'bad.jsonl:3: invalid JSON'):
        RowStream([str(bad)], seed=0, buffer_size=4).take(10)
    bad.write_text('\n'.join([good, '', good, json.dumps({'messages': [{'role': 'robot', 'content': 'x'}]})]) + '\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:4: field 'messages\[0\].role': unknown role 'robot'"):
        RowStream([str(bad)], seed=0, buffer_size=4).take(10)
    (tmp_path / 'empty.jsonl').write_text('\n')
    with pytest.raises(StreamError, match=r"dataset '.*empty.jsonl' has no rows"):
        RowStream([str(tmp_path / 'empty.jsonl')], seed=0, buffer_size=4).take(1)
    with pytest.raises(FileNotFoundError, match=r"dataset '.*missing.jsonl' does not exist"):
        RowStream([str(tmp_path / 'missing.jsonl')], seed=0, buffer_size=4).take(1)
    short = RowStream([write_rows(tmp_path / 'short.jsonl', 5)], seed=0, buffer_size=4)
    with pytest.raises(StreamError, match=r'past the end of --dataset, which has 5 rows now'):
        short.open(0, skip=9)


# ------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize('argv, match', [
    (['--streaming', 'true'], r'--streaming true needs --max_steps'),
    (['--streaming', 'true', '--num_train_epochs', '2'], r'--streaming true needs --max_steps'),
    (['--streaming', 'true', '--max_steps', '5', '--split_dataset_ratio', '0.1'],
     r'--split_dataset_ratio cannot hold rows out of a stream .*--val_dataset'),
    (['--shuffle_buffer_size', '-1'], r'--shuffle_buffer_size: must be >= 0'),
    (['--packing_interval', '0'], r'--packing_interval: must be >= 1'),
])
def test_streaming_flags(world, argv, match):
    with pytest.raises(CLIError, match=match):
        parse_args(SftArguments, BASE + argv)


def test_streaming_defaults(world):
    a = parse_args(SftArguments, BASE + ['--streaming', 'true', '--max_steps', '5'])
    assert (a.streaming, a.shuffle_buffer_size, a.packing_interval, a.max_steps) == (True, 1000, 1000, 5)


# ------------------------------------------------------------------------------------------ the sampler
def streaming_data(model_dir, tmp_path, name='run', cls=SftArguments, **overrides):
    from megaswift.pipelines.train import prepare_data, preflight
    kwargs = dict(model=model_dir, dataset=[str(tmp_path / 'chat.jsonl')], streaming=True, max_steps=6,
                  max_length=128, packing=True, global_batch_size=4, packing_interval=8, shuffle_buffer_size=8,
                  output_dir=str(tmp_path / name))
    args = cls(**{**kwargs, **overrides})
    data, steps = prepare_data(args, preflight(args))
    return data


def step_contents(data) -> list:
    """A step as the loop sees it: per item, its samples' token ids."""
    items = data.sampler.next_step()
    c = data.collator
    return [[c.encoded.arrays(i)['input_ids'].tolist() for i in c.items[item]] for item in items]


def test_packing_window_and_bounded_reads(world, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    write_rows(tmp_path / 'chat.jsonl', 2000)
    data = streaming_data(tiny_llama_dir, tmp_path)
    sampler = data.sampler
    encoded = sampler._items[0][0]
    assert encoded.num_rows == 8 and len(encoded) == 8  # one window: --packing_interval rows
    assert sorted(i for _, b in sampler._items for i in b) == list(range(8))  # every sample in one bin
    assert all(sum(int(encoded.lengths[i]) for i in b) <= 128 for _, b in sampler._items)
    assert len(sampler._items) < 8  # bins hold several samples
    for _ in range(5):
        step = step_contents(data)
        assert len(step) == 4 and all(sum(len(s) for s in item) <= 128 for item in step)
    consumed = sampler.stream.position
    assert sampler.stream.records_read <= consumed + 8 and consumed < 5 * 4 * 8  # not the 2000 rows
    assert sampler.epoch == 0.0 and sampler.epoch_rows is None
    plain = streaming_data(tiny_llama_dir, tmp_path, 'plain', packing=False, padding_free=True)
    assert [b for _, b in plain.sampler._items] == [[i] for i in range(8)]  # a sample per item, in stream order


def test_dp_ranks_derive_the_same_steps(world, tiny_llama_dir, tmp_path, monkeypatch):
    """Every DP rank reads the same stream; rank r's micro-batches are the single process's k * dp + r."""
    from megaswift.trainers.data import rank_micro_batches
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    write_rows(tmp_path / 'chat.jsonl', 30)
    single = streaming_data(tiny_llama_dir, tmp_path, global_batch_size=4)
    ranks = [streaming_data(tiny_llama_dir, tmp_path, f'rank{r}', global_batch_size=4) for r in range(2)]
    for _ in range(6):  # past the end of the first epoch
        whole = step_contents(single)
        per_rank = []
        for r, data in enumerate(ranks):
            items = data.sampler.next_step()
            per_rank.append([[data.collator.encoded.arrays(i)['input_ids'].tolist() for item in mb
                              for i in data.collator.items[item]] for mb in rank_micro_batches(items, r, 2, 1)])
        assert [per_rank[k % 2][k // 2] for k in range(4)] == whole


def test_resume_restores_the_exact_position(world, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    write_rows(tmp_path / 'chat.jsonl', 20)  # 20 rows, windows of 8: steps straddle windows and epochs
    a = streaming_data(tiny_llama_dir, tmp_path)
    states, steps, epochs = [], [], []
    for _ in range(10):
        states.append(json.loads(json.dumps(a.sampler.state_dict())))  # as trainer_state.json stores it
        steps.append(step_contents(a))
        epochs.append(a.sampler.epoch)
    assert epochs[-1] > 2 and a.sampler.epoch_rows == 20
    b = streaming_data(tiny_llama_dir, tmp_path, 'b')
    for k in (1, 3, 4, 7):
        b.sampler.load_state_dict(states[k])
        assert [step_contents(b) for _ in range(10 - k)] == steps[k:], k
        assert b.sampler.epoch == epochs[-1] and b.sampler.consumed == 40
    from megaswift.arguments.base import ArgumentError
    from megaswift.utils.errors import TrainDataError
    from megaswift.trainers.streaming import check_resume_streaming
    with pytest.raises(TrainDataError, match='trained without --streaming'):
        b.sampler.load_state_dict({'consumed': 8, 'num_items': 10})
    with pytest.raises(ArgumentError, match='saved with --streaming true; resume it with the same --streaming'):
        check_resume_streaming({'sampler': states[1]}, SftArguments(model='m', dataset=['d']), 'ckpt')


def test_bad_rows_fail_before_the_model_is_built(world, tiny_llama_dir, tmp_path, monkeypatch):
    from megaswift.dataset.encode import AllRowsSkipped
    monkeypatch.setenv('MEGASWIFT_CACHE', str(tmp_path / 'cache'))
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: field 'text': pt needs a 'text' column"):
        streaming_data(tiny_llama_dir, tmp_path, cls=PtArguments, dataset=[str(bad)])
    write_rows(tmp_path / 'chat.jsonl', 3)
    with pytest.raises(AllRowsSkipped, match=r'all 3 rows of --dataset are longer than max_length 8'):
        streaming_data(tiny_llama_dir, tmp_path, max_length=8)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_cli_streaming_resume_matches_the_uninterrupted_run(tiny_llama_dir, run_cli, tmp_path):
    data = write_rows(tmp_path / 'chat.jsonl', 20)
    val = write_rows(tmp_path / 'val.jsonl', 4, start=500)
    env = {'MEGASWIFT_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    common = ['--model', tiny_llama_dir, '--dataset', data, '--streaming', 'true', '--shuffle_buffer_size', '8',
              '--packing_interval', '8', '--max_length', '128', '--packing', 'true', '--global_batch_size', '4',
              '--max_steps', '6', '--save_steps', '3', '--logging_steps', '1', '--lr', '1e-3', '--warmup_steps', '1',
              '--val_dataset', val, '--eval_steps', '3', '--save_safetensors', 'false']
    a, b = tmp_path / 'a', tmp_path / 'b'
    first = run_cli(['sft', *common, '--output_dir', a], env=env)
    assert 'restarting --dataset, reshuffled, for epoch 1' in first.stderr, first.stderr[-3000:]
    run_cli(['sft', *common, '--output_dir', b, '--resume_from_checkpoint', a / 'iter_0000003'], env=env)

    def logs(out):
        keys = ('step', 'epoch', 'loss', 'grad_norm', 'lr', 'eval_loss', 'eval_acc')
        records = [json.loads(line) for line in (out / 'logging.jsonl').read_text().splitlines() if line.strip()]
        return [{k: r.get(k) for k in keys} for r in records if r['step'] > 3]
    want, got = logs(a), logs(b)
    assert len(want) == 4 and got == want  # steps 4-6 and the step-6 evaluation
    state = json.loads((a / 'iter_0000006' / 'trainer_state.json').read_text())
    assert state['sampler']['streaming'] is True and state['sampler']['epoch'] >= 1
