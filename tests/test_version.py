"""The results key (hdlora._version): it changes with the code that computes stored numbers, and only with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hdlora
from hdlora import _version
from hdlora._version import TASK_MODULES, code_version, fingerprint, hashed_modules

SRC = Path(hdlora.__file__).resolve().parent


@pytest.fixture()
def pkg(tmp_path: Path) -> Path:
    """A temporary copy of the package tree (sources only)."""
    dst = tmp_path / "hdlora"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def test_code_version_has_the_release_and_the_fingerprint():
    assert re.fullmatch(re.escape(hdlora.__version__) + r"\+[0-9a-f]{12}", code_version())
    assert code_version().endswith(fingerprint()[:12])
    assert fingerprint(SRC) == fingerprint()


def test_the_copy_has_the_same_key(pkg):
    assert fingerprint(pkg) == fingerprint(SRC)


def test_hashed_set_covers_the_task_modules_and_their_numerics():
    mods = hashed_modules()
    for name in TASK_MODULES + (
        "hdlora.params",
        "hdlora.activations",
        "hdlora.theory.solve",
        "hdlora.theory.finetune",
        "hdlora.theory.pretrain",
        "hdlora.theory.bayes",
        "hdlora.theory.applications",
        "hdlora.simulate.run",
        "hdlora.data",
    ):
        assert name in mods, name
    for name in mods:
        assert not name.endswith("cli"), name
    assert "hdlora.experiments.figures" not in mods  # the plots
    assert "hdlora.cli" not in mods and "hdlora.theory.cli" not in mods


@pytest.mark.parametrize(
    "rel, old, new",
    [
        (
            "experiments/figure_tasks.py",
            "b * b * pre.Q, b * pre.M",
            "b * b * pre.Q, b * b * pre.M",
        ),  # a figure task function
        ("experiments/figure_tasks.py", 'val("M", 1.0)', 'val("M", 1.5)'),  # the M = 1 default
        ("experiments/optimize.py", "def _brent(", "def _brent_renamed("),
        ("experiments/tasks.py", '"lam_ft": math.inf', '"lam_ft": 1e300'),
        ("theory/effective.py", "return A0 - 2 * M + Q", "return A0 - 2.0 * M + Q"),
        ("simulate/run.py", "import math\n", "import math\nimport os\n"),
        ("params.py", "return 1.0 + self.kappa0", "return self.kappa0 + 1.0"),
    ],
)
def test_editing_code_that_computes_stored_numbers_changes_the_key(pkg, rel, old, new):
    before = fingerprint(pkg)
    _edit(pkg / rel, old, new)
    assert fingerprint(pkg) != before


@pytest.mark.parametrize(
    "rel, old, new",
    [
        ("theory/effective.py", '"""Effective noises', '"""Effective noise levels'),  # module docstring
        ("theory/effective.py", '"""beta_min = M / Q', '"""beta_min = M / Q, the minimiser (edited)'),
        ("experiments/figure_tasks.py", "Options: n_mc, seed, Q, M.", "Options: n_mc, seed, Q and M."),
        (
            "theory/solve.py",
            "    noise = params.noise\n",
            "    # a new comment\n\n    noise = params.noise  # here too\n",
        ),
        ("experiments/optimize.py", "import itertools\n", "import itertools  # comment\n\n\n"),
        ("experiments/figures.py", "def _mark_nonconverged(", "def _mark_nonconverged_edited("),  # plotting
        ("experiments/figures.py", '"paper": dict(dim=150', '"paper": dict(dim=151'),  # figure specs
        ("cli.py", "import argparse", "import argparse\nimport os"),  # the CLIs
        ("theory/cli.py", "import argparse", "import argparse\nimport os"),
        ("experiments/figure_cli.py", "import argparse", "import argparse\nimport os"),
    ],
)
def test_docstrings_comments_plots_and_cli_do_not_change_the_key(pkg, rel, old, new):
    before = fingerprint(pkg)
    _edit(pkg / rel, old, new)
    assert fingerprint(pkg) == before


def test_a_module_imported_inside_a_task_function_joins_the_key(pkg):
    (pkg / "theory" / "newthing.py").write_text("X = 1\n")
    _edit(
        pkg / "experiments" / "figure_tasks.py",
        "    from hdlora.theory.pretrain import solve_pretrain\n",
        "    from hdlora.theory.pretrain import solve_pretrain\n    from ..theory import newthing  # noqa\n",
    )
    assert "hdlora.theory.newthing" in hashed_modules(pkg)
    before = fingerprint(pkg)
    (pkg / "theory" / "newthing.py").write_text("X = 2\n")
    assert fingerprint(pkg) != before


def test_every_module_loaded_by_the_task_functions_is_hashed():
    """Import the task modules and every task kind's function and library (as a worker does) in a
    fresh interpreter: every hdlora module then loaded, CLIs aside, must be under the key."""
    code = (
        "import json, sys\n"
        "from hdlora.experiments import tasks, figure_tasks, optimize\n"
        "for k in tasks.REGISTRY.values():\n"
        "    tasks._import(k.function)\n"
        "    k.library and tasks._import(k.library)\n"
        "for name in figure_tasks.__all__:\n"
        "    if name.endswith('_task'):\n"
        "        tasks.resolve(f'hdlora.experiments.figure_tasks:{name}')\n"
        "import hdlora.theory.pretrain, hdlora.theory.finetune, hdlora.theory.errors, hdlora.theory.applications\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'hdlora' or m.startswith('hdlora.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = {m for m in json.loads(out) if not m.rsplit(".", 1)[-1].endswith("cli")}
    assert loaded - set(hashed_modules()) == set()


def test_legacy_figure_task_names_still_resolve():
    from hdlora.experiments import figure_tasks, tasks

    fn = tasks.resolve("hdlora.experiments.figures:active_theory_task")
    assert fn is figure_tasks.active_theory_task
    assert tasks.get("hdlora.experiments.figures:effective_theory_task").warm_start


def test_strip_docstrings_keeps_code():
    import ast

    a = _version._dump(_version._strip_docstrings(ast.parse('def f():\n    "doc"\n    return 1\n')))
    b = _version._dump(_version._strip_docstrings(ast.parse("def f():\n    return 1  # c\n")))
    c = _version._dump(_version._strip_docstrings(ast.parse('def f():\n    "doc"\n')))
    assert a == b and "Pass" in c and a != c
