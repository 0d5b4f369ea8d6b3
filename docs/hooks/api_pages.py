"""MkDocs hook: the API reference pages, one section per public module, generated at build time.

Every module of ``src/hdlora/<package>/`` whose name does not start with ``_`` gets a
``::: hdlora.<package>.<module>`` block (mkdocstrings), so that a module added later is in
the reference without editing a page, and its docstrings are checked by ``mkdocs build --strict``.
"""
from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

SRC = Path(__file__).resolve().parents[2] / "src" / "hdlora"

#: page -> (title, introduction, modules or packages whose modules are listed)
PAGES = {
    "api/core.md": ("hdlora: parameters, data, activations",
                    "The parameters in the paper's symbols, the data model and the activations.",
                    ["hdlora.params", "hdlora.data", "hdlora.activations"]),
    "api/theory.md": ("hdlora.theory", "The sharp asymptotic theory (Results 3-5 and the appendices).",
                      ["hdlora.theory", "hdlora.theory.*"]),
    "api/simulate.md": ("hdlora.simulate", "The finite-D simulator (eqs. 2, 3, 6; Algorithm 1).",
                        ["hdlora.simulate", "hdlora.simulate.*"]),
    "api/experiments.md": ("hdlora.experiments", "Sweeps, the results store, executors, `optimize` and the figures.",
                           ["hdlora.experiments.*"]),
}


def _modules(spec: str) -> list[str]:
    if not spec.endswith(".*"):
        return [spec]
    package = spec[:-2]
    folder = SRC.joinpath(*package.split(".")[1:])
    return [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")]


def page_text(title: str, intro: str, specs: list[str]) -> str:
    lines = [f"# {title}", "", intro, ""]
    for spec in specs:
        for mod in _modules(spec):
            lines += [f"::: {mod}", "    options:", "      show_root_full_path: true"]
            if SRC.joinpath(*mod.split(".")[1:]).is_dir():
                # a package: its docstring only; its re-exports are documented in their modules
                # (``hdlora.simulate.run`` is both a module and the function it re-exports)
                lines.append("      members: false")
            lines.append("")
    return "\n".join(lines)


def on_files(files, config):
    for uri, (title, intro, specs) in PAGES.items():
        files.append(File.generated(config, uri, content=page_text(title, intro, specs)))
    return files
