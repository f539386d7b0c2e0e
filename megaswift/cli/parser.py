"""Turn ``[config.yaml] --flag value ...`` into an arguments dataclass.

- Flags are the dataclass field names (``--max_new_tokens`` or ``--max-new-tokens``); no
  prefix abbreviations, so a typo never silently selects another flag.
- A first positional ``*.yaml|*.yml|*.json`` supplies defaults; flags override it. Its
  optional ``ENV`` mapping sets environment variables.
- Unknown flags or config keys fail with a close-match suggestion; config errors name the
  file and line.
- ``sft`` / ``pt`` / ``rlhf`` also take Megatron-SWIFT's flag names: ``cli/megatron_compat.py``
  translates (or refuses) them, on the command line and in the config, before this parsing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from ..utils.errors import UserError
from ..utils.registry import did_you_mean


class CLIError(UserError, ValueError):
    pass


_TRUE = {'true', '1', 'yes', 'y', 'on'}
_FALSE = {'false', '0', 'no', 'n', 'off'}


def _unwrap_optional(tp):
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(tp, value: Any, name: str) -> Any:
    """Convert a CLI string (or a YAML value) to the field's annotated type."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ('none', 'null')):
        if optional or tp is Any:
            return None
        raise CLIError(f'--{name}: a value is required')
    origin = get_origin(tp)
    if origin is list:
        (inner,) = get_args(tp) or (str,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(inner, v, name) for v in items]
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise CLIError(f"--{name}: invalid choice {value!r} (choose from {', '.join(map(str, choices))})"
                           f'{did_you_mean(value, choices)}')
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        raise CLIError(f'--{name}: expected true or false, got {value!r}')
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise CLIError(f'--{name}: expected {tp.__name__}, got {value!r}') from None
    if tp is str:  # JSON-object flags (e.g. --engine_kwargs) stay strings here; their group parses them
        return value if isinstance(value, str) else (json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    return value


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _is_list(tp) -> bool:
    return get_origin(_unwrap_optional(tp)[0]) is list


def split_flags(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``--name v1 v2 --flag --k=v`` -> ``[('name', ['v1', 'v2']), ('flag', []), ('k', ['v'])]`` (names as written)."""
    groups = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith('--') or tok == '--':
            raise CLIError(f'unexpected argument {tok!r}: arguments are --name value pairs')
        key, _, inline = tok[2:].partition('=')
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not (argv[i].startswith('--') and len(argv[i]) > 2
                                                   and not _is_number(argv[i])):
            values.append(argv[i])
            i += 1
        groups.append((key, values))
    return groups


def _flag_values(fields: dict[str, dataclasses.Field], groups: list[tuple[str, list[str]]],
                 also_known: list[str] = ()) -> dict[str, Any]:
    """Raw values (strings or lists of strings) of ``--name value...`` groups; unknown names fail with a suggestion."""
    out: dict[str, Any] = {}
    for key, values in groups:
        name = key.replace('-', '_')
        if name not in fields:
            raise CLIError(f"unknown argument '--{key}'{did_you_mean(name, [*fields, *also_known])}")
        tp = fields[name].type
        if _is_list(tp):
            out[name] = values
        elif not values:
            if _unwrap_optional(tp)[0] is bool:
                out[name] = True
            else:
                raise CLIError(f'--{key}: expected a value')
        elif len(values) > 1:
            raise CLIError(f'--{key}: expected one value, got {len(values)}: {values}')
        else:
            out[name] = values[0]
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def read_config(path: str) -> list[tuple[str, Any, Any]]:
    """A YAML/JSON config's ``(key, value, line)`` items; its ``ENV`` mapping is applied to the environment."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"config file '{path}' does not exist")
    text = p.read_text(encoding='utf-8')
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise CLIError(f'{path}: invalid YAML/JSON: {e}') from None
    if not isinstance(data, dict):
        raise CLIError(f'{path}: the config must be a mapping of argument names to values')
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    env = data.pop('ENV', None) or {}
    for k, v in env.items():
        os.environ[str(k)] = str(v)
    return [(str(key), value, lines.get(key, '?')) for key, value in data.items()]


def _config_values(path: str, fields: dict[str, dataclasses.Field], items,
                   also_known: list[str] = ()) -> dict[str, Any]:
    """The config's values by field name; unknown keys fail with ``file:line`` and a suggestion."""
    out = {}
    for key, value, line in items:
        name = key.replace('-', '_')
        if name not in fields:
            raise CLIError(f"{path}:{line}: unknown key '{key}'{did_you_mean(name, [*fields, *also_known])}")
        out[name] = value
    return out


def _megatron_compat(cls, fields, path, items, groups):
    """Megatron-SWIFT's flags (``cli/megatron_compat.py``) turned into megaswift's, for sft / pt / rlhf;
    returns ``(items, groups, the table's names)``."""
    from .megatron_compat import FlagUse, apply_megatron_compat, compat_command, megatron_flag_names
    command = compat_command(cls)
    if command is None:
        return items, groups, []
    uses = [FlagUse(key.replace('-', '_'), value, f'{path}:{line}', key) for key, value, line in items]
    uses += [FlagUse(key.replace('-', '_'), values, spelled=key) for key, values in groups]
    bool_fields = {name for name, f in fields.items() if _unwrap_optional(f.type)[0] is bool}
    uses = apply_megatron_compat(command, set(fields), bool_fields, uses)
    return ([(u.spelled, u.value, u.where.rpartition(':')[2]) for u in uses if not u.from_cli],
            [(u.spelled, u.value) for u in uses if u.from_cli], megatron_flag_names(command))


def parse_args(cls, argv: list[str]):
    """``[config] --flags`` -> ``cls(**values)``; raises CLIError with a readable message."""
    argv = list(argv)
    fields = _fields(cls)
    path = None
    if argv and not argv[0].startswith('--') and argv[0].lower().endswith(('.yaml', '.yml', '.json')):
        path = argv.pop(0)
    items, groups = read_config(path) if path else [], split_flags(argv)
    items, groups, megatron_names = _megatron_compat(cls, fields, path, items, groups)
    raw = _config_values(path, fields, items, megatron_names)
    raw.update(_flag_values(fields, groups, megatron_names))
    values = {name: coerce(fields[name].type, v, name) for name, v in raw.items()}
    try:
        return cls(**values)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise CLIError(str(e)) from e


def usage(cls, command: str) -> str:
    lines = [f'usage: megaswift {command} [config.yaml] [--flag value ...]', '', 'flags (default):']
    for name, f in _fields(cls).items():
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else 'required')
        lines.append(f'  --{name} ({default!r})')
    return '\n'.join(lines)
