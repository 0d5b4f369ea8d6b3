"""Benchmark of the state evolution: wall time of one full theoretical point.

Prints one JSON object.  A "point" is ``hdlora.theory.solve``: the pre-training
state evolution (Result 4), the fine-tuning state evolution (Result 5) and the
errors of Result 3, from a cold start, with the default 3e4 Monte-Carlo samples.

Cases (Fig. 1 setting: alpha = 0.1, alpha' = 3, T = 3, kappa0 = kappa = 1,
Delta = 0.5, lam = 0.1, lam' = 0.5, e = 0):
  * softmax, cold start;
  * softmax, warm start from the neighbouring point lam = 0.12 (as in a sweep);
  * linear (pre-training in closed form; fine-tuning by Monte Carlo with the exact global prox
    of hdlora.theory.prox_rank_one_linear);
  * softmax at the Fig. 3 setting (T = 2, kappa0 = 0.5, alpha = 0.2, e = 1, lam = 0.3).
Each case is timed ``--repeat`` times in this process (one BLAS/torch thread by
default) and the minimum and median are reported, with the iteration counts.

Usage: python benchmarks/bench_theory.py [--repeat 3] [--threads 1] [--n-mc 30000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-mc", type=int, default=30000)
    a = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    from hdlora import Params
    from hdlora.theory import solve

    fig1 = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
    fig3 = Params(alpha=0.2, alpha_ft=3, tokens=2, kappa0=0.5, kappa=1, noise=0.5, lam=0.3, lam_ft=0.5, reuse=True)
    neighbour = solve(fig1.replace(lam=0.12), n_mc=a.n_mc, warn=False)
    cases = {
        "softmax_fig1_cold": (fig1, None),
        "softmax_fig1_warm": (fig1, neighbour),
        "linear_fig1_cold": (fig1.replace(activation="linear"), None),
        "softmax_fig3_reuse_cold": (fig3, None),
    }
    out = {"benchmark": "theory point (pre-training + fine-tuning SE)", "n_mc": a.n_mc, "threads": a.threads,
           "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "load_avg_start": os.getloadavg()[0], "cases": {}}
    for name, (p, init) in cases.items():
        times, last = [], None
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            last = solve(p, n_mc=a.n_mc, init=init, warn=False)
            times.append(time.perf_counter() - t0)
        out["cases"][name] = {
            "wall_s_min": min(times), "wall_s_median": statistics.median(times),
            "pretrain_iterations": last.pretrain_iterations, "finetune_iterations": last.finetune_iterations,
            "converged": last.converged, "finetune_test_error": last.finetune_test_error,
        }
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
