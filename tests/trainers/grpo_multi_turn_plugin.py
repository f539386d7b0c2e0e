"""Multi-turn schedulers and a reward for the GRPO multi-turn tests (an ``--external_plugins`` file)."""
from megaswift.rewards import ORM, orms
from megaswift.trainers.grpo.multi_turn import MultiTurnScheduler, multi_turns

FOLLOW_UP = 'Now say it again in other words.'


class AskOnce(MultiTurnScheduler):
    """After the first turn, one fixed user turn; then the conversation is over."""

    def step(self, messages, completion, columns, turn):
        return [{'role': 'user', 'content': FOLLOW_UP}] if turn == 1 else None


class AlwaysAsk(MultiTurnScheduler):
    """A user turn after every turn: only ``--max_turns`` (or a truncated turn, or --max_length) ends it."""

    def step(self, messages, completion, columns, turn):
        return [{'role': 'user', 'content': f'{FOLLOW_UP} ({turn})'}]


class TurnCount(ORM):
    """The ``turns`` column (1 when absent: single-turn GRPO); in multi-turn GRPO checks that ``messages`` (the
    conversation before the last turn) ends with a user turn. (Registered for the whole test session: it must
    also take the generic call of tests/rewards.)"""

    def __call__(self, completions, turns=None, messages=None, **columns):
        if turns is None:
            return [1.0] * len(completions)
        assert all(m[-1]['role'] == 'user' for m in messages)
        return [float(t) for t in turns]


multi_turns['ask_once'] = AskOnce
multi_turns['always_ask'] = AlwaysAsk
orms['turn_count'] = TurnCount
