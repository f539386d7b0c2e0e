"""Collator.sequences: encoded samples holding several model sequences (a chosen and a rejected response; a KTO
completion and its KL completion) collate as consecutive sequences; sequence_ids / last_token_positions locate them
in padding-free and padded batches, padding included."""
import pytest
import torch

from megaswift.dataset.encode import EncodedDataset
from megaswift.template.collator import (Collator, build_items, collate_micro_batches, last_token_positions,
                                         packing_efficiency, sequence_ids, to_device)
from megaswift.utils.errors import TrainDataError

PAIR = ('chosen_', 'rejected_')
PAIRS = [  # sequences of 3 + 2, 4 + 3 and 2 + 4 tokens
    {'chosen_input_ids': [1, 2, 3], 'chosen_labels': [-100, 2, 3],
     'rejected_input_ids': [1, 4], 'rejected_labels': [-100, 4], 'margin': 0.5},
    {'chosen_input_ids': [5, 6, 7, 8], 'chosen_labels': [-100, -100, 7, 8], 'chosen_loss_scale': [0, 0, 1, .5],
     'rejected_input_ids': [5, 9, 9], 'rejected_labels': [-100, -100, 9], 'margin': 1.0},
    {'chosen_input_ids': [10, 11], 'chosen_labels': [-100, 11],
     'rejected_input_ids': [10, 12, 13, 14], 'rejected_labels': [-100, 12, 13, 14], 'margin': -1.0},
]
LENS = [3, 2, 4, 3, 2, 4]


def with_extras(samples):
    """A per-token value per side (``chosen_ref``/``rejected_ref``) and a number per side (``*_score``)."""
    out = []
    for k, s in enumerate(samples):
        extra = {}
        for side in PAIR:
            n = len(s[f'{side}input_ids'])
            extra[f'{side}ref'] = [100 * (k + 1) + 10 * PAIR.index(side) + t for t in range(n)]
            extra[f'{side}score'] = float(2 * k + PAIR.index(side))
        out.append(s | extra)
    return EncodedDataset.from_samples(out)


def pairs_collator(padding_free, multiple=1, **kw):
    return Collator(with_extras(PAIRS), [[0, 1], [2]], padding_free, pad_to_multiple_of=multiple, pad_token_id=0,
                    sequences=PAIR, **kw)


@pytest.mark.parametrize('pad_to', [None, 24])
def test_pairs_padding_free(pad_to):
    collator = pairs_collator(True, 4, columns=('margin', 'ref', 'score'))
    batch = collator([0, 1], pad_to)
    width = pad_to or 20  # 18 tokens, rounded up to a multiple of 4
    tokens = [1, 2, 3, 1, 4, 5, 6, 7, 8, 5, 9, 9, 10, 11, 10, 12, 13, 14]
    assert batch['input_ids'].tolist() == [tokens + [0] * (width - 18)]
    assert batch['packed_seq_params'].cu_seqlens_q.tolist() == [0, 3, 5, 9, 12, 14, 18, width]
    labels = [2, 3, -100, 4, -100, -100, 7, 8, -100, -100, 9, -100, 11, -100, 12, 13, 14, -100]
    assert batch['labels'].tolist() == [labels + [-100] * (width - 18)]
    scale = [1, 1, 0, 1, 0, 0, 1, .5, 0, 0, 1, 0, 1, 0, 1, 1, 1, 0]  # binary sides from their labels
    assert batch['loss_scale'].tolist() == [scale + [0] * (width - 18)]
    assert (batch['num_samples'], batch['num_sequences'], batch['sequences_per_sample']) == (3, 6, 2)
    assert batch['sequence_lengths'].tolist() == LENS and batch['num_real_tokens'] == 18
    assert batch['num_computed_tokens'] == width
    assert batch['margin'].tolist() == [0.5, 1.0, -1.0] and batch['margin'].dtype == torch.float32
    assert batch['score'].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # a number per side: one per sequence
    ref = [100, 101, 102, 110, 111, 200, 201, 202, 203, 210, 211, 212, 300, 301, 310, 311, 312, 313]
    assert batch['ref'].tolist() == [ref + [0] * (width - 18)]
    expected = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5, 5] + [-1] * (width - 18)
    assert sequence_ids(batch).tolist() == [expected] and sequence_ids(batch).dtype == torch.int64
    assert last_token_positions(batch).tolist() == [2, 4, 8, 11, 13, 17]
    moved = to_device(batch, 'cpu')  # cu_seqlens become int32, as on the GPU
    assert moved['packed_seq_params'].cu_seqlens_q.dtype == torch.int32
    assert sequence_ids(moved).tolist() == [expected] and last_token_positions(moved).tolist() == [2, 4, 8, 11, 13, 17]
    assert collator.num_tokens([0, 1]) == 18 and collator.row_length([0, 1]) == 18


@pytest.mark.parametrize('multiple, pad_to', [(1, None), (4, None), (4, 8)])
def test_pairs_padded_one_row_per_sequence(multiple, pad_to):
    collator = pairs_collator(False, multiple, columns=('margin', 'ref'))
    batch = collator([0, 1], pad_to)
    width = pad_to or 4  # the longest sequence (4), not the longest pair (7)
    assert collator.row_length([0, 1]) == 4 and collator.num_tokens([0, 1]) == 18
    seqs = [[1, 2, 3], [1, 4], [5, 6, 7, 8], [5, 9, 9], [10, 11], [10, 12, 13, 14]]
    assert batch['input_ids'].tolist() == [s + [0] * (width - len(s)) for s in seqs]
    assert batch['labels'].tolist()[2] == [-100, 7, 8] + [-100] * (width - 3)
    assert batch['ref'].tolist()[3] == [210, 211, 212] + [0] * (width - 3)
    assert batch['sequence_lengths'].tolist() == LENS and batch['num_computed_tokens'] == 6 * width
    assert batch['margin'].tolist() == [0.5, 1.0, -1.0]
    assert sequence_ids(batch).tolist() == [[r if t < n else -1 for t in range(width)] for r, n in enumerate(LENS)]
    assert last_token_positions(batch).tolist() == [r * width + n - 1 for r, n in enumerate(LENS)]


def test_packing_keeps_pairs_together_and_efficiency_counts_sequences():
    enc = with_extras(PAIRS)
    assert enc.lengths.tolist() == [5, 7, 6]
    items = build_items(enc, packing=True, max_length=12)
    assert sorted(i for b in items for i in b) == [0, 1, 2]
    collator = Collator(enc, items, True, sequences=PAIR)
    for k, b in enumerate(items):
        batch = collator([k])
        assert batch['num_sequences'] == 2 * len(b) and batch['input_ids'].shape[-1] <= 12
        assert batch['sequence_lengths'].tolist() == [LENS[2 * i + j] for i in b for j in (0, 1)]
    singles = [[0], [1], [2]]
    padded = Collator(enc, singles, False, pad_to_multiple_of=4, sequences=PAIR)
    assert packing_efficiency(padded, [0, 1, 2], False, None, [[0, 1], [2]]) == 18 / (4 * 4 + 2 * 4)
    free = Collator(enc, singles, True, pad_to_multiple_of=4, sequences=PAIR)
    assert packing_efficiency(free, [0, 1, 2], False, None, [[0, 1], [2]]) == 18 / (12 + 8)
    fixed = collate_micro_batches(free, [[0, 1], [2]], fixed_shape=True)
    assert [b['input_ids'].shape[-1] for b in fixed] == [12, 12]
    assert [sequence_ids(b).tolist()[0] for b in fixed] == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3],
                                                            [0, 0, 1, 1, 1, 1] + [-1] * 6]


def test_kto_sequences_and_sample_columns():
    samples = [{'input_ids': [1, 2, 3], 'labels': [-100, 2, 3], 'kl_input_ids': [1, 7], 'kl_labels': [-100, 7],
                'label': 1},
               {'input_ids': [4, 5], 'labels': [-100, 5], 'kl_input_ids': [4, 8, 9], 'kl_labels': [-100, 8, 9],
                'label': 0}]
    enc = EncodedDataset.from_samples(samples)
    assert enc.lengths.tolist() == [5, 5]
    batch = Collator(enc, [[0], [1]], True, sequences=('', 'kl_'), columns=('label',))([0, 1])
    assert batch['input_ids'].tolist() == [[1, 2, 3, 1, 7, 4, 5, 4, 8, 9]]
    assert batch['label'].tolist() == [1, 0] and batch['label'].dtype == torch.int64
    assert sequence_ids(batch).tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3]]
    assert last_token_positions(batch).tolist() == [2, 4, 6, 9]
    seqs = Collator(enc, [[0], [1]], sequences=('', 'kl_'), columns=('label',)).samples([1])
    assert [s['input_ids'].tolist() for s in seqs] == [[4, 5], [4, 8, 9]] and [int(s['label']) for s in seqs] == [0, 0]


def test_default_batches_locate_their_sequences():
    enc = EncodedDataset.from_samples([{'input_ids': [5, 6, 7], 'labels': [-100, 6, 7]},
                                       {'input_ids': [8, 9], 'labels': [-100, 9]}])
    free = Collator(enc, [[0, 1]], True, pad_to_multiple_of=8)([0])
    assert sequence_ids(free).tolist() == [[0, 0, 0, 1, 1, -1, -1, -1]]
    assert last_token_positions(free).tolist() == [2, 4]
    padded = Collator(enc, [[0], [1]], False)([0, 1], pad_to=6)
    assert sequence_ids(padded).tolist() == [[0, 0, 0, -1, -1, -1], [1, 1, -1, -1, -1, -1]]
    assert last_token_positions(padded).tolist() == [2, 7]


def test_sequence_errors_are_named():
    enc = EncodedDataset.from_samples([{'input_ids': [1, 2], 'labels': [-100, 2]}])
    with pytest.raises(TrainDataError, match=r"sample 0 has no column 'chosen_input_ids'.*template mode"):
        Collator(enc, [[0]], sequences=PAIR)([0])
    with pytest.raises(TrainDataError, match=r"no column 'chosen_input_ids'"):
        Collator(enc, [[0]], sequences=PAIR).num_tokens([0])
    per_token = EncodedDataset.from_samples([s | {'weight': [1.0] * 5} for s in PAIRS[:1]])
    with pytest.raises(TrainDataError, match=r"column 'weight' of sample 0 .* read as '\{prefix\}weight'"):
        Collator(per_token, [[0]], sequences=PAIR, columns=('weight',))([0])
    with pytest.raises(TrainDataError, match=r"sample 0 has no column 'nope'"):
        Collator(with_extras(PAIRS), [[0]], sequences=PAIR, columns=('nope',))([0])
    with pytest.raises(ValueError, match='distinct column prefixes'):
        Collator(enc, [[0]], sequences=('a_', 'a_'))


def test_real_pairs_collate_as_their_sides(smollm2_dir):
    from megaswift.model import load_tokenizer
    from megaswift.template import get_template
    template = get_template(load_tokenizer(smollm2_dir))
    template.set_mode('rlhf')
    rows = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}],
             'rejected_response': r} for q, a, r in (('2 + 2?', 'Four.', 'Five.'), ('Sky colour?', 'Blue.', 'Green, '
                                                                                          'on most days.'))]
    enc = EncodedDataset.from_samples([template.encode(r) for r in rows])
    batch = Collator(enc, [[0, 1]], True, pad_to_multiple_of=16, sequences=PAIR, columns=('margin',))([0])
    sides = [enc[i][f'{p}input_ids'] for i in range(2) for p in PAIR]
    flat = [t for s in sides for t in s]
    assert batch['input_ids'][0, :len(flat)].tolist() == flat and batch['input_ids'].shape[-1] % 16 == 0
    cu = batch['packed_seq_params'].cu_seqlens_q.tolist()
    assert cu[:5] == [0, *torch.tensor([len(s) for s in sides]).cumsum(0).tolist()]
    assert last_token_positions(batch).tolist() == [c - 1 for c in cu[1:5]]
    ids = sequence_ids(batch)[0]
    for k in range(4):  # a sequence's trained tokens (shifted labels) are its own response's
        targets = batch['labels'][0][(ids == k) & (batch['labels'][0] >= 0)].tolist()
        assert targets == [t for t in enc[k // 2][f'{PAIR[k % 2]}labels'] if t >= 0]
