from .errors import DatasetError, RowSource
from .formats import ROLES, normalize_row
from .loader import Dataset, load_dataset, parse_dataset_spec, row_id

__all__ = ['DatasetError', 'RowSource', 'ROLES', 'normalize_row', 'Dataset', 'load_dataset', 'parse_dataset_spec',
           'row_id']
