"""Benchmark: the rank-r fine-tuning stage against the rank-one fine-tuning stage, same run, same fields.

Fig. 1 setting (alpha = 0.1, alpha' = 3, T = 3, kappa0 = kappa = 1, Delta = 0.5, lam = 0.1, lam' = 0.5, e = 0),
softmax, n_mc = 3e4 (the default).  The pre-training stage is solved once (it is the same code at every rank) and
its frozen fields (``hdlora.theory.solve.finetune_fields``) are shared; then, alternating, ``--repeat`` times:

  * ``rank_one``: the rank-one fine-tuning stage, :func:`hdlora.theory.finetune.solve_finetune` (what
    ``solve`` runs at r = r* = 1), global search and verification included;
  * ``rank_r``: the rank-r fine-tuning stage at (r, r*) = (``--rank``, ``--teacher-rank``), every branch of
    :func:`hdlora.theory.solve_rank_r.solve_branches` (what ``solve`` runs there), errors included.

The compiled kernel is loaded before timing (``kernel_warmup_s``).  One BLAS / Numba thread.  Prints one JSON
object: the minimum wall time of each stage over the repeats, the ratio rank_r / rank_one (target <= 4), and the
iterations and per-branch wall times of the last repeat.

Usage: python benchmarks/bench_rank_r.py [--repeat 2] [--n-mc 30000] [--rank 2] [--teacher-rank 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--n-mc", type=int, default=30000)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--teacher-rank", type=int, default=2)
    ap.add_argument("--activation", default="softmax")
    a = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"

    from hdlora.params import Params
    from hdlora.theory import newton
    from hdlora.theory.finetune import solve_finetune
    from hdlora.theory.pretrain import solve_pretrain
    from hdlora.theory.solve import finetune_fields
    from hdlora.theory.solve_rank_r import solve_branches

    t0 = time.perf_counter()
    newton.warmup()
    warm_s = time.perf_counter() - t0
    seed, n = 0, a.n_mc
    base = Params(activation=a.activation)  # Fig. 1 defaults
    t0 = time.perf_counter()
    pre = solve_pretrain(base, n_mc=n, seed=seed, warn=False)
    pre_s = time.perf_counter() - t0
    z_star, z = finetune_fields(base, pre, n, seed)
    law = {"Q0": base.Q0, "Q": pre.Q, "M": pre.M}
    pr = base.replace(lora_rank=a.rank, teacher_rank=a.teacher_rank)
    times: dict[str, list[float]] = {"rank_one": [], "rank_r": []}
    last: dict = {}
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        one = solve_finetune(base, z_star, z, seed=seed + 2, warn=False, **law)
        times["rank_one"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res, errs, coarse = solve_branches(pr, z_star, z, seed=seed + 2, tol=1e-7, max_iter=500, **law)
        times["rank_r"].append(time.perf_counter() - t0)
        last = {
            "rank_one": {"iterations": one.iterations, "converged": one.converged, "q": one.q, "m": one.m},
            "rank_r_branches": {
                k: (
                    {"error": errs.get(k), "coarse": coarse.get(k)}
                    if b is None
                    else {
                        "wall_s": b.wall_time,
                        "iterations": b.iterations,
                        "converged": b.converged,
                        "objective": b.objective,
                        "replicon": b.replicon_finetune,
                        "rank_m": b.rank_m,
                        "tr_q": b.tr_q,
                        "m_fro": b.m_fro,
                        "coarse": coarse.get(k),
                    }
                )
                for k, b in res.items()
            },
        }
    best = {k: min(v) for k, v in times.items()}
    out = {
        "benchmark": "rank-r fine-tuning stage vs rank-one fine-tuning stage (Fig. 1 setting)",
        "activation": a.activation,
        "n_mc": n,
        "rank": a.rank,
        "teacher_rank": a.teacher_rank,
        "repeat": a.repeat,
        "threads": 1,
        "kernel_warmup_s": warm_s,
        "pretrain_s": pre_s,
        "times_s": times,
        "min_s": best,
        "ratio_rank_r_over_rank_one": best["rank_r"] / best["rank_one"],
        "target_ratio": 4.0,
        **last,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
