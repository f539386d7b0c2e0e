"""Does fine-tuning teach the model its training facts? Greedy answers before vs after, scored by key phrase.

    python examples/sft/before_after.py BASE_MODEL FINETUNED_DIR [DATASET]
Prints, per question, whether each model's answer contains the reference's key phrase, and the totals.
"""
from __future__ import annotations

import json
import sys

from megaswift.infer_engine import InferRequest, RequestConfig, TransformersEngine

# the fact each reference answer teaches (its last few words carry it)
def key_phrase(reference: str) -> str:
    return ' '.join(reference.rstrip('.').split()[-2:]).lower()


def main(base: str, tuned: str, dataset: str = 'examples/sft/megaswift_identity.jsonl') -> None:
    rows = [json.loads(line) for line in open(dataset, encoding='utf-8')]
    questions = {}
    for row in rows:  # one question per fact: the plain phrasing
        user, answer = row['messages'][0]['content'], row['messages'][1]['content']
        if not any(user.startswith(p) for p in ('Tell me', 'Quick')) and not user.endswith('briefly.'):
            questions[user] = answer
    cfg = RequestConfig(max_tokens=40, temperature=0)
    scores = {}
    for name, model in (('base', base), ('fine-tuned', tuned)):
        engine = TransformersEngine(model, torch_dtype='float32')
        replies = engine.infer([InferRequest([{'role': 'user', 'content': q}]) for q in questions], cfg)
        scores[name] = [key_phrase(a) in r.choices[0].message.content.lower() for a, r in zip(questions.values(),
                                                                                              replies)]
        for (q, a), r, ok in zip(questions.items(), replies, scores[name]):
            print(f'[{name}] {"OK " if ok else "-- "} {q} -> {r.choices[0].message.content[:80]!r}')
    n = len(questions)
    print(f'\nknows the fact: base {sum(scores["base"])}/{n}, fine-tuned {sum(scores["fine-tuned"])}/{n}')


if __name__ == '__main__':
    main(*sys.argv[1:])
