"""Turn ``[config.yaml] --flag value ...`` into an arguments dataclass.

- Flags are the dataclass field names (``--max_new_tokens`` or ``--max-new-tokens``); no
  prefix abbreviations, so a typo never silently selects another flag.
- A first positional ``*.yaml|*.yml|*.json`` supplies defaults; flags override it. Its
  optional ``ENV`` mapping sets environment variables.
- Unknown flags or config keys fail with a close-match suggestion; config errors name the
  file and line.
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


def parse_flags(cls, argv: list[str]) -> dict[str, Any]:
    """Parse ``--name value...`` pairs into raw values (strings or lists of strings)."""
    fields = _fields(cls)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith('--') or tok == '--':
            raise CLIError(f'unexpected argument {tok!r}: arguments are --name value pairs')
        key, _, inline = tok[2:].partition('=')
        name = key.replace('-', '_')
        if name not in fields:
            raise CLIError(f"unknown argument '--{key}'{did_you_mean(name, fields)}")
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not (argv[i].startswith('--') and len(argv[i]) > 2
                                                   and not _is_number(argv[i])):
            values.append(argv[i])
            i += 1
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


def load_config(path: str, cls) -> dict[str, Any]:
    """Read a YAML/JSON config; unknown keys fail with ``file:line`` and a suggestion."""
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
    fields = _fields(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace('-', '_')
        if name not in fields:
            raise CLIError(f"{path}:{lines.get(key, '?')}: unknown key '{key}'{did_you_mean(name, fields)}")
        out[name] = value
    return out


def parse_args(cls, argv: list[str]):
    """``[config] --flags`` -> ``cls(**values)``; raises CLIError with a readable message."""
    argv = list(argv)
    raw: dict[str, Any] = {}
    if argv and not argv[0].startswith('--') and argv[0].lower().endswith(('.yaml', '.yml', '.json')):
        raw.update(load_config(argv.pop(0), cls))
    raw.update(parse_flags(cls, argv))
    fields = _fields(cls)
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
