"""Benchmark of the sweep machinery; prints JSON.

* ``theory_sweep``: wall time of a 20-point theory sweep at the Fig. 1 setting (4 values of
  lambda' x 5 values of lambda, i.e. four continuation chains of 5 warm-started points; the
  chains are what a pool can run in parallel), run in a single process (``--workers 1``,
  threads left to numpy/torch) and on the local process pool (all cores, one thread per
  worker, worker start-up included), each into a fresh database.  The load average before
  and after is reported: on a shared machine it decides the outcome.
  The linear activation by default (closed-form expectations, so the benchmark measures the
  sweep and not Monte-Carlo cost); ``--activation softmax`` for the softmax one.
* ``figure1_quick_s``: wall time of ``hdlora figure 1 --quick`` from scratch (fresh output
  directory), local pool on all cores; ``--skip-figure`` leaves it out.

Usage: python benchmarks/bench_sweep.py [--activation linear|softmax] [--n-mc N] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def theory_sweep_doc(db: Path, activation: str, n_mc: int | None) -> dict:
    opts = {} if n_mc is None else {"n_mc": n_mc}
    return {
        "sweep": {"name": f"bench-theory-{activation}", "database": str(db), "continuation": "lam"},
        "params": {
            "alpha": 0.1,
            "alpha_ft": 3.0,
            "tokens": 3,
            "kappa0": 1.0,
            "kappa": 1.0,
            "noise": 0.5,
            "activation": activation,
        },
        "axes": {"lam_ft": [0.05, 0.2, 1.0, 5.0], "lam": {"start": 0.001, "stop": 10.0, "num": 5, "log": True}},
        "run": {"theory": opts},
    }


def run_theory_sweep(activation: str, n_mc: int | None, workers: int) -> dict:
    from hdlora.experiments.sweep import parse_sweep, plan, run_sweep, sweep_frame

    out: dict = {"activation": activation, "points": None, "chains": None, "n_mc": n_mc}
    frames = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, w in (("single_process", 1), ("local_pool", workers)):
            spec = parse_sweep(theory_sweep_doc(Path(tmp) / f"{label}.sqlite", activation, n_mc))
            p = plan(spec)
            out["points"], out["chains"] = len(p.tasks), len(p.chains)
            t0 = time.perf_counter()
            rep = run_sweep(spec, workers=w, progress=False)
            out[f"{label}_s"] = round(time.perf_counter() - t0, 3)
            out[f"{label}_failed"] = rep.n_failed
            out[f"{label}_executor"] = rep.executor
            out[f"{label}_task_s"] = round(float(sweep_frame(spec)["wall_s"].sum()), 3)
            frames[label] = sweep_frame(spec)
    a, b = (f.sort_values(["lam_ft", "lam"]).reset_index(drop=True) for f in frames.values())
    out["speedup"] = round(out["single_process_s"] / out["local_pool_s"], 3)
    if "finetune_test_error" in a and "finetune_test_error" in b:
        diff = (a["finetune_test_error"] - b["finetune_test_error"]).abs().max()
        out["max_abs_diff_finetune_test_error"] = None if math.isnan(diff) else float(diff)
    if "converged" in a:
        out["all_converged"] = bool(a["converged"].fillna(False).astype(bool).all())
    if "iterations" in a:
        out["total_iterations"] = int(a["iterations"].sum())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activation", default="linear", choices=("linear", "softmax"))
    ap.add_argument("--n-mc", type=int, default=None, help="theory Monte-Carlo samples (default: the solver's)")
    ap.add_argument("--workers", type=int, default=None, help="pool size (default: all cores)")
    ap.add_argument("--skip-figure", action="store_true", help="do not time hdlora figure 1 --quick")
    args = ap.parse_args(argv)

    result: dict = {
        "benchmark": "sweep",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    try:
        from hdlora import theory

        available = hasattr(theory, "solve")
    except ImportError:
        available = False
    if available:
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        result["theory_sweep"] = run_theory_sweep(args.activation, args.n_mc, args.workers)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    else:
        result["theory_sweep"] = None
        result["theory_sweep_reason"] = "hdlora.theory.solve not implemented yet"
    if args.skip_figure:
        result["figure1_quick_s"] = None
        result["figure1_quick_reason"] = "skipped (--skip-figure)"
    else:
        import subprocess
        import tempfile
        import time

        with tempfile.TemporaryDirectory() as tmp:
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "hdlora.cli", "figure", "1", "--quick", "--out", tmp],
                capture_output=True,
                text=True,
            )
            result["figure1_quick_s"] = time.perf_counter() - t0
            result["figure1_quick_exit_status"] = proc.returncode
            result["figure1_quick_load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            result["figure1_quick_summary"] = [ln for ln in proc.stdout.splitlines() if ln.startswith("figure")]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
