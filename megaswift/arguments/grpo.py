"""``megaswift rlhf --rlhf_type grpo``: the GRPO group (Megatron-SWIFT / TRL flag names and meanings).

Batch sizes count completions: a step trains on ``--global_batch_size`` completions; a generation batch is
``--generation_batch_size`` = ``global_batch_size x --steps_per_generation`` completions (give one of the two),
``--num_generations`` per prompt, so it answers ``generation_batch_size / num_generations`` prompts. With
``--num_iterations`` mu > 1 each generation batch is trained mu times (against its old log-probs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import ArgumentError

VLLM_MODES = ('colocate', 'server')


@dataclass
class GrpoArguments:
    num_generations: int = 8              # completions per prompt (the group)
    generation_batch_size: int | None = None  # completions per generation (default global_batch_size x steps)
    steps_per_generation: int | None = None   # optimizer steps per generation batch (default 1)
    num_iterations: int = 1               # mu: passes over each generation batch
    reward_funcs: list[str] = field(default_factory=list)   # orms names / reward model dirs
    reward_weights: list[float] = field(default_factory=list)
    epsilon: float = 0.2                  # clip range (low; and high unless --epsilon_high)
    epsilon_high: float | None = None     # clip-higher (DAPO); cispo: the importance weight's cap is 1 + this
    importance_sampling_level: str = 'token'  # token | sequence (GSPO)
    advantage_estimator: str = 'grpo'     # grpo | rloo | reinforce_plus_plus
    scale_rewards: str = 'group'          # group | batch | none
    dynamic_sample: bool = False          # DAPO: drop groups whose rewards are all equal, draw more prompts
    max_resample_times: int = 3
    overlong_filter: bool = False         # completions cut by --max_completion_length train no token
    top_p: float = 1.0
    top_k: int = -1
    vllm_mode: str = 'colocate'           # colocate: an engine in the trainer | server: a megaswift rollout server
    rollout_backend: str = 'transformers'  # colocate engine: transformers | vllm | sglang
    rollout_url: str | None = None        # server mode: http://host:port (or --rollout_host/--rollout_port)
    rollout_host: str = '127.0.0.1'
    rollout_port: int = 8000
    rollout_api_key: str | None = None    # default: $MEGASWIFT_API_KEY
    rollout_timeout: float = 600.0        # seconds a generation or a weight push may take before it is an error
    rollout_communicator_host: str = '127.0.0.1'  # this node's address the server's workers can reach
    weight_sync_bucket_mb: float | None = None    # default: the server's (colocate: 512)
    async_generate: bool = False          # generate the next batch while this one trains (one generation off-policy)
    log_completions: bool = False         # <output_dir>/completions.jsonl: prompt, completion, rewards, advantage
    log_entropy: bool = True              # entropy of the sampling distribution on completion tokens
    multi_turn_scheduler: str | None = None  # multi-turn rollouts: a name in trainers/grpo/multi_turn.py's registry
    max_turns: int | None = None          # with --multi_turn_scheduler: at most this many assistant turns

    def _check(self):
        if getattr(self, 'rlhf_type', None) != 'grpo':
            if self.reward_funcs:
                raise ArgumentError(f"--reward_funcs is a GRPO option; --rlhf_type {self.rlhf_type} takes none")
            if self.multi_turn_scheduler or self.max_turns is not None:
                raise ArgumentError(f'--multi_turn_scheduler / --max_turns are GRPO options; --rlhf_type '
                                    f'{self.rlhf_type} takes none')
            return
        from ..trainers.grpo.advantages import ADVANTAGE_ESTIMATORS, SCALE_REWARDS
        from ..trainers.grpo.losses import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
        types = list(self.loss_type or ['grpo'])
        if len(types) != 1 or types[0] not in LOSS_TYPES:
            raise ArgumentError(f"--loss_type: one of {', '.join(LOSS_TYPES)} for grpo, got {types}")
        self.loss_type = types
        for flag, value, allowed in (('--importance_sampling_level', self.importance_sampling_level,
                                      IMPORTANCE_SAMPLING_LEVELS),
                                     ('--advantage_estimator', self.advantage_estimator, ADVANTAGE_ESTIMATORS),
                                     ('--scale_rewards', self.scale_rewards, SCALE_REWARDS),
                                     ('--vllm_mode', self.vllm_mode, VLLM_MODES)):
            if value not in allowed:
                raise ArgumentError(f"{flag}: unknown '{value}' ({', '.join(allowed)})")
        if self.num_generations < 2:
            raise ArgumentError(f'--num_generations: GRPO compares completions of a prompt, needs >= 2, '
                                f'got {self.num_generations}')
        if self.num_iterations < 1 or self.max_resample_times < 0:
            raise ArgumentError('--num_iterations must be >= 1 and --max_resample_times >= 0')
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ArgumentError('--epsilon and --epsilon_high must be > 0')
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ArgumentError(f'--reward_weights: {len(self.reward_weights)} weights for '
                                f'{len(self.reward_funcs)} --reward_funcs')
        if not self.reward_funcs:
            raise ArgumentError('--rlhf_type grpo needs --reward_funcs (e.g. accuracy format; see megaswift.rewards)')
        gbs = self.global_batch_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ArgumentError('give --generation_batch_size or --steps_per_generation, not both')
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or 1
            self.generation_batch_size = gbs * self.steps_per_generation
        elif self.generation_batch_size % gbs:
            raise ArgumentError(f'--generation_batch_size {self.generation_batch_size} must be a multiple of '
                                f'--global_batch_size {gbs} (completions per step)')
        else:
            self.steps_per_generation = self.generation_batch_size // gbs
        if self.generation_batch_size % self.num_generations:
            raise ArgumentError(f'--generation_batch_size {self.generation_batch_size} (completions per generation) '
                                f'must be a multiple of --num_generations {self.num_generations}')
        if self.async_generate and self.dynamic_sample:
            raise ArgumentError('--async_generate with --dynamic_sample is not supported: the resampling decision '
                                'needs the rewards before the next prompts are drawn')
        if self.packing:
            raise ArgumentError('--packing: GRPO trains on generated completions, packed padding-free per '
                                'micro-batch already (leave --packing false)')
        if getattr(self, 'streaming', False):
            raise ArgumentError('--streaming is not supported with --rlhf_type grpo (prompts are read up front)')
        per_generation = self.steps_per_generation * self.num_iterations
        if per_generation > 1 and self.save_steps % per_generation:
            raise ArgumentError(f'--save_steps {self.save_steps}: a checkpoint must fall between generation batches '
                                f'(every steps_per_generation x num_iterations = {per_generation} steps) to resume '
                                f'exactly')
        self._check_multi_turn()
        if self.rollout_api_key is None:
            import os

            from .serving import API_KEY_ENV
            self.rollout_api_key = os.environ.get(API_KEY_ENV) or None

    def _check_multi_turn(self):
        if self.max_turns is not None and not self.multi_turn_scheduler:
            raise ArgumentError('--max_turns needs --multi_turn_scheduler (the scheduler of the later turns)')
        if self.max_turns is not None and self.max_turns < 1:
            raise ArgumentError(f'--max_turns must be >= 1, got {self.max_turns}')
        if self.multi_turn_scheduler:
            from ..trainers.grpo.multi_turn import multi_turns
            from ..utils.plugins import import_external_plugins
            import_external_plugins(getattr(self, 'external_plugins', []))  # (once; their schedulers registered)
            if self.multi_turn_scheduler not in multi_turns:
                raise ArgumentError(f"--multi_turn_scheduler: unknown '{self.multi_turn_scheduler}' (registered: "
                                    f"{', '.join(sorted(multi_turns))}; more with --external_plugins)")

    @property
    def prompts_per_generation(self) -> int:
        return self.generation_batch_size // self.num_generations


__all__ = ['GrpoArguments', 'VLLM_MODES']
