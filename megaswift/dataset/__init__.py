from .errors import DatasetError, RowSource
from .formats import ROLES, normalize_row
from .loader import Dataset, load_dataset, load_rows, parse_dataset_spec, row_id, split_rows
from .preference import add_kl_responses

__all__ = ['DatasetError', 'RowSource', 'ROLES', 'normalize_row', 'Dataset', 'load_dataset', 'load_rows',
           'parse_dataset_spec', 'row_id', 'split_rows', 'add_kl_responses']
