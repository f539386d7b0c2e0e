"""Arguments of ``megaswift rlhf`` (Megatron-SWIFT / ms-swift flag names): ``sft``'s groups plus the objective's.

``--rlhf_type`` picks the objective (``megaswift/trainers/objectives``): dpo, orpo, simpo, cpo, kto, rm, gkd, grpo (or
one an ``--external_plugins`` file registers). For dpo ``--loss_type`` is the list of DPO variants combined by
``--loss_weights``; ``--label_smoothing`` is the preference-label noise (cDPO / rDPO / EXO), not token smoothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import ArgumentError
from .grpo import GrpoArguments
from .train import SftArguments

RLHF_TYPES = ('dpo', 'orpo', 'simpo', 'cpo', 'kto', 'rm', 'gkd', 'grpo')
DEFAULT_BETA = {'dpo': 0.1, 'orpo': 0.1, 'simpo': 2.0, 'cpo': 0.1, 'kto': 0.1, 'gkd': 0.5, 'grpo': 0.04}


@dataclass
class RlhfObjectiveArguments:
    rlhf_type: str = 'dpo'
    ref_model: str | None = None          # the frozen reference (dpo, kto); default: the --model weights
    beta: float | None = None             # default per type: dpo/kto/cpo/orpo 0.1, simpo 2.0, gkd 0.5
    loss_weights: list[float] = field(default_factory=list)  # one per --loss_type (dpo)
    rpo_alpha: float | None = None        # dpo: + rpo_alpha * NLL of the chosen responses (RPO)
    ld_alpha: float | None = None         # dpo: LD-DPO, tokens past the shorter response weigh ld_alpha
    reference_free: bool = False          # dpo: no reference model (its log-probs are 0)
    simpo_gamma: float = 1.0              # simpo: the target reward margin
    cpo_alpha: float | None = None        # cpo/simpo: + cpo_alpha * NLL of the chosen responses (cpo default 1)
    desirable_weight: float = 1.0         # kto
    undesirable_weight: float = 1.0       # kto
    center_rewards_coefficient: float | None = None  # rm: + coef * mean((r_chosen + r_rejected)^2)
    teacher_model: str | None = None      # gkd: the teacher (same tokenizer)
    temperature: float = 0.9              # gkd: of student and teacher; grpo: of sampling (and of the loss's log-probs)
    lmbda: float = 0.0                    # gkd: probability that a step trains on the student's own completions
    seq_kd: bool = False                  # gkd: the other steps train on the teacher's completions (not the data's)
    max_completion_length: int = 512      # gkd / grpo: new tokens at most per generated completion
    precompute_ref_log_probs: bool = False  # reference log-probs once before training, stored with the data

    def _check(self):
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.rlhf_type, 0.1)
        if self.rlhf_type == 'grpo' and self.beta < 0:
            raise ArgumentError(f'--beta: the KL weight must be >= 0 (0: no reference model), got {self.beta}')
        if self.rlhf_type not in ('gkd', 'grpo') and self.beta <= 0:
            raise ArgumentError(f'--beta: must be > 0 for --rlhf_type {self.rlhf_type}, got {self.beta}')
        if self.rlhf_type == 'gkd':
            if not 0.0 <= self.beta <= 1.0:
                raise ArgumentError(f'--beta: gkd interpolates forward (0) and reverse (1) KL, got {self.beta}')
            if not self.teacher_model:
                raise ArgumentError('--rlhf_type gkd needs --teacher_model (a model with the same tokenizer)')
            if self.temperature <= 0:
                raise ArgumentError(f'--temperature: must be > 0, got {self.temperature}')
        if self.rlhf_type != 'gkd' and (self.lmbda or self.seq_kd):
            raise ArgumentError(f'--lmbda and --seq_kd are GKD options; --rlhf_type {self.rlhf_type} takes neither')
        if not 0.0 <= self.lmbda <= 1.0:
            raise ArgumentError(f'--lmbda: a probability in [0, 1], got {self.lmbda}')
        if self.max_completion_length < 1:
            raise ArgumentError(f'--max_completion_length: must be >= 1, got {self.max_completion_length}')
        pp = int(getattr(self, 'pipeline_model_parallel_size', 1) or 1)
        if (self.lmbda or self.seq_kd) and pp > 1:
            raise ArgumentError(f"{'--lmbda > 0' if self.lmbda else '--seq_kd'} generates completions during "
                                f'training, which needs every layer on each rank: --pipeline_model_parallel_size '
                                f'{pp} is not supported with it (use tensor and data parallelism)')
        if self.precompute_ref_log_probs and (self.rlhf_type not in ('dpo', 'kto') or self.reference_free):
            raise ArgumentError('--precompute_ref_log_probs: only dpo and kto use a reference model')
        if self.precompute_ref_log_probs and getattr(self, 'streaming', False):
            raise ArgumentError('--precompute_ref_log_probs needs the whole dataset before training; with '
                                '--streaming the reference runs every step (leave --precompute_ref_log_probs false)')
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ArgumentError('--desirable_weight and --undesirable_weight must be > 0')


@dataclass
class RlhfArguments(SftArguments, RlhfObjectiveArguments, GrpoArguments):
    """``megaswift rlhf``: preference optimisation, KTO, reward modelling and distillation on megatron-core."""
    loss_type: list[str] = field(default_factory=list)  # dpo: sigmoid (default), ipo, ...; grpo: grpo|bnpo|dr_grpo|dapo|cispo

    def _check(self):
        from ..trainers.objectives import losses
        if self.rlhf_type not in losses:
            raise ArgumentError(f"--rlhf_type: unknown value '{self.rlhf_type}' ({', '.join(sorted(losses))})")
        if self.rlhf_type == 'dpo':
            from ..trainers.objectives.preference_losses import DPO_LOSS_TYPES
            self.loss_type = list(self.loss_type or ['sigmoid'])
            unknown = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
            if unknown:
                raise ArgumentError(f"--loss_type: unknown DPO loss type(s) {unknown} ({', '.join(DPO_LOSS_TYPES)})")
            if self.loss_weights and len(self.loss_weights) != len(self.loss_type):
                raise ArgumentError(f'--loss_weights: {len(self.loss_weights)} weights for {len(self.loss_type)} '
                                    f'--loss_type values')
            if 'robust' in self.loss_type and not 0 <= self.label_smoothing < 0.5:
                raise ArgumentError('--label_smoothing: robust DPO needs it in [0, 0.5)')
        elif self.loss_type and self.rlhf_type != 'grpo':
            raise ArgumentError(f'--loss_type selects DPO variants; --rlhf_type {self.rlhf_type} takes none')

    @property
    def command(self) -> str:
        return 'rlhf'


__all__ = ['RLHF_TYPES', 'RlhfArguments']
