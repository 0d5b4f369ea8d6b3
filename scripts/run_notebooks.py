"""Execute the notebooks of docs/notebooks/ (CI: `make notebooks`; stored outputs: `make notebooks-outputs`).

Default (CI): each stored notebook is first checked against its paired jupytext file
(``NAME.py``, percent format: the same cells, so that the reviewed text is the executed one),
then a COPY is executed in a temporary directory with ``HDLORA_NB_SMALL=1`` (small sizes; the
first code cell of every notebook reads it). The stored notebooks are never written.

``--update``: rebuild each ``NAME.ipynb`` from its ``NAME.py`` and execute it at the stored
(modest) size, HDLORA_NB_SMALL unset, writing the outputs into ``docs/notebooks/NAME.ipynb``.
The working directory is a temporary one in both modes (the notebooks write under
``results/`` relative to it), so nothing lands in docs/.

The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH), whatever
other "python3" kernels the machine has. Prints one line per notebook and a closing
'notebooks: N passed, N failed'; exit status 1 when a notebook failed or is out of sync.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "docs" / "notebooks"
KERNEL = "hdlora-notebooks"


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def out_of_sync(ipynb: Path) -> str | None:
    """None when NAME.py has the same cells as NAME.ipynb, else a one-line reason."""
    py = ipynb.with_suffix(".py")
    if not py.exists():
        return f"{py.name} (the paired jupytext file) is missing"
    a, b = _cells(nbformat.read(ipynb, as_version=4)), _cells(jupytext.read(py))
    if a == b:
        return None
    if len(a) != len(b):
        return f"{ipynb.name} has {len(a)} cells, {py.name} has {len(b)}: run `make notebooks-outputs`"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"cell {i + 1} differs between {ipynb.name} and {py.name}: run `make notebooks-outputs`"


def write_kernelspec(where: Path) -> None:
    d = where / "kernels" / KERNEL
    d.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    (d / "kernel.json").write_text(json.dumps(spec))


def execute(nb, cwd: Path, timeout: int) -> None:
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}, record_timing=False
    )
    client.execute()
    # the stored notebooks name the usual kernel, not the temporary one
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebook names (default: all of docs/notebooks/*.ipynb)")
    ap.add_argument(
        "--update",
        action="store_true",
        help="rebuild NAME.ipynb from NAME.py and store its outputs at the full (modest) size",
    )
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = ap.parse_args(argv)

    if args.update:
        paths = sorted(NOTEBOOKS.glob("*.py"))
    else:
        paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names or p.name in args.names]
    if not paths:
        print("notebooks: no notebook found", file=sys.stderr)
        return 1

    passed = failed = 0
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hdlora-nb-") as tmp:
        tmp = Path(tmp)
        write_kernelspec(tmp / "jupyter")
        os.environ["JUPYTER_PATH"] = str(tmp / "jupyter")
        if args.update:
            os.environ.pop("HDLORA_NB_SMALL", None)
        else:
            os.environ["HDLORA_NB_SMALL"] = "1"
        for path in paths:
            name = path.stem
            work = tmp / name
            work.mkdir()
            t0 = time.perf_counter()
            try:
                if args.update:
                    nb = jupytext.read(path)
                else:
                    reason = out_of_sync(path)
                    if reason:
                        raise RuntimeError(reason)
                    nb = nbformat.read(path, as_version=4)  # a copy in memory: the file is not written
                execute(nb, work, args.timeout)
                if args.update:
                    target = path.with_suffix(".ipynb")
                    nbformat.write(nb, target)
                    jupytext.write(nb, path, fmt="py:percent")  # keep the pair's metadata in step
            except Exception as exc:  # noqa: BLE001 - report and go on with the next notebook
                failed += 1
                print(f"FAILED {name} after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}", flush=True)
                print("".join(traceback.format_exception_only(exc))[-4000:], file=sys.stderr, flush=True)
                continue
            passed += 1
            print(f"ok     {name}  {time.perf_counter() - t0:.1f} s", flush=True)
    mode = "stored size, outputs written" if args.update else "small mode (HDLORA_NB_SMALL=1), copies"
    print(f"total {time.perf_counter() - t_all:.1f} s, {mode}")
    print(f"notebooks: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
