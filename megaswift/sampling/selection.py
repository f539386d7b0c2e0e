"""Choose which samples of one prompt to keep, from their ORM / PRM rewards.

Unlike ms-swift, the ground truth is never a candidate, a sample must pass every reward
model used to be kept, ranking uses raw rewards (ORM first, then PRM) rather than per-prompt
min-max normalisation, and the top ``n_best_to_keep`` are taken after filtering.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    index: int
    text: str
    orm: float | None = None
    prm: float | None = None


@dataclass
class Selection:
    kept: list[Candidate]
    rejected: Candidate | None
    skipped: str | None = None   # 'no_passing_sample' | 'easy_query' when nothing is kept


def passes(c: Candidate, orm_threshold: float, prm_threshold: float) -> bool:
    return (c.orm is None or c.orm > orm_threshold) and (c.prm is None or c.prm > prm_threshold)


def select(candidates: list[Candidate], n_best_to_keep: int, orm_threshold: float = 0.0, prm_threshold: float = 0.0,
           easy_query_threshold: float | None = None) -> Selection:
    """Without rewards every sample is kept. With rewards: the best passing samples, and the worst as rejected."""
    scored = any(c.orm is not None or c.prm is not None for c in candidates)
    if not scored:
        return Selection(kept=list(candidates), rejected=None)
    has_orm = any(c.orm is not None for c in candidates)
    if has_orm and easy_query_threshold is not None:
        solved = sum(c.orm > orm_threshold for c in candidates) / len(candidates)
        if solved >= easy_query_threshold:
            return Selection(kept=[], rejected=None, skipped='easy_query')
    ranked = sorted(candidates, key=lambda c: (c.orm or 0.0, c.prm or 0.0, -c.index), reverse=True)
    rejected = ranked[-1] if len(ranked) > 1 else None
    pool = ranked[:-1] if rejected is not None else ranked
    kept = [c for c in pool if passes(c, orm_threshold, prm_threshold)][:n_best_to_keep]
    if not kept:
        return Selection(kept=[], rejected=None, skipped='no_passing_sample')
    return Selection(kept=kept, rejected=rejected)
