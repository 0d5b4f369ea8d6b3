"""Every public function of the numerics (hdlora.theory, hdlora.simulate) carries full type hints.

Public: a module-level function or a method of a module-level class whose name has no leading
underscore (dunder methods other than __init__ are exempt, as are private helpers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hdlora

SRC = Path(hdlora.__file__).resolve().parent
FILES = sorted(
    p
    for pkg in ("theory", "simulate")
    for p in (SRC / pkg).glob("*.py")
    if not p.name.startswith("_") or p.name == "__init__.py"
)  # private modules exempt


def _public_functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node, False
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not item.name.startswith("_") or item.name == "__init__"
                ):
                    yield f"{node.name}.{item.name}", item, True


def _missing(fn: ast.FunctionDef, method: bool) -> list[str]:
    a = fn.args
    args = a.posonlyargs + a.args + a.kwonlyargs
    if method and args and args[0].arg in ("self", "cls"):
        args = args[1:]
    out = [x.arg for x in args if x.annotation is None]
    out += [f"*{x.arg}" for x in (a.vararg, a.kwarg) if x is not None and x.annotation is None]
    if fn.returns is None and fn.name != "__init__":
        out.append("return")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_public_functions_are_fully_annotated(path: Path):
    tree = ast.parse(path.read_text())
    bad = {name: miss for name, fn, method in _public_functions(tree) if (miss := _missing(fn, method))}
    assert not bad, f"{path.name}: public functions without full type hints: {bad}"
