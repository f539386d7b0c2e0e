#!/usr/bin/env python3
"""Encode throughput and packing efficiency on examples/data/chat_mix.jsonl with SmolLM2's real tokenizer.

    python benchmarks/packing.py                   # 4000 rows (the 320-row file repeated), L = 512/1024/2048
    python benchmarks/packing.py --rows 400 --no-csv
    python benchmarks/packing.py --write-data      # regenerate examples/data/chat_mix.jsonl (deterministic)

1. encode: ``encode_dataset`` with num_proc 1 and 2 into fresh cache directories (cold), then again
   (cached); checks that num_proc 2 gives exactly the num_proc 1 samples.
2. packing: for packing_length L in 512/1024/2048 the samples of <= L tokens (what max_length=L with
   truncation_strategy 'delete' keeps) are packed best-fit-decreasing and in order; plain right padding
   uses micro-batches of --batch-size samples in dataset order. Reported: rows, efficiency (real tokens /
   all tokens) and padding tokens per real token.
3. BFD speed on 1e5 and 1e6 synthetic lognormal lengths.
Rows are appended to benchmarks/results.csv (date, benchmark, tool, variant, wall_s, samples, samples_per_s, notes).
"""
import argparse
import datetime
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from results_csv import RESULTS_CSV, append_csv  # noqa: E402  (benchmarks/)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
DATA = ROOT / 'examples' / 'data' / 'chat_mix.jsonl'
MODEL_ID = 'HuggingFaceTB/SmolLM2-135M-Instruct'

# ------------------------------------------------------------------------------------ the chat set
SYSTEMS = ['You are a concise assistant. Answer in as few words as possible.',
           'You are a patient math tutor. Explain every step.',
           'You are a senior Python engineer reviewing code. Be direct and specific.',
           'You are a friendly travel agent who knows Europe well.',
           'You are a careful technical writer. Use short paragraphs and lists.']
TOPICS = {
    'python': ['list comprehensions', 'generators', 'decorators', 'context managers', 'dataclasses', 'asyncio',
               'type hints', 'the GIL', 'virtual environments', 'unit tests'],
    'math': ['prime numbers', 'derivatives', 'integrals', 'matrix multiplication', 'probability', 'logarithms',
             'the Pythagorean theorem', 'modular arithmetic', 'geometric series', 'eigenvalues'],
    'cooking': ['sourdough bread', 'risotto', 'a tomato sauce', 'pancakes', 'a curry', 'roast vegetables',
                'a lemon tart', 'fried rice', 'a vinaigrette', 'miso soup'],
    'travel': ['Lisbon', 'Vienna', 'Kyoto', 'the Scottish Highlands', 'Barcelona', 'Prague', 'Iceland',
               'the Amalfi coast', 'Krakow', 'Copenhagen'],
    'science': ['photosynthesis', 'black holes', 'vaccines', 'plate tectonics', 'entropy', 'DNA replication',
                'the water cycle', 'superconductors', 'climate feedbacks', 'neural networks'],
}
ASK = ['Can you explain {t}?', 'How does {t} work?', 'What should a beginner know about {t}?',
       'Give me a short overview of {t}.', 'Why do people find {t} confusing?', 'What is the best way to learn {t}?',
       'Compare two common approaches to {t}.', 'Write a step-by-step guide to {t}.']
FOLLOW = ['Can you give an example?', 'Why is that?', 'Could you make it shorter?', 'What are common mistakes?',
          'How would you test that?', 'And what about edge cases?', 'Can you summarise that in one sentence?',
          'Thanks! One more thing: is there a faster way?']
OPEN = ['Sure.', 'Good question.', 'Here is the short version.', 'Let us go through it.', 'Happy to help.']
BODY = ['The key idea behind {t} is that each part does one small job and the pieces compose cleanly.',
        'Most of the difficulty with {t} comes from a few details that are easy to overlook at first.',
        'In practice, {t} is usually learned by working through small examples before the general rule.',
        'A common mistake is to treat {t} as a single trick instead of a family of related techniques.',
        'It helps to write down what you expect to happen before you try {t}, then compare.',
        'Experts tend to describe {t} in terms of trade-offs rather than fixed rules.',
        'If something goes wrong, reduce the problem until {t} is the only moving part.',
        'There is a simple version of {t} that covers most everyday cases, and a general one for the rest.',
        'Timing matters: doing the steps of {t} in a different order usually gives a worse result.',
        'You can check your understanding of {t} by explaining it to someone else in two minutes.']
CODE = ['```python\ndef solve(items):\n    seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n'
        '            seen.add(x)\n            out.append(x)\n    return out\n```',
        '```python\nfrom dataclasses import dataclass\n\n@dataclass\nclass Point:\n    x: float\n    y: float\n\n'
        '    def norm(self) -> float:\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n```',
        '```python\nimport asyncio\n\nasync def fetch(i):\n    await asyncio.sleep(0.1)\n    return i * i\n\n'
        'async def main():\n    print(await asyncio.gather(*(fetch(i) for i in range(5))))\n```']


def _answer(rng, topic, kind, scale):
    parts = [rng.choice(OPEN)]
    for _ in range(max(1, int(rng.lognormvariate(-0.1, 0.8) * scale))):
        parts.append(rng.choice(BODY).format(t=topic))
    if rng.random() < 0.3:
        parts.append('\n'.join(f'{k}. {rng.choice(BODY).format(t=topic)}' for k in range(1, rng.randint(3, 7))))
    if kind == 'python' and rng.random() < 0.6:
        parts.append(rng.choice(CODE))
    return ' '.join(parts[:2]) + ('\n\n' + '\n\n'.join(parts[2:]) if len(parts) > 2 else '')


def make_chat_mix(n=320, seed=7):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.choice(list(TOPICS))
        topic = rng.choice(TOPICS[kind])
        scale = 5.0 if rng.random() < 0.06 else 1.0  # a few long answers, for the packing tail
        turns = 1 if rng.random() < 0.5 else rng.randint(2, 4)
        msgs = [{'role': 'system', 'content': rng.choice(SYSTEMS)}] if rng.random() < 0.15 else []
        for t in range(turns):
            q = rng.choice(ASK).format(t=topic) if t == 0 else rng.choice(FOLLOW)
            msgs += [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': _answer(rng, topic, kind, scale)}]
        rows.append({'messages': msgs})
    return rows


# ---------------------------------------------------------------------------------------- timing
def _busy_s():
    with open('/proc/stat') as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf('SC_CLK_TCK')


def _own_s():
    r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(x.ru_utime + x.ru_stime for x in r)


def timed(fn):
    """(result, wall_s, note): the note gives load1 and the CPU-s other processes used meanwhile."""
    load, b0, o0, t0 = os.getloadavg()[0], _busy_s(), _own_s(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    other = max(0.0, (_busy_s() - b0) - (_own_s() - o0))
    quiet = 'quiet machine' if other < 0.1 * wall * os.cpu_count() else 'CONTENDED'
    return out, wall, f'load1 at start {load:.2f}; CPU-s used by other processes {other:.1f}; {quiet}; ' \
                      f'{os.cpu_count()} cores'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rows', type=int, default=4000, help='rows to encode (the file repeats past its size)')
    ap.add_argument('--batch-size', type=int, default=8, help='samples per plain-padded micro-batch')
    ap.add_argument('--csv', default=str(RESULTS_CSV))
    ap.add_argument('--no-csv', action='store_true')
    ap.add_argument('--write-data', action='store_true', help='regenerate the chat set and exit')
    ap.add_argument('--max-wait', type=float, default=120, help='seconds to wait for a 1-min load below 1.0')
    args = ap.parse_args()
    if args.write_data:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in make_chat_mix()), encoding='utf-8')
        print(f'wrote {DATA} ({DATA.stat().st_size / 1024:.0f} KB)')
        return

    import numpy as np

    from megaswift.dataset import load_dataset
    from megaswift.dataset.encode import encode_dataset
    from megaswift.model import load_tokenizer
    from megaswift.template import get_template
    from megaswift.template.packing import pack_best_fit_decreasing, pack_in_order, packing_efficiency

    t0 = time.monotonic()
    while os.getloadavg()[0] >= 1.0 and time.monotonic() - t0 < args.max_wait:
        time.sleep(5)
    tok = load_tokenizer(MODEL_ID)
    template = get_template(tok, max_length=2048, truncation_strategy='delete')
    ds = load_dataset(f'{DATA}#{args.rows}')
    date = datetime.datetime.now().isoformat(timespec='seconds')
    rows = []

    def row(benchmark, variant, wall, samples, notes):
        rows.append({'date': date, 'benchmark': benchmark, 'tool': 'megaswift', 'variant': variant,
                     'wall_s': f'{wall:.4f}', 'samples': samples,
                     'samples_per_s': f'{samples / wall:.1f}' if wall > 0 else '', 'notes': notes})
        print(f'{benchmark:<22} {variant:<16} {wall:8.4f}s {samples:>8} samples  {rows[-1]["samples_per_s"]:>10}/s  '
              f'{notes}')

    bench = f'encode_chat_mix_{len(ds)}'
    with tempfile.TemporaryDirectory(prefix='bench_encode_') as tmp:
        results = {}
        for num_proc in (1, 2):
            cache = Path(tmp) / f'np{num_proc}'
            enc, wall, note = timed(lambda: encode_dataset(ds, template, num_proc=num_proc, cache_dir=cache))
            results[num_proc] = enc
            row(bench, f'num_proc{num_proc}-cold', wall, len(ds), note)
        enc, wall, note = timed(lambda: encode_dataset(ds, template, num_proc=1, cache_dir=Path(tmp) / 'np1'))
        assert enc.from_cache
        row(bench, 'cached', wall, len(ds), note)
        a, b = results[1], results[2]
        same = len(a) == len(b) and all(np.array_equal(a.values[k], b.values[k]) and
                                        np.array_equal(a.lens[k], b.lens[k]) for k in a.values)
        if not same:
            sys.exit('num_proc 2 encoded differently from num_proc 1')
        lengths = np.asarray(a.lengths)
    print(f'{len(lengths)} samples, tokens: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, '
          f'p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}')

    for L in (512, 1024, 2048):
        lens = lengths[lengths <= L]
        real = int(lens.sum())
        dropped = f'{len(lengths) - len(lens)} of {len(lengths)} samples > {L} dropped'
        for name, fn in (('bfd', pack_best_fit_decreasing), ('in_order', pack_in_order)):
            bins, wall, note = timed(lambda: fn(lens, L))
            eff = packing_efficiency([lens[b] for b in bins], L)
            row(f'packing_chat_mix_L{L}', name, wall, len(lens),
                f'rows {len(bins)}; efficiency {eff:.4f}; pad per real token {(1 - eff) / eff:.4f}; {dropped}; {note}')
        batches = [lens[i:i + args.batch_size] for i in range(0, len(lens), args.batch_size)]
        padded = sum(len(x) * int(x.max()) for x in batches)
        row(f'packing_chat_mix_L{L}', f'pad_bs{args.batch_size}', 0.0, len(lens),
            f'rows {len(lens)} ({len(batches)} micro-batches); efficiency {real / padded:.4f}; pad per real token {(padded - real) / real:.4f}; '
            f'{dropped}')

    rng = np.random.default_rng(0)
    for n in (10**5, 10**6):
        lens = np.clip(rng.lognormal(5.5, 1.0, n).astype(np.int64), 1, 2048)
        bins, wall, note = timed(lambda: pack_best_fit_decreasing(lens, 2048))
        eff = packing_efficiency([lens[b] for b in bins], 2048)
        row('pack_bfd_synthetic', f'{n:.0e}-L2048', wall, n, f'lognormal(5.5, 1.0) lengths; rows {len(bins)}; '
            f'efficiency {eff:.4f}; {note}')

    if not args.no_csv:
        append_csv(args.csv, rows)


if __name__ == '__main__':
    main()
