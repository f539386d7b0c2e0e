"""The one results table every benchmark appends to: benchmarks/results.csv, one row per tool/variant and run."""
import csv
from pathlib import Path

RESULTS_CSV = Path(__file__).resolve().parent / 'results.csv'
CSV_COLUMNS = ['date', 'benchmark', 'tool', 'variant', 'wall_s', 'samples', 'samples_per_s', 'notes']


def append_csv(path, rows: list[dict]) -> None:
    """Append ``rows`` (dicts with CSV_COLUMNS) to ``path``, writing the header first when the file is new or
    empty, and say so."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a', newline='') as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f'appended {len(rows)} row(s) to {path}')
