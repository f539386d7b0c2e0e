"""Multi-turn GRPO rollouts: ``--multi_turn_scheduler NAME`` (``--max_turns N``), the idea and names of ms-swift's
``MultiTurnScheduler``.

A scheduler decides, after each turn of a conversation, what comes next::

    class MyScheduler(MultiTurnScheduler):
        def step(self, messages, completion, columns, turn):
            # messages: the conversation before this turn's completion (prompt + earlier turns);
            # completion: this turn's text; columns: the dataset row's columns; turn: 1, 2, ...
            return [{'role': 'user', 'content': 'Are you sure?'}]   # or None: the conversation is over

    multi_turns['my_scheduler'] = MyScheduler   # in an --external_plugins file

``check_finished`` (before ``step``) ends a conversation whose turn was cut by ``--max_completion_length``
(``finish_reason == 'length'``) or that has had ``--max_turns`` turns; a scheduler may override it.

The first turn is the usual ``--num_generations`` completions of every prompt; every conversation then goes on
turn by turn, one completion per conversation and turn, the open conversations of a draw batched in one request
to the engine. Turn ``t`` of completion ``k`` of a prompt is seeded ``sample_seed(first turn's seed, t, k)``, so
runs and resumes are reproducible. The trained sequence is token-exact: the prompt, every token as the engine
generated it (a stop token included), then the tokens of the appended messages as the chat template renders them
after the assistant turn (its end-of-turn text, less the stop token the model generated, and the generation
prompt): generated text is never tokenised again. Labels are the generated tokens only. A conversation whose next
turn would not fit ``--max_length`` (at least one token to generate) ends before the appended messages.

The reward functions see the final conversation: ``completions`` is the last assistant turn, ``messages`` the
conversation it answers (prompt and every earlier turn: ``messages + [last turn]`` is the whole conversation, as
in single-turn GRPO), ``response_token_ids`` the last turn's tokens and ``turns`` the number of assistant turns.

Built in: ``math_retry`` (a wrong answer by the ``math`` ORM gets a user turn asking to check and answer again).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ...rollout.weight_sync import RolloutError
from ...utils.registry import Registry
from ..rollout import sample_seed
from .generation import generate_checked

logger = logging.getLogger(__name__)

multi_turns = Registry('multi-turn scheduler')
APPENDED_ROLES = ('user', 'tool', 'tool_response', 'system')


class MultiTurnScheduler:
    """What follows a turn: ``step`` returns the messages to append (user / tool turns) or None (the end)."""

    def __init__(self, max_turns: int | None = None):
        self.max_turns = max_turns

    def check_finished(self, messages: list[dict], completion: str, finish_reason: str, turn: int) -> bool:
        """True ends the conversation without asking ``step``: a turn cut by the length limit, or ``max_turns``."""
        return finish_reason == 'length' or (self.max_turns is not None and turn >= self.max_turns)

    def step(self, messages: list[dict], completion: str, columns: dict[str, Any], turn: int) -> list[dict] | None:
        raise NotImplementedError


@multi_turns.register('math_retry')
class MathRetryScheduler(MultiTurnScheduler):
    """A completion the ``math`` ORM finds wrong (against the row's ``solution``) gets a user turn asking to check
    the work and answer again; a right one, or a row without a solution, ends the conversation."""
    retry_prompt = ('That answer is not correct. Check your work step by step and give the final answer again, '
                    'in \\boxed{}.')

    def __init__(self, max_turns: int | None = None):
        super().__init__(max_turns)
        from ...rewards import get_orm
        self.orm = get_orm('math')

    def step(self, messages, completion, columns, turn):
        solution = columns.get('solution')
        if solution is None or self.orm([completion], solution=[solution])[0] > 0:
            return None
        return [{'role': 'user', 'content': self.retry_prompt}]


@dataclass
class Conversation:
    """One completion's conversation; ``ids`` are its tokens after the prompt, ``mask`` 1 on generated ones."""
    owner: int                      # the prompt's index
    index: int                      # the completion's index in its prompt's group
    seed: int                       # the first turn's seed
    prompt_ids: list[int]
    messages: list[dict]            # the prompt's messages and every turn so far (the last: the last completion)
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    last_ids: list[int] = field(default_factory=list)
    finish: str = 'stop'
    turns: int = 0


class MultiTurnRollout:
    """Rank 0: continues the first turn's completions with ``scheduler`` (``--multi_turn_scheduler``)."""

    def __init__(self, scheduler: MultiTurnScheduler, encoder, tokenizer, max_length: int,
                 max_completion_length: int):
        self.scheduler, self.encoder, self.tokenizer = scheduler, encoder, tokenizer
        self.max_length, self.max_completion_length = int(max_length), int(max_completion_length)

    # ------------------------------------------------------------------------------------------ rollout
    def run(self, source, prompts, prompt_ids: list[int], requests: list[dict],
            results: list[list[dict]]) -> list[Conversation]:
        """The conversations of the first turn's ``results`` (``requests`` answered, one per prompt), in order."""
        convs = []
        for i, req, comps in zip(prompt_ids, requests, results):
            for k, comp in enumerate(comps):
                conv = Conversation(i, k, int(req['seed']), list(req['prompt_token_ids']),
                                    [dict(m) for m in prompts.prompts[i].messages])
                self._add_turn(conv, comp)
                convs.append(conv)
        sampling = {k: v for k, v in requests[0].items() if k in ('temperature', 'top_p', 'top_k')} if requests else {}
        live, turn = convs, 1
        while live:
            nxt, waiting = [], []
            for conv in live:
                request = self._next_request(conv, prompts.prompts[conv.owner], turn, sampling)
                if request is not None:
                    nxt.append(request)
                    waiting.append(conv)
            if not waiting:
                break
            turn += 1
            for conv, comps in zip(waiting, generate_checked(source, nxt)):
                self._add_turn(conv, comps[0])
            live = waiting
        return convs

    def _add_turn(self, conv: Conversation, completion: dict) -> None:
        ids = [int(t) for t in completion['token_ids']]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        conv.messages.append({'role': 'assistant', 'content': text})
        conv.ids += ids
        conv.mask += [1] * len(ids)
        conv.last_ids, conv.finish = ids, completion['finish_reason']
        conv.turns += 1

    def _next_request(self, conv: Conversation, prompt, turn: int, sampling: dict) -> dict | None:
        history, completion = conv.messages[:-1], conv.messages[-1]['content']
        if self.scheduler.check_finished(history, completion, conv.finish, turn):
            return None
        appended = self.scheduler.step(history, completion, prompt.columns, turn)
        if not appended:
            return None
        appended = _checked_messages(appended, type(self.scheduler).__name__)
        bridge = self.bridge_ids(history, completion, appended, conv.last_ids if conv.finish == 'stop' else [],
                                 prompt.columns.get('tools'))
        room = self.max_length - (len(conv.prompt_ids) + len(conv.ids) + len(bridge))
        if room < 1:
            logger.debug('a conversation of prompt %d ends at turn %d: the next turn does not fit --max_length',
                         conv.owner, turn)
            return None
        conv.messages += appended
        conv.ids += bridge
        conv.mask += [0] * len(bridge)
        return {'prompt_token_ids': conv.prompt_ids + conv.ids, 'n': 1, **sampling,
                'max_tokens': min(self.max_completion_length, room),
                'seed': sample_seed(conv.seed, turn + 1, conv.index)}

    # ------------------------------------------------------------------------------------------ template
    def bridge_ids(self, history: list[dict], completion: str, appended: list[dict], last_ids: list[int],
                   tools=None) -> list[int]:
        """The tokens between a generated turn and the next one: the chat template's text after the assistant
        content (its end of turn, less the stop token ``last_ids`` ended on), the appended messages and the
        generation prompt."""
        before = self._prompt_text(history, tools) + completion
        after = self._prompt_text(history + [{'role': 'assistant', 'content': completion}] + appended, tools)
        if not after.startswith(before):
            raise RolloutError('--multi_turn_scheduler: the chat template does not render the conversation as a '
                               'continuation of the generated turn (it rewrites earlier turns); multi-turn rollouts '
                               'need a template that only appends')
        text = after[len(before):]
        if last_ids:
            stop = self.tokenizer.decode(last_ids[-1:], skip_special_tokens=False)
            if stop and text.startswith(stop):
                text = text[len(stop):]
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)['input_ids']]

    def _prompt_text(self, messages: list[dict], tools) -> str:
        """The text the template's 'infer' mode tokenises for ``messages`` (the prompt of the next turn)."""
        from ...template.segments import join_text
        chat, tools = self.encoder.chat_messages({'messages': messages, 'tools': tools})
        if messages[-1]['role'] in ('tool_response', 'tool') and chat[-1]['role'] == 'assistant':
            return join_text(self.encoder._open_turn(chat, tools))  # ReAct: the model continues its turn
        return join_text(self.encoder.render_segments(chat, tools, add_generation_prompt=True))

    # ------------------------------------------------------------------------------------------ rewards
    @staticmethod
    def reward_inputs(convs: list[Conversation], columns: dict[str, list]) -> tuple[list[str], dict[str, list]]:
        """The reward functions' completions (each conversation's last turn) and ``columns`` (from
        ``PromptSet.reward_columns``) with ``messages`` (the conversation the last turn answers) and ``turns``."""
        texts = [c.messages[-1]['content'] for c in convs]
        return texts, {**columns, 'messages': [c.messages[:-1] for c in convs],
                       'response_token_ids': [c.last_ids for c in convs], 'turns': [c.turns for c in convs]}

    @staticmethod
    def batch_columns(convs: list[Conversation]) -> dict[str, list]:
        """The generation batch's per-completion entries: ``token_ids`` (everything after the prompt), the
        generated-token ``gen_mask``, the last turn's ``finish``, the whole ``conversation`` and ``turns``."""
        return {'token_ids': [c.ids for c in convs], 'gen_mask': [c.mask for c in convs],
                'finish': [c.finish for c in convs], 'conversation': [c.messages for c in convs],
                'turns': [c.turns for c in convs]}


#: the generation batch's entries ``batch_columns`` adds (carried per completion by the trainer)
BATCH_KEYS = ('gen_mask', 'conversation', 'turns')


def _checked_messages(messages, who: str) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f'multi-turn scheduler {who}.step returned {type(messages).__name__}, not a list of '
                        f'message dicts (or None)')
    for m in messages:
        if m.get('role') not in APPENDED_ROLES or not isinstance(m.get('content'), str):
            raise ValueError(f"multi-turn scheduler {who}.step returned {m!r}: appended messages need a role in "
                             f"{', '.join(APPENDED_ROLES)} and a string content")
    return [dict(m) for m in messages]


def build_multi_turn(args, tokenizer, max_length: int) -> MultiTurnRollout | None:
    """``--multi_turn_scheduler``'s rollout (rank 0), or None for single-turn GRPO."""
    name = getattr(args, 'multi_turn_scheduler', None)
    if not name:
        return None
    from ...template import get_template
    scheduler = multi_turns.lookup(name, '--multi_turn_scheduler')(max_turns=args.max_turns)
    # the template the prompts were encoded with (``pipelines.train.chat_encoder``: the same flags)
    encoder = get_template(tokenizer, args.template, agent_template=args.agent_template, loss_scale=args.loss_scale,
                           system=args.system, max_length=max_length, truncation_strategy=args.truncation_strategy)
    return MultiTurnRollout(scheduler, encoder, tokenizer, max_length, args.max_completion_length)


__all__ = ['BATCH_KEYS', 'Conversation', 'MathRetryScheduler', 'MultiTurnRollout', 'MultiTurnScheduler',
           'build_multi_turn', 'multi_turns']
