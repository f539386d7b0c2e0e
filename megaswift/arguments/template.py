"""Arguments of ``megaswift template``: show how one dataset row is encoded (ms-swift's template debugging)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from .base import ArgumentError, ArgumentsBase, ModelArguments, PluginArguments, TemplateArguments


@dataclass
class TemplateCommandArguments(ArgumentsBase, ModelArguments, TemplateArguments, PluginArguments):
    data: str | None = None                 # a .json file with one row, or a .jsonl/.json/.csv file (see --line)
    line: int | None = None                 # the row that starts at this line of --data (default: the first row)
    template: str | None = None             # default: inferred from the tokenizer's chat template
    agent_template: str | None = None       # default: the template's own (hermes for most)
    loss_scale: str = 'default'
    max_length: int | None = None
    truncation_strategy: Literal['delete', 'left', 'right', 'error'] = 'delete'
    mode: Literal['train', 'infer', 'rlhf', 'kto'] = 'train'
    enable_thinking: bool | None = None     # qwen3 only: False renders the empty think block in the prompt

    def _check(self):
        if not self.model:
            raise ArgumentError('--model is required (the tokenizer and chat template come from it)')
        if not self.data:
            raise ArgumentError('--data is required: a .json file with one row or a .jsonl file')
        if not os.path.isfile(self.data):
            raise ArgumentError(f"--data: file '{self.data}' does not exist")
        if self.line is not None and self.line < 1:
            raise ArgumentError(f'--line: line numbers start at 1, got {self.line}')
        if self.max_length is not None and self.max_length < 1:
            raise ArgumentError(f'--max_length: must be >= 1, got {self.max_length}')
        from ..template import templates
        if self.template is not None and self.template not in templates:
            raise ArgumentError(f"--template: unknown template '{self.template}' "
                                f"(available: {', '.join(sorted(templates))})")
        from ..template.agent import agent_templates
        if self.agent_template is not None and self.agent_template not in agent_templates:
            raise ArgumentError(f"--agent_template: unknown agent template '{self.agent_template}' "
                                f"(available: {', '.join(sorted(agent_templates))})")
        from ..template.loss_scale import get_loss_scale
        try:
            get_loss_scale(self.loss_scale)
        except ValueError as e:
            raise ArgumentError(f'--loss_scale: {e}') from None
