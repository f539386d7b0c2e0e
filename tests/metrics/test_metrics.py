"""megaswift.metrics: values against hand computation and the reference libraries, reset, the
registry, the HF adapter, and the data-parallel reduction on a real 2-process gloo group."""
from __future__ import annotations

import json
import time

import pytest
import torch

from megaswift.metrics import (AccMetric, LossMetric, Metric, NlgMetric, UnknownMetricError, build_metrics, metrics,
                               nlg_scores, register_hf_metric)

CAT_REF, CAT_PRED = 'The cat sat on the mat.', 'the cat is on the mat'


class Extremes(Metric):
    """One state per tensor reduction."""

    def __init__(self):
        super().__init__()
        self.add_state('hi', torch.tensor(float('-inf')), 'max')
        self.add_state('lo', torch.tensor(float('inf')), 'min')
        self.add_state('avg', torch.tensor(0.0), 'mean')
        self.add_state('n', torch.tensor(0), 'sum')

    def update(self, x):
        x = torch.as_tensor(x, dtype=torch.float32)
        self.hi, self.lo = torch.maximum(self.hi, x.max()), torch.minimum(self.lo, x.min())
        self.avg = x.mean()
        self.accumulate('n', x.numel())

    def _compute(self):
        return {'hi': self.hi, 'lo': self.lo, 'avg': self.avg, 'n': self.n}


def test_loss_is_token_weighted_and_reset():
    m = LossMetric()
    m.update(loss_sum=3.0, num_tokens=2)
    m.update(loss_sum=torch.tensor(5.0), num_tokens=torch.tensor(6))
    assert m.compute() == {'loss': pytest.approx(8 / 8)}  # not the per-batch mean (1.5 + 5/6) / 2
    assert m.compute() == {'loss': pytest.approx(1.0)}  # compute does not consume the states
    m.reset()
    assert m.compute() == {'loss': 0.0}  # empty -> nan_value
    m.update_from({'loss_sum': torch.tensor(1.5), 'num_tokens': 3, 'extra': None})
    assert m.compute()['loss'] == pytest.approx(0.5)
    with pytest.raises(KeyError, match='num_tokens'):
        m.update_from({'loss_sum': 1.0})


def test_acc_ids_logits_and_ignore_index():
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, 6, 7]])
    preds = torch.tensor([[1, 0, 3, 9], [4, 5, 0, 7]])  # 4 correct of 6 counted positions
    m = AccMetric()
    m.update(preds=preds, labels=labels)
    assert m.compute() == {'acc': pytest.approx(4 / 6)}
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0]]), num_classes=10).float()
    m.update(preds=logits, labels=torch.tensor([[1, 2, 3]]))  # argmax over the last dim: 2 of 3
    assert m.compute() == {'acc': pytest.approx(6 / 9)}
    m.reset()
    assert (m.correct.item(), m.total.item()) == (0, 0)
    with pytest.raises(ValueError, match='do not match'):
        m.update(preds=torch.zeros(2, 3), labels=torch.zeros(3, 2))
    m = AccMetric(ignore_index=0)
    m.update(preds=torch.tensor([5, 0, 2]), labels=torch.tensor([5, 0, 1]))
    assert m.compute()['acc'] == pytest.approx(1 / 2)


def test_state_reductions_single_process():
    m = Extremes()
    m.update([1.0, -2.0])
    m.update([4.0])
    assert m.compute() == {'hi': 4.0, 'lo': -2.0, 'avg': 4.0, 'n': 3.0}
    with pytest.raises(ValueError, match="reduction='cat'"):
        m.add_state('bad', [], 'sum')
    with pytest.raises(ValueError, match='reduction must be'):
        m.add_state('bad', torch.tensor(0), 'prod')


def test_registry_and_build():
    assert {'loss', 'acc', 'nlg'} <= set(metrics)
    built = build_metrics('acc,loss nlg', ignore_index=7, unrelated=1)
    assert list(built) == ['acc', 'loss', 'nlg']
    assert built['acc'].ignore_index == 7 and isinstance(built['nlg'], NlgMetric)
    with pytest.raises(UnknownMetricError, match=r"unknown metric 'acccc'.*did you mean 'acc'\?") as info:
        build_metrics(['acccc'])
    assert isinstance(info.value, ValueError)


def test_nlg_matches_the_libraries():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_score.rouge_scorer import RougeScorer
    pairs = [(CAT_PRED, CAT_REF), ('a quick brown fox jumps', 'the quick brown fox jumped over the dog'),
             ('hello world', 'hello world')]
    scorer = RougeScorer(['rouge1', 'rouge2', 'rougeL'])  # its default tokenizer, no stemming
    expected = {'rouge-1': 0.0, 'rouge-2': 0.0, 'rouge-l': 0.0, 'bleu-4': 0.0}
    for pred, ref in pairs:
        s = scorer.score(ref, pred)
        expected['rouge-1'] += s['rouge1'].fmeasure
        expected['rouge-2'] += s['rouge2'].fmeasure
        expected['rouge-l'] += s['rougeL'].fmeasure
        ref_t, pred_t = ref.lower().strip('.').split(), pred.lower().split()
        expected['bleu-4'] += sentence_bleu([ref_t], pred_t, smoothing_function=SmoothingFunction().method3)
    m = NlgMetric()
    m.update(predictions=[p for p, _ in pairs[:2]], references=[r for _, r in pairs[:2]])
    m.update(predictions=[pairs[2][0]], references=[pairs[2][1]])
    got = m.compute()
    assert got == {k: pytest.approx(100 * v / 3) for k, v in expected.items()}
    # by hand on the cat pair: 5 of 6 unigrams, 3 of 5 bigrams, LCS 5; BLEU-4 as nltk 3.x computes it
    one = nlg_scores([CAT_PRED], [CAT_REF])
    assert one == {'rouge-1': pytest.approx(500 / 6), 'rouge-2': pytest.approx(60.0),
                   'rouge-l': pytest.approx(500 / 6), 'bleu-4': pytest.approx(37.991784282579627)}
    assert nlg_scores(['hello world'], ['Hello, world!'])['bleu-4'] == pytest.approx(100 * 0.5946035575013605)


def test_nlg_cjk_empty_and_errors():
    got = nlg_scores(['今天天气很好'], ['今天天气不错'])  # per-character tokens: 4 of 6 shared
    assert got['rouge-1'] == pytest.approx(100 * 4 / 6) and got['rouge-2'] == pytest.approx(60.0)
    assert nlg_scores(['', 'x'], ['something', '']) == {'rouge-1': 0.0, 'rouge-2': 0.0, 'rouge-l': 0.0,
                                                         'bleu-4': 0.0}  # empty ref skipped, empty pred 0
    assert nlg_scores(['', 'same text'], ['ref', 'same text'])['rouge-1'] == pytest.approx(50.0)
    m = NlgMetric()
    with pytest.raises(ValueError, match='2 predictions but 1 references'):
        m.update(predictions=['a', 'b'], references=['a'])
    with pytest.raises(TypeError):
        m.update(predictions='a', references='a')
    m.update(predictions=['a'], references=['a'])
    m.reset()
    assert m.predictions == [] and m.compute()['rouge-1'] == 0.0


def test_hf_adapter_pads_and_concatenates():
    seen = {}

    def exact_match(pred):
        seen['shapes'] = (pred.predictions.shape, pred.label_ids.shape)
        mask = pred.label_ids != -100
        return {'token_acc': float((pred.predictions == pred.label_ids)[mask].mean())}

    cls = register_hf_metric('exact_test', exact_match,
                             preprocess_logits_for_metrics=lambda logits, _labels: logits.argmax(-1))
    try:
        m = build_metrics(['exact_test'])['exact_test']
        assert isinstance(m, cls)
        one_hot = lambda ids: torch.nn.functional.one_hot(torch.tensor(ids), 5).float()  # noqa: E731
        m.update(preds=one_hot([[1, 2]]), labels=torch.tensor([[1, 3]]))
        m.update(preds=one_hot([[4, 4, 0], [1, 1, 1]]), labels=torch.tensor([[4, 4, 0], [1, -100, 2]]))
        assert m.compute() == {'token_acc': pytest.approx(5 / 7)}  # the -100 padding is not counted
        assert seen['shapes'] == ((3, 3), (3, 3))
    finally:
        del metrics['exact_test']


RANK_DATA = {
    0: dict(loss=[(3.0, 2)], preds=[[1, 2, 3]], labels=[[1, 2, 0]], x=[1.0, 5.0], pred=[CAT_PRED], ref=[CAT_REF]),
    1: dict(loss=[(5.0, 6), (2.0, 2)], preds=[[7, 7]], labels=[[7, -100]], x=[-3.0],
            pred=['hello world', 'a b'], ref=['hello world', 'c d']),
}


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        own_group = [dist.new_group([r]) for r in range(world)][rank]
        data = RANK_DATA[rank]
        built = build_metrics(['loss', 'acc', 'nlg'])
        for loss_sum, n in data['loss']:
            built['loss'].update(loss_sum=torch.tensor(loss_sum), num_tokens=torch.tensor(n))
        built['acc'].update(preds=torch.tensor(data['preds']), labels=torch.tensor(data['labels']))
        built['nlg'].update(predictions=data['pred'], references=data['ref'])
        ext = Extremes()
        ext.update(data['x'])
        result = {name: m.compute() for name, m in built.items()}
        result['extremes'] = ext.compute()
        result['local_loss'] = built['loss'].compute(group=own_group)
        result['again'] = built['nlg'].compute()  # states untouched by the first compute
        result['local_texts'] = len(built['nlg'].predictions)
        with open(f'{out_dir}/rank{rank}.json', 'w') as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_data_parallel_reduction_two_ranks(tmp_path):
    import torch.multiprocessing as mp
    # forkserver imports torch once and forks both ranks from it: ~2 s instead of two cold spawns
    mp.get_context('forkserver').set_forkserver_preload(['torch', __name__])
    ctx = mp.start_processes(_dp_worker, args=(2, str(tmp_path / 'store'), str(tmp_path)), nprocs=2, join=False,
                             start_method='forkserver')
    deadline = time.time() + 90
    while not ctx.join(timeout=0.2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('the 2-process gloo metrics run did not finish in 90 s')
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    local = ('local_loss', 'local_texts')
    got = {k: v for k, v in results[0].items() if k not in local}
    assert got == {k: v for k, v in results[1].items() if k not in local}  # every rank gets the same numbers
    assert got['loss'] == {'loss': pytest.approx(10 / 10)}
    assert got['acc'] == {'acc': pytest.approx(3 / 4)}
    assert got['extremes'] == {'hi': 5.0, 'lo': -3.0, 'avg': pytest.approx((3.0 + -3.0) / 2), 'n': 3.0}
    everything = nlg_scores(RANK_DATA[0]['pred'] + RANK_DATA[1]['pred'], RANK_DATA[0]['ref'] + RANK_DATA[1]['ref'])
    assert got['nlg'] == pytest.approx(everything) and got['again'] == got['nlg']
    assert [r['local_loss']['loss'] for r in results] == [pytest.approx(1.5), pytest.approx(7 / 8)]
    assert [r['local_texts'] for r in results] == [1, 2]
