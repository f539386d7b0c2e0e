"""Collator.columns: extra encoded columns carried into the batch, per token (laid out and shifted like the labels
and loss scales) or per sample (a ``[num_samples]`` tensor)."""
import numpy as np
import pytest
import torch

from megaswift.dataset.encode import EncodedDataset
from megaswift.template.collator import Collator
from megaswift.utils.errors import TrainDataError

SAMPLES = [
    {'input_ids': [5, 6, 7, 8], 'labels': [-100, -100, 7, 8], 'loss_scale': [0.0, 0.0, 1.0, 0.5]},
    {'input_ids': [9, 10, 11], 'labels': [-100, 10, 11], 'loss_scale': [0.0, 2.0, 1.0]},
    {'input_ids': [12, 13], 'labels': [-100, 13], 'loss_scale': [0.0, 1.0]},
]


def with_columns(samples):
    """Copies of the labels and loss scales under other names, a per-token weight and two per-sample numbers."""
    out = []
    for k, s in enumerate(samples):
        n = len(s['input_ids'])
        out.append(s | {'ref_labels': s['labels'], 'ref_loss_scale': s['loss_scale'],
                        'token_weight': [10 * (k + 1) + t for t in range(n)], 'label': k != 1, 'margin': k / 4})
    return EncodedDataset.from_samples(out)


COLUMNS = ('ref_labels', 'ref_loss_scale', 'token_weight', 'label', 'margin')


@pytest.mark.parametrize('padding_free', [True, False])
@pytest.mark.parametrize('pad_to', [None, 12])
def test_per_token_columns_are_laid_out_like_labels_and_loss_scale(padding_free, pad_to):
    enc = with_columns(SAMPLES)
    items = [[0, 2], [1]]  # a packed item and a single sample: sample order 0, 2, 1
    batch = Collator(enc, items, padding_free, pad_to_multiple_of=4, columns=COLUMNS)([0, 1], pad_to)
    assert torch.equal(batch['ref_labels'], batch['labels'])
    assert torch.equal(batch['ref_loss_scale'], batch['loss_scale'])
    assert batch['ref_labels'].dtype == torch.int64 and batch['ref_loss_scale'].dtype == torch.float32
    weight = batch['token_weight']
    assert weight.dtype == torch.int64 and weight.shape == batch['input_ids'].shape
    if padding_free:  # concatenated, padded with 0, not shifted
        assert weight.tolist() == [[10, 11, 12, 13, 30, 31, 20, 21, 22, 0, 0, 0]]  # 9 tokens -> a multiple of 4
    else:
        width = 12 if pad_to else 4
        assert weight.tolist() == [[10, 11, 12, 13] + [0] * (width - 4), [30, 31] + [0] * (width - 2),
                                   [20, 21, 22] + [0] * (width - 3)]
    assert batch['label'].tolist() == [True, True, False] and batch['label'].dtype == torch.bool
    assert batch['margin'].tolist() == [0.0, 0.5, 0.25] and batch['margin'].dtype == torch.float32
    assert batch['num_samples'] == 3


def test_no_columns_carries_only_the_base_keys():
    enc = with_columns(SAMPLES)
    for padding_free in (True, False):
        batch = Collator(enc, [[0], [1], [2]], padding_free)([0, 1, 2])
        assert sorted(batch) == sorted(['input_ids', 'position_ids', 'labels', 'loss_scale', 'packed_seq_params',
                                        'num_real_tokens', 'num_computed_tokens', 'num_samples', 'num_sequences',
                                        'sequences_per_sample', 'sequence_lengths'])
        assert batch['num_sequences'] == batch['num_samples'] == 3 and batch['sequences_per_sample'] == 1
        assert batch['sequence_lengths'].tolist() == [4, 3, 2]


def test_missing_or_misshapen_columns_are_named():
    enc = EncodedDataset.from_samples([SAMPLES[0], SAMPLES[1] | {'label': True}])
    with pytest.raises(TrainDataError, match=r"sample 0 has no column 'label'"):
        Collator(enc, [[0], [1]], columns=('label',))([0, 1])
    enc = EncodedDataset.from_samples([s | {'chosen_ids': s['input_ids'][:2]} for s in SAMPLES])
    with pytest.raises(TrainDataError, match=r"column 'chosen_ids' of sample 0 of the micro-batch has 2 values for 4"):
        Collator(enc, [[0], [1]], columns=('chosen_ids',))([0, 1])
    with pytest.raises(ValueError, match='always collated'):
        Collator(enc, [[0]], columns=('labels',))


def test_scalar_columns_are_zero_dim_in_the_encoded_samples():
    enc = with_columns(SAMPLES)
    assert enc.scalars == {'label', 'margin'}
    assert enc.arrays(1)['label'].shape == () and enc[1]['label'] is False
    assert np.array_equal(enc.arrays(2)['token_weight'], [30, 31])
