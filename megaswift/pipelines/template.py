"""``megaswift template``: encode one dataset row and print what the model sees and learns.

Sections: ``[INPUT_IDS]``, ``[INPUT]`` (decoded), ``[LABELS]`` (decoded; masked runs shown as
``[-100 * N]``) and ``[LOSS_SCALE]`` when the loss scale is not binary. In ``rlhf`` mode each
section is printed for the chosen and the rejected response (``[CHOSEN_INPUT_IDS]``, ...).
"""
from __future__ import annotations

import inspect

from ..arguments.base import ArgumentError
from ..arguments.template import TemplateCommandArguments
from ..dataset import DatasetError, RowSource, normalize_row
from ..dataset.readers import read_rows
from ..template import Template, TemplateError, get_template, infer_template_name, templates


def pick_row(path: str, line: int | None = None) -> tuple[dict, RowSource]:
    """The first row of ``path``, or the row that starts at ``line`` (as in ``file:line`` messages)."""
    for raw, src in read_rows(path):
        if line is None or src.line == line:
            return raw, src
        if src.line is not None and src.line > line:
            break
    if line is None:
        raise DatasetError(RowSource(path, 1), 'the file has no rows')
    raise DatasetError(RowSource(path, line), 'no row starts at this line (use the line of a row, e.g. from an '
                                              'error message)')


def encode_row(template: Template, raw: dict, src: RowSource) -> dict:
    row = normalize_row(raw, src)
    try:
        return template.encode(row)
    except TemplateError as e:
        message = str(e)
        prefix = f"field '{e.field}': "
        raise DatasetError(src, message[len(prefix):] if e.field and message.startswith(prefix) else message,
                           e.field) from None


def format_encoded(template: Template, encoded: dict) -> str:
    groups = [('chosen_', 'CHOSEN_'), ('rejected_', 'REJECTED_')] if 'chosen_input_ids' in encoded else [('', '')]
    lines = []
    for key, tag in groups:
        ids = encoded[f'{key}input_ids']
        lines += [f'[{tag}INPUT_IDS] {ids}', f'[{tag}INPUT] {template.safe_decode(ids)}']
        if f'{key}labels' in encoded:
            labels = encoded[f'{key}labels']
            lines += [f'[{tag}LABELS_IDS] {labels}', f'[{tag}LABELS] {template.safe_decode(labels)}']
        if f'{key}loss_scale' in encoded:
            lines.append(f'[{tag}LOSS_SCALE] {[round(w, 4) for w in encoded[f"{key}loss_scale"]]}')
    return '\n'.join(lines)


def template_main(args: TemplateCommandArguments) -> dict:
    from ..model import load_tokenizer
    tokenizer = load_tokenizer(args.model)
    name = args.template or infer_template_name(tokenizer)
    options = {}
    if args.enable_thinking is not None and name == 'generic':  # a variable of the tokenizer's own template
        options['chat_template_kwargs'] = {'enable_thinking': args.enable_thinking}
    elif args.enable_thinking is not None:
        if 'enable_thinking' not in inspect.signature(templates[name].__init__).parameters:
            raise ArgumentError(f"--enable_thinking: the '{name}' template has no thinking switch")
        options['enable_thinking'] = args.enable_thinking
    try:
        template = get_template(tokenizer, name, agent_template=args.agent_template, loss_scale=args.loss_scale,
                                system=args.system, max_length=args.max_length,
                                truncation_strategy=args.truncation_strategy, **options)
    except ValueError as e:  # e.g. 'generic' for a tokenizer without a chat template
        raise ArgumentError(f'--template {name}: {e}') from None
    template.set_mode(args.mode)
    raw, src = pick_row(args.data, args.line)
    encoded = encode_row(template, raw, src)
    print(f'[TEMPLATE] {template.name} (row {src}, mode {args.mode}, loss_scale {args.loss_scale})')
    print(format_encoded(template, encoded), flush=True)
    return encoded
