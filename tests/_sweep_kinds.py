"""Test-only task functions for the sweep tests, named in sweep files as "_sweep_kinds:<name>".

They are cheap and deterministic, so the sweep machinery (chains, warm starts, failures,
resumption, executors) can be checked exactly; the tests also run the real "simulate" kind.
"""

from __future__ import annotations

import os
import time


def arith(params, options, init):
    """A deterministic function of the parameters (and an optional sleep)."""
    time.sleep(float(options.get("sleep", 0.0)))
    return {
        "value": params.alpha_ft * 10.0 + params.noise,
        "square": params.alpha_ft**2,
        "converged": True,
        "pid": os.getpid(),
    }


def fake_theory(params, options, init):
    """Stands in for the state evolution: records the warm start it was given."""
    time.sleep(float(options.get("sleep", 0.0)))
    bad = options.get("nonconverged_at")
    return {
        "value": params.alpha_ft + (0.0 if params.lam_ft == float("inf") else params.lam_ft),
        "init_alpha_ft": None if init is None else init["alpha_ft"],
        "alpha_ft": params.alpha_ft,
        "lam_ft": params.lam_ft,
        "converged": not (bad is not None and params.alpha_ft == bad),
    }


fake_theory.warm_start = True


def flaky(params, options, init):
    """Fails at one grid value of alpha_ft, unless the marker file exists."""
    if params.alpha_ft == options["fail_at"] and not os.path.exists(options["fixed_marker"]):
        raise RuntimeError(f"deliberate failure at alpha_ft={params.alpha_ft}")
    return {"value": params.alpha_ft}


def threads(params, options, init):
    """What a worker sees: BLAS environment and torch threads."""
    import torch

    return {
        "omp": int(os.environ.get("OMP_NUM_THREADS", "-1")),
        "torch_threads": torch.get_num_threads(),
        "value": params.alpha_ft,
    }


def strict_library(params, *, n_mc: int = 100, tol: float = 1e-8):
    """A library call with a fixed set of keyword options (for the option-name check)."""
    return {"n_mc": n_mc, "tol": tol}


def stored_before(params, options, init):
    """How many rows the sweep's database held when this task started (serial execution)."""
    import glob
    import sqlite3

    db = glob.glob(os.path.join(os.environ["SWEEP_TEST_DIR"], "*.sqlite"))[0]
    con = sqlite3.connect(db)
    try:
        n = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    finally:
        con.close()
    return {"rows_seen": n}


def counted(params, options, init):
    """Sleeps, then records its completion (one line per computation) in options["log_dir"]."""
    time.sleep(float(options.get("sleep", 0.0)))
    with open(os.path.join(options["log_dir"], f"done-{os.getpid()}.txt"), "a") as fh:
        fh.write(f"{params.alpha_ft!r}\n")
    return {"value": params.alpha_ft, "pid": os.getpid()}


def failing(params, options, init):
    """Fails at every point, with one of two errors (odd / even alpha_ft)."""
    raise ValueError(f"deliberate failure {'odd' if int(params.alpha_ft) % 2 else 'even'}")
