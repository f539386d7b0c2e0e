"""``Registry``: the name -> plugin dict every plugin kind uses (rewards, templates, engines, callbacks, ...).

A registry is a plain dict, so plugins may still write ``orms['mine'] = MyORM`` from an
``--external_plugins`` file; it adds a ``register`` decorator that refuses to replace a name silently,
and ``lookup`` whose error for an unknown name says which flag, the closest known name and all of them::

    templates = Registry('template')

    @templates.register('chatml')
    class ChatMLTemplate(Template): ...

    templates.lookup('chatm', '--template')
    # UnknownPluginError: --template: unknown template 'chatm' (known: chatml); did you mean 'chatml'? ...
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable

from .errors import UserError

#: The last sentence of an unknown-name error, unless a registry sets its own.
PLUGIN_HINT = 'More can be registered with --external_plugins.'


def did_you_mean(name: str, choices: Iterable[Any]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``name``, or ``''`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"; did you mean '{close[0]}'?" if close else ''


class UnknownPluginError(UserError, ValueError):
    """A name no registry entry answers to; ``kind``, ``name``, ``flag`` and ``known`` say which."""

    def __init__(self, kind: str, name: str, known: Iterable[Any], flag: str | None = None,
                 hint: str = PLUGIN_HINT):
        self.kind, self.name, self.flag, self.hint = kind, name, flag, hint
        self.known = sorted(map(str, known))
        prefix = f'{flag}: ' if flag else ''
        super().__init__(f"{prefix}unknown {kind} '{name}' (known: {', '.join(self.known) or 'none'})"
                         f'{did_you_mean(name, self.known)}' + (f' {hint}' if hint else ''))

    def __reduce__(self):  # picklable (raised in a worker process), although __init__ takes more than the message
        return type(self), (self.kind, self.name, self.known, self.flag, self.hint)


class DuplicatePluginError(UserError, ValueError):
    """``register`` of a name that is already taken, without ``overwrite=True``."""


class Registry(dict):
    """A dict of ``name -> plugin`` (a class or function) of one ``kind``, named in error messages.

    ``hint`` ends every unknown-name error (default: :data:`PLUGIN_HINT`).
    """

    def __init__(self, kind: str, entries: dict | None = None, *, hint: str = PLUGIN_HINT):
        super().__init__(entries or {})
        self.kind = kind
        self.hint = hint

    def register(self, name: str | None = None, *, overwrite: bool = False) -> Callable[[Any], Any]:
        """Decorator storing its target under ``name`` (default: the target's ``__name__``); returns the target.

        ``@reg.register('name')`` or ``reg.register('name')(obj)``. A name already registered raises
        :class:`DuplicatePluginError` unless ``overwrite=True``.
        """
        def wrap(obj: Any) -> Any:
            key = name if name is not None else obj.__name__
            if key in self and not overwrite and self[key] is not obj:
                raise DuplicatePluginError(f"{self.kind} '{key}' is already registered ({self[key]!r}); "
                                           'pass overwrite=True to replace it')
            self[key] = obj
            return obj
        return wrap

    def lookup(self, name: str, flag: str | None = None) -> Any:
        """``self[name]``, or :class:`UnknownPluginError` naming ``flag``, the closest and the known names."""
        if name in self:
            return self[name]
        raise UnknownPluginError(self.kind, name, self, flag, self.hint)

    def __repr__(self) -> str:
        return f'Registry({self.kind!r}, {dict.__repr__(self)})'
