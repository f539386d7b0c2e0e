"""``megaswift <command> [config.yaml] [--flags]``. Nothing imports this module."""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from ..utils.dist import rank, report_failure
from ..utils.errors import UserError
from ..utils.registry import did_you_mean
from ..utils.slurm import apply_srun_env
from .launch import run_torchrun, torchrun_argv
from .parser import CLIError, parse_args, usage


@dataclass(frozen=True)
class Command:
    arguments: str      # 'module:Class'
    main: str           # 'module:function'
    help: str
    torchrun: bool      # relaunch under torchrun when NPROC_PER_NODE / NNODES are set


COMMANDS: dict[str, Command] = {
    'sample': Command('megaswift.arguments.sampling:SamplingArguments', 'megaswift.pipelines.sample:sample_main',
                      'best-of-N sampling with ORM/PRM filtering (rejection sampling, distillation)', torchrun=True),
    'template': Command('megaswift.arguments.template:TemplateCommandArguments',
                        'megaswift.pipelines.template:template_main',
                        'show how one dataset row is encoded: input ids, decoded text, labels, loss scale', torchrun=False),
    'deploy': Command('megaswift.arguments.deploy:DeployArguments', 'megaswift.pipelines.deploy:deploy_main',
                      'serve a model behind an OpenAI-compatible HTTP API', torchrun=False),
    'rollout': Command('megaswift.arguments.rollout:RolloutArguments', 'megaswift.pipelines.rollout:rollout_main',
                       'serve a model to an RL trainer: /infer with per-token log-probs, live weight sync',
                       torchrun=False),
    'export': Command('megaswift.arguments.export:ExportArguments', 'megaswift.pipelines.export:export_main',
                      'convert checkpoints: HF -> mcore (--to_mcore) or mcore -> HF (--to_hf), at any TP/PP',
                      torchrun=True),
    'sft': Command('megaswift.arguments.train:SftArguments', 'megaswift.pipelines.train:sft_main',
                   'supervised fine-tuning on megatron-core (TP/PP/VPP/SP/DP, packing, loss scale, resume)',
                   torchrun=True),
    'rlhf': Command('megaswift.arguments.rlhf:RlhfArguments', 'megaswift.pipelines.train:rlhf_main',
                    'preference / reward / distillation training on megatron-core: --rlhf_type dpo, orpo, simpo, '
                    'cpo, kto, rm, gkd', torchrun=True),
    'pt': Command('megaswift.arguments.train:PtArguments', 'megaswift.pipelines.train:pt_main',
                  'continued pre-training on plain text on megatron-core (loss on every token)', torchrun=True),
}


def _load(ref: str):
    module, _, attr = ref.partition(':')
    return getattr(importlib.import_module(module), attr)


def _help() -> str:
    width = max(map(len, COMMANDS))
    rows = '\n'.join(f'  {name.ljust(width)}  {c.help}' for name, c in COMMANDS.items())
    return f'usage: megaswift <command> [config.yaml] [--flag value ...]\n\ncommands:\n{rows}'


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help', 'help'):
        print(_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megaswift: unknown command '{name}'{did_you_mean(name, COMMANDS)}\n\n{_help()}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    if cmd.torchrun and (relaunch := torchrun_argv(name, rest)):
        return run_torchrun(relaunch)
    args_cls = _load(cmd.arguments)
    if any(a in ('-h', '--help') for a in rest):
        print(usage(args_cls, name))
        return 0
    from ..utils.logging import setup_logging
    try:
        apply_srun_env()  # `srun megaswift ...`, one task per rank: RANK, WORLD_SIZE, ... from SLURM_*
    except UserError as e:
        print(f'megaswift {name}: error: {e}', file=sys.stderr)
        return 1
    setup_logging()
    try:
        args = parse_args(args_cls, rest)
    except CLIError as e:
        print(f'megaswift {name}: error: {e}', file=sys.stderr)
        return 2
    try:
        _load(cmd.main)(args)
    except (UserError, ImportError, ConnectionError, FileNotFoundError) as e:
        if os.environ.get('MEGASWIFT_DEBUG'):
            raise
        if rank() == 0:  # under torchrun every rank fails alike: say it once
            print(f'megaswift {name}: error: {e}', file=sys.stderr)
        return 1
    except Exception as e:
        report_failure(e, f'megaswift {name}')  # which rank failed, on which host
        raise
    return 0


if __name__ == '__main__':
    sys.exit(main())
