"""Benchmark of the prox kernel's potentials: several versions of the kernel side by side, in one process.

One evaluation of the softmax potential with gradient and Hessian (``evaluate_batch``, order 2) for 3e4 samples at
T = 3 of the fine-tuning (psi, eq. 63) and the pre-training (Psi, eq. 42) channel, on rows drawn as in
tests/theory/test_stack_potentials.py (moderate and saturating arguments, ties).  Each version is the file
``hdlora/theory/_newton_numba.py`` of a ``src`` directory (this checkout's, and ``--base-src`` ones, e.g. git
worktrees of older commits), loaded as a module of its own; the versions alternate ``--repeat`` times and the minimum
and median nanoseconds per sample are reported, with the ratio base / new.  Every output array of each base is
compared bit for bit with the new one's.  Compilation (or the load of the on-disk cache) comes before the timing.

Usage: python benchmarks/bench_kernel.py [--base-src NAME=DIR ...] [--repeat 40] [--n 30000] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]


def _fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit status 2."""
    print(f"{Path(sys.argv[0]).stem}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load(name: str, src: Path):
    path = src / "hdlora" / "theory" / "_newton_numba.py"
    if not path.is_file():
        _fail(f"--base-src {name}={src}: no {path.relative_to(src)} there; give a src directory")
    spec = importlib.util.spec_from_file_location(f"kernel_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-src", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--n", type=int, default=30000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.repeat < 1 or a.n < 10:
        _fail(f"--repeat must be >= 1 and --n >= 10, got {a.repeat} and {a.n}")
    os.environ["NUMBA_NUM_THREADS"] = str(a.threads)
    bases = {}
    for item in a.base_src:
        name, sep, d = item.partition("=")
        if not sep or not name.isidentifier():
            _fail(f"--base-src takes NAME=DIR with NAME an identifier, got {item!r}")
        bases[name] = Path(d)
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "theory"))
    from test_stack_potentials import _rows

    from hdlora.theory import newton

    codes = {"new": _load("new", ROOT / "src"), **{k: _load(k, v) for k, v in bases.items()}}
    out: dict = {
        "benchmark": "prox kernel: evaluate_batch, order 2, softmax T = 3 (ns a sample)",
        "n": a.n,
        "repeat": a.repeat,
        "threads": a.threads,
        "codes": {"new": str(ROOT / "src"), **{k: str(v) for k, v in bases.items()}},
        "load_avg_start": os.getloadavg()[0],
        "channels": {},
    }
    rng = np.random.default_rng(0)
    for label, kind in (("finetune", newton.FINETUNE), ("pretrain", newton.PRETRAIN)):
        x, rows = _rows(kind, 3, a.n, rng)
        k = x.shape[1]
        consts = np.array([3.0, 1.0])
        res: dict = {}
        outs = {}
        for name, K in codes.items():
            g, H, aux = np.empty((a.n, k)), np.empty((a.n, k, k)), np.empty((a.n, 1))
            t = time.perf_counter()
            loss = K.evaluate_batch(kind, x, rows, consts, 2, g, H, aux)
            res[name] = {"first_call_s": time.perf_counter() - t, "ns": []}
            outs[name] = (loss, g, H, aux)
        g, H, aux = np.empty((a.n, k)), np.empty((a.n, k, k)), np.empty((a.n, 1))
        for _ in range(a.repeat):
            for name, K in codes.items():
                t = time.perf_counter()
                K.evaluate_batch(kind, x, rows, consts, 2, g, H, aux)
                res[name]["ns"].append((time.perf_counter() - t) * 1e9 / a.n)
        for name, r in res.items():
            ns = r.pop("ns")
            r.update(ns_min=min(ns), ns_median=statistics.median(ns))
            if name != "new":
                r["ratio_min"] = r["ns_min"] / res["new"]["ns_min"]
                r["bit_identical"] = all(u.tobytes() == v.tobytes() for u, v in zip(outs[name], outs["new"]))
        out["channels"][label] = res
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
