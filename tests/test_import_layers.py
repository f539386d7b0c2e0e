"""The layers of megaswift hold as imports: a module imports only from its own layer or the ones below.

Every module's imports are read with ``ast`` (top-level and function-level, ``TYPE_CHECKING`` blocks included;
relative imports resolved), each side mapped to its layer by its first sub-package. The top-level
``__init__.py`` and ``__main__.py`` may import anything; a sub-package missing from ``LAYERS`` is reported too, so
a new package gets a layer when it is added.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import megaswift

# ../shared/notes/architecture.md, extended with the packages it does not name:
# - metrics (eval metrics: BLEU/ROUGE/accuracy over decoded text) and tuners (LoRA on megatron-core modules) are
#   building blocks of the same kind as rewards and megatron: the trainers and exporters use them;
# - callbacks receive the trainer's logs and are handed to it by the pipelines, so they sit with the trainers
#   (they may read trainer-level types); serving wraps the infer engines for `megaswift deploy` beside sampling;
#   rollout (the RL generation server, its client and the weight sync) sits beside serving and uses it.
LAYERS = {
    'utils': 1, 'ops': 1,
    'dataset': 2, 'template': 2, 'model': 2, 'megatron': 2, 'infer_engine': 2, 'rewards': 2, 'metrics': 2,
    'tuners': 2,
    'trainers': 3, 'sampling': 3, 'export': 3, 'serving': 3, 'callbacks': 3, 'rollout': 3,
    'arguments': 4, 'pipelines': 4,
    'cli': 5,
}
FREE_MODULES = ('__init__', '__main__')  # the package's own top-level modules may import anything


def module_name(root: Path, path: Path) -> tuple[str, bool]:
    """The dotted name of the module at ``path`` under the package ``root``, and whether it is a package."""
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    is_package = parts[-1] == '__init__'
    return '.'.join(parts[:-1] if is_package else parts), is_package


def imported_modules(tree: ast.AST, name: str, is_package: bool):
    """``(line, module)`` for every import in ``tree`` (of module ``name``), relative ones made absolute."""
    here = name.split('.') if is_package else name.split('.')[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            target = '.'.join(base + ([node.module] if node.module else []))
            if '.' not in target:  # `from pkg import sub`: the names may be sub-packages
                for alias in node.names:
                    yield node.lineno, f'{target}.{alias.name}'
            else:
                yield node.lineno, target


def upward_imports(root: str | Path, layers: dict[str, int] = LAYERS) -> list[str]:
    """``'file:line -> module'`` for every import of the package at ``root`` that goes to a higher layer (or from
    or to a sub-package without a layer)."""
    root = Path(root)
    package = root.name
    problems = []
    for path in sorted(root.rglob('*.py')):
        name, is_package = module_name(root, path)
        parts = name.split('.')
        if len(parts) == 1 or (len(parts) == 2 and parts[1] in FREE_MODULES):
            continue
        where = path.relative_to(root.parent).as_posix()
        if parts[1] not in layers:
            problems.append(f'{where}:1 -> (no layer for {package}.{parts[1]})')
            continue
        tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
        for line, target in sorted(imported_modules(tree, name, is_package)):
            t = target.split('.')
            if t[0] != package or len(t) < 2:
                continue
            if t[1] not in layers:
                if (root / t[1]).is_dir() or (root / f'{t[1]}.py').is_file():
                    problems.append(f'{where}:{line} -> {target} (no layer for {package}.{t[1]})')
                continue
            if layers[t[1]] > layers[parts[1]]:
                problems.append(f'{where}:{line} -> {target}')
    return problems


def test_megaswift_imports_only_its_own_layer_or_below():
    problems = upward_imports(Path(megaswift.__file__).parent)
    assert not problems, 'imports from a lower layer to a higher one:\n' + '\n'.join(problems)


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_reports_exactly_the_upward_import(tmp_path):
    root = tmp_path / 'fakepkg'
    write_package(root, {
        '__init__.py': 'from .cli import main\n',                        # the top level may import anything
        '__main__.py': 'from fakepkg.cli import main\n',
        'utils/__init__.py': '',
        'utils/errors.py': 'class UserError(Exception):\n    pass\n',
        'dataset/__init__.py': 'from .loader import load\n',
        'dataset/loader.py': '''\
            from ..utils.errors import UserError
            from . import errors
            import fakepkg.template.base


            def load():
                from fakepkg import utils
                from ..trainers.loop import Trainer
                return Trainer
            ''',
        'dataset/errors.py': 'from fakepkg.dataset.loader import load\n',
        'template/__init__.py': '', 'template/base.py': 'import numpy\n',
        'trainers/__init__.py': '', 'trainers/loop.py': 'from ..dataset import load\nTrainer = object\n',
        'cli/__init__.py': 'from ..trainers.loop import Trainer\nmain = None\n',
    })
    layers = {'utils': 1, 'dataset': 2, 'template': 2, 'trainers': 3, 'cli': 5}
    assert upward_imports(root, layers) == ['fakepkg/dataset/loader.py:8 -> fakepkg.trainers.loop']
    assert upward_imports(root, {k: v for k, v in layers.items() if k != 'template'}) == [
        'fakepkg/dataset/loader.py:3 -> fakepkg.template.base (no layer for fakepkg.template)',
        'fakepkg/dataset/loader.py:8 -> fakepkg.trainers.loop',
        'fakepkg/template/__init__.py:1 -> (no layer for fakepkg.template)',
        'fakepkg/template/base.py:1 -> (no layer for fakepkg.template)',
    ]
