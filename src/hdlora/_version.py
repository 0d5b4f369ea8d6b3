"""Package version and the code fingerprint that keys stored results.

Results in a sweep database are keyed by :func:`code_version`, the release number plus a
hash of every module that computes a stored number.  The set is derived from the imports:
starting at the task modules (:data:`TASK_MODULES`: the sweep's built-in task kinds, the
figure task functions and the optimiser), every ``hdlora`` module they import (at module
level or inside a function, absolute or relative, or named in a ``"hdlora.module:function"``
string as the task registry does), transitively, with the ``__init__`` of each package on
the way.  CLI modules (``cli.py``, ``*_cli.py``) are never part of it.

Each module is hashed on its syntax tree with docstrings removed (:func:`_dump`), so that a
comment, a docstring, a blank line or a line break never changes the key, while any change
of code does.  Plotting (``experiments/figures.py``) and the CLI are outside the set: editing
them keeps stored results valid.  A custom task kind that lives outside the package (a sweep
file naming ``"mypackage.module:function"``) is not covered: its author keys its rows.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path

__version__ = "0.1.0"

#: Modules whose functions compute the stored numbers: the roots of the fingerprint.
TASK_MODULES = ("hdlora.experiments.tasks", "hdlora.experiments.figure_tasks", "hdlora.experiments.optimize")
_PACKAGE = "hdlora"
_TARGET = re.compile(r"^(hdlora(?:\.\w+)*):\w")


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli")


def _path(root: Path, module: str) -> Path | None:
    """The source file of ``module`` (a dotted name under the package) in the tree at ``root``."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    f = base.with_suffix(".py")
    return f if parts and f.is_file() else None


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The package-internal modules named by the imports (anywhere in the tree) and task-target strings."""
    here = module if is_package else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # a submodule, or an attribute (dropped below)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _TARGET.match(node.value)
            if m:
                out.add(m.group(1))
    return {m for m in out if m == _PACKAGE or m.startswith(_PACKAGE + ".")}


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _dump(node) -> str:
    """A canonical text of a syntax tree: node types, non-empty fields and values, no positions.

    (Unlike ``ast.dump`` this leaves out empty fields, so that a field added to the grammar with an
    empty default by a newer Python, e.g. ``type_params``, does not change the key.)
    """
    if isinstance(node, ast.AST):
        fields = []
        for f in node._fields:
            v = getattr(node, f, None)
            if v is None or v == []:
                continue
            fields.append(f"{f}={_dump(v)}")
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return "[" + ", ".join(_dump(x) for x in node) + "]"
    return repr(node)


def _closure(root: Path | str | None, roots: tuple[str, ...]) -> dict[str, tuple[Path, ast.Module]]:
    root = Path(__file__).resolve().parent if root is None else Path(root)
    found: dict[str, tuple[Path, ast.Module]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found or _is_cli(name):
            continue
        path = _path(root, name)
        if path is None:  # an attribute imported from a module, not a module
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found[name] = (path, tree)
        parts = name.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]  # the packages on the way
        todo += sorted(_imports(tree, name, path.name == "__init__.py"))
    return dict(sorted(found.items()))


def hashed_modules(root: Path | str | None = None, roots: tuple[str, ...] = TASK_MODULES) -> dict[str, Path]:
    """Module name -> source file of every module the fingerprint covers, for the package tree at ``root``."""
    return {name: path for name, (path, _) in _closure(root, roots).items()}


def fingerprint(root: Path | str | None = None) -> str:
    """sha256 (hex) over the module names and docstring-free syntax trees of :func:`hashed_modules`."""
    h = hashlib.sha256()
    for name, (_, tree) in _closure(root, TASK_MODULES).items():
        h.update(name.encode())
        h.update(b"\0")
        h.update(_dump(_strip_docstrings(tree)).encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``"<version>+<12 hex digits>"``: the release number and the :func:`fingerprint` of the installed package."""
    return f"{__version__}+{fingerprint()[:12]}"
