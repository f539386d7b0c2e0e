"""GRPO's prompts: dataset rows -> the chat template's prompt token ids (generation prompt added) and the row's
columns for the reward functions (``sampling/prompts.py``: a trailing assistant turn is the reference answer, the
``solution`` unless the row has one)."""
from __future__ import annotations

from dataclasses import dataclass

from ...sampling.prompts import Prompt, build_prompt
from ...utils.errors import TrainDataError


@dataclass
class PromptSet:
    prompts: list[Prompt]
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def reward_columns(self, owners: list[int], completion_ids: list[list[int]]) -> dict[str, list]:
        """The reward functions' columns for completions of prompts ``owners`` (one entry per completion)."""
        keys = {'messages', 'response_token_ids'} | {k for i in set(owners) for k in self.prompts[i].columns}
        cols = {k: [] for k in keys}
        for i, ids in zip(owners, completion_ids):
            p = self.prompts[i]
            for k in keys:
                cols[k].append(p.messages if k == 'messages' else ids if k == 'response_token_ids'
                               else p.columns.get(k))
        return cols


def encode_prompts(rows, encoder, max_prompt_length: int) -> PromptSet:
    """Every row's prompt; a row without a user turn, a template error or a prompt longer than
    ``max_prompt_length`` (``--max_length`` minus ``--max_completion_length``) is an error naming its file:line."""
    from ...template.base import TemplateError
    encoder.set_mode('infer')
    prompts, ids = [], []
    for row, source in zip(rows.rows, rows.sources):
        try:
            prompt = build_prompt(row, str(source))
            encoded = encoder.encode({'messages': prompt.messages, 'tools': prompt.columns.get('tools')})
        except (TemplateError, ValueError) as e:
            raise TrainDataError(f'{source}: {e}') from None
        n = len(encoded['input_ids'])
        if n > max_prompt_length:
            raise TrainDataError(f'{source}: the prompt has {n} tokens, more than --max_length minus '
                                 f'--max_completion_length ({max_prompt_length}); raise --max_length or shorten it')
        prompts.append(prompt)
        ids.append([int(t) for t in encoded['input_ids']])
    if not prompts:
        raise TrainDataError('the GRPO dataset has no prompts')
    return PromptSet(prompts, ids)





def prepare_grpo_data(args, plan, chat_encoder):
    """``(TrainData, max_steps, PromptSet)``: the prompts, a collator for the generated sequences (padding-free
    rows, the ``advantages`` column) and a sampler drawing ``generation_batch_size / num_generations`` prompts per
    generation."""
    import math
    from ...dataset.loader import load_rows
    from ...template.collator import Collator
    from ...template.packing import padding_multiple
    from ..data import StepSampler
    from ..generate import stop_token_ids
    from ..loop import TrainData
    if not args.use_chat_template:
        raise TrainDataError('--rlhf_type grpo needs the chat template (prompts are conversations)')
    tokenizer = plan.tokenizer
    encoder = chat_encoder(args, tokenizer, plan.max_length)
    max_prompt = plan.max_length - int(args.max_completion_length)
    if max_prompt < 1:
        raise TrainDataError(f'--max_length {plan.max_length} leaves no room for prompts with '
                             f'--max_completion_length {args.max_completion_length}')
    prompts = encode_prompts(load_rows(args.dataset, args.data_seed, chat=True), encoder, max_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    multiple = padding_multiple(args.tensor_model_parallel_size, 1, args.sequence_parallel)
    collator = Collator(None, [], True, multiple, pad_id, plan.max_length * args.micro_batch_size,
                        columns=('advantages',), sequences=('',))
    data = TrainData(collator, len(prompts), tokenizer=tokenizer,
                     stop_token_ids=stop_token_ids(tokenizer, encoder, plan.hf_config, plan.model_dir))
    data.sampler = StepSampler(len(prompts), args.prompts_per_generation, args.data_seed,
                               args.train_dataloader_shuffle)
    per_generation = args.steps_per_generation * args.num_iterations
    if args.max_steps:
        max_steps = int(args.max_steps)
    else:
        max_steps = math.ceil(args.num_train_epochs * len(prompts) / args.prompts_per_generation) * per_generation
    return data, max_steps, prompts
__all__ = ['PromptSet', 'encode_prompts', 'prepare_grpo_data']
