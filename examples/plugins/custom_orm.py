"""Example ``--external_plugins`` file: a custom outcome reward.

    megaswift sample ... --external_plugins examples/plugins/custom_orm.py --orm_model contains_answer

Importing this file registers ``orms['contains_answer']``. A reward is called as
``reward(completions, **columns) -> list[float]``; columns (``solution``, ``messages``, ...) are
aligned with ``completions``, and unknown columns must be accepted via ``**kwargs``.
"""
from megaswift.rewards import ORM, orms


class ContainsAnswer(ORM):
    """1.0 if the gold ``solution`` string appears verbatim in the completion, else 0.0 (None -> 0.0)."""

    def __call__(self, completions, solution=None, **kwargs):
        solution = solution or [None] * len(completions)
        return [1.0 if s is not None and str(s).strip() and str(s).strip() in c else 0.0
                for c, s in zip(completions, solution)]


orms['contains_answer'] = ContainsAnswer
