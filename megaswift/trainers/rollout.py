"""Completions generated during training, for objectives that train on them (GKD on-policy and ``--seq_kd``).

The loop collates a step's micro-batches from the dataset, then hands them to ``Objective.rollout`` with a
``Rollout`` of the step. An objective that trains on generated completions calls ``Rollout.completions(source,
...)``: every sample's prompt (its tokens before the first trained label) is answered by ``source`` (``'policy'``,
the model being trained, or a frozen model such as ``'teacher'``) with the in-trainer generation
(``generate.generate``: megatron-core forwards in the training layout, no KV cache), and the micro-batches are
re-collated with those answers as the trained tokens: prompt + answer (+ the stop token that ended it, trained like
the dataset's end-of-turn token).

Sampling is reproducible and layout-independent: sample ``i`` of the encoded dataset at step ``s`` draws from a
generator seeded with ``(--seed, s, i)``, so tensor-, data- and pipeline-parallel layouts, and a resumed run,
generate the same completions (up to the float differences of the forward itself). Pipeline parallelism cannot
generate (every layer is needed on each rank): ``arguments/rlhf.py`` refuses it before any model is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..utils.constants import IGNORE_INDEX
from ..utils.errors import ArgumentError
from ..template.collator import to_device


def sample_seed(seed: int, step: int, sample_index: int) -> int:
    """The generator seed of encoded sample ``sample_index`` at training step ``step``."""
    return ((int(seed) * 1_000_003 + int(step)) * 1_000_033 + int(sample_index)) % (2 ** 63)


@dataclass
class Rollout:
    """One training step's view for ``Objective.rollout``: its micro-batches (items of the training collator) and
    the trainer that generates."""
    trainer: Any
    micro_batches: list[list[int]]
    step: int

    def completions(self, source: str, temperature: float, max_new_tokens: int) -> list[dict]:
        """The step's micro-batches with every sample's response replaced by ``source``'s completion of its prompt
        (sampled at ``temperature``, at most ``max_new_tokens`` and ``--max_length`` tokens in all); each batch
        also holds ``generated_tokens`` (int, the answers' tokens)."""
        from .generate import GenerationSpec, generate, generation_mode, prompt_length
        trainer = self.trainer
        collator = trainer.data.collator
        if tuple(collator.sequences) != ('',):
            raise ArgumentError(f'generated completions need one sequence per sample, the objective collates '
                                f'{collator.sequences}')
        models = trainer.models if source == 'policy' else trainer.frozen[source]
        model = models[0]
        gathered = [collator.gather(mb) for mb in self.micro_batches]  # per micro-batch: its sequences, columns
        prompts = [seq['input_ids'][:prompt_length(seq)].tolist() for seqs, _ in gathered for seq in seqs]
        seeds = [sample_seed(trainer.args.seed, self.step, i) for mb in self.micro_batches
                 for i in collator.sample_indices(mb)]
        limits = [int(getattr(trainer.hf_config, 'max_position_embeddings', 0) or 0), int(collator.max_length or 0)]
        spec = GenerationSpec(max_new_tokens=int(max_new_tokens), stop_ids=list(trainer.data.stop_token_ids),
                              pad_to_multiple_of=max(1, int(collator.pad_to_multiple_of)),
                              pad_token_id=int(collator.pad_token_id),
                              max_total_length=min([n for n in limits if n > 0], default=None),
                              tokens_per_forward=max(int(collator.max_length or 0) * trainer.args.micro_batch_size,
                                                     1024),
                              temperature=float(temperature))

        def forward(batch: dict):
            return trainer.model_output(model, trainer.forward(model, to_device(batch, trainer.device)))
        with generation_mode(models):
            answers, ended = generate(forward, prompts, spec, seeds)
        batches, k = [], 0
        for seqs, columns in gathered:
            completed, generated = [], 0
            for _ in seqs:
                answer = answers[k] + ([ended[k]] if ended[k] is not None else [])
                completed.append({'input_ids': np.asarray(prompts[k] + answer, dtype=np.int64),
                                  'labels': np.asarray([IGNORE_INDEX] * len(prompts[k]) + answer, dtype=np.int64)})
                generated += len(answer)
                k += 1
            batch = collator.collate(completed, columns)
            batch['generated_tokens'] = generated
            batches.append(to_device(batch, trainer.device))
        return batches


__all__ = ['Rollout', 'sample_seed']
