"""Benchmark of the prox kernel's Newton loop: the Newton calls of one Fig. 1 point, replayed by several versions of
the kernel side by side, in one process.

The calls (``newton_prox``: pre-training prox, fine-tuning prox, and the fine-tuning global searches' starts, which
merge into a reference) are captured from one solve of the Fig. 1 softmax point (alpha = 0.1, alpha' = 3, T = 3,
kappa0 = kappa = 1, Delta = 0.5, lam = 0.1, lam' = 0.5, n_mc = 3e4) with this checkout's code.  Each version is the
file ``hdlora/theory/_newton_numba.py`` of a ``src`` directory (this checkout's, and ``--base-src`` ones, e.g. git
worktrees of older commits), loaded as in benchmarks/bench_kernel.py.  The versions alternate ``--repeat`` times over
all calls; per call the minimum time is kept, and the sums of these minima are reported per group with the ratio
base / new.  Every output of every call of each base is compared bit for bit with the new one's (the unused aux
column of the pre-training calls excepted).  Compilation (or the load of the on-disk cache) comes before the timing.

Usage: python benchmarks/bench_newton.py [--base-src NAME=DIR ...] [--repeat 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the capture solves with this checkout's code, whatever hdlora is installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernel import _fail, _load  # noqa: E402


def _capture() -> list[tuple]:
    """The arguments of every newton_prox call of one Fig. 1 solve (inputs copied, outputs as (shape, dtype))."""
    import numpy as np

    from hdlora import Params
    from hdlora.theory import newton, solve

    K = newton.kernel()
    calls: list[tuple] = []

    class Recorder:
        def __getattr__(self, name: str):
            return getattr(K, name)

        def newton_prox(self, *args):
            ins = tuple(u.copy() if isinstance(u, np.ndarray) else u for u in args[:9])
            calls.append((ins, tuple((u.shape, u.dtype) for u in args[9:])))
            return K.newton_prox(*args)

    newton._KERNEL = Recorder()
    try:
        solve(Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5))
    finally:
        newton._KERNEL = K
    return calls


def _group(ins: tuple) -> str:
    kind, opts = int(ins[0]), ins[6]
    search = opts.shape[0] > 12 and opts[12] > 0.0
    return {0: "pretrain", 1: "finetune"}.get(kind, f"kind{kind}") + ("_search" if search else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-src", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.repeat < 1 or a.threads < 1:
        _fail(f"--repeat and --threads must be >= 1, got {a.repeat} and {a.threads}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    bases = {}
    for item in a.base_src:
        name, sep, d = item.partition("=")
        if not sep or not name.isidentifier() or name == "new" or name in bases:
            _fail(f"--base-src takes NAME=DIR with NAME an identifier other than 'new', each once, got {item!r}")
        bases[name] = Path(d)
    import numpy as np

    codes = {"new": _load("new", ROOT / "src"), **{k: _load(k, v) for k, v in bases.items()}}
    calls = _capture()
    groups = [_group(ins) for ins, _ in calls]
    best = {name: [float("inf")] * len(calls) for name in codes}
    first: dict = {}
    for r in range(a.repeat):
        for name, K in codes.items():
            for i, (ins, shapes) in enumerate(calls):
                outs = [np.empty(sh, dt) for sh, dt in shapes]
                t = time.perf_counter()
                K.newton_prox(*ins, *outs)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
                if r == 0:
                    used = outs if ins[7] > 0 else outs[:5] + outs[6:]  # aux (index 5) unused when n_aux = 0
                    first.setdefault(name, []).append(used)
    out: dict = {
        "benchmark": "prox kernel: the newton_prox calls of one Fig. 1 softmax point, replayed (ms, sums of per-call minima)",
        "calls": len(calls),
        "samples": int(sum(ins[1].shape[0] for ins, _ in calls)),
        "repeat": a.repeat,
        "threads": a.threads,
        "codes": {"new": str(ROOT / "src"), **{k: str(v) for k, v in bases.items()}},
        "load_avg_start": os.getloadavg()[0],
        "ms": {},
    }
    for name in codes:
        ms = {"total": 1e3 * sum(best[name])}
        for g in sorted(set(groups)):
            ms[g] = 1e3 * sum(b for b, gg in zip(best[name], groups) if gg == g)
        if name != "new":
            ms["ratio_total"] = ms["total"] / out["ms"]["new"]["total"]
            ms["bit_identical"] = all(
                u.tobytes() == v.tobytes() for c, d in zip(first[name], first["new"]) for u, v in zip(c, d)
            )
        out["ms"][name] = ms
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
