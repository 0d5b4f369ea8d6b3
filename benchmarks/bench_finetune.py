"""Wall and CPU time of one fine-tuning state evolution (Result 5) on an effective pre-training.

Prints one JSON object.  Usage: python benchmarks/bench_finetune.py [--n-mc 30000] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from hdlora import Params
from hdlora.theory.finetune import solve_finetune_effective


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-mc", type=int, default=30_000)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    out = {
        "n_mc": args.n_mc,
        "point": {"tokens": 3, "noise": 0.5, "alpha_ft": 3.0, "lam_ft": 0.5, "Q0": 2.0, "Q": 2.0, "M": 1.0},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "runs": [],
    }
    for act in ("softmax", "linear"):
        p = Params(tokens=3, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation=act)
        for seed in range(args.seeds):
            t_cpu, t_wall = time.process_time(), time.perf_counter()
            r = solve_finetune_effective(p, 2.0, 2.0, 1.0, n_mc=args.n_mc, seed=seed)
            out["runs"].append(
                {
                    "activation": act,
                    "seed": seed,
                    "cpu_s": time.process_time() - t_cpu,
                    "wall_s": time.perf_counter() - t_wall,
                    "iterations": r.iterations,
                    "converged": r.converged,
                    "q": r.q,
                    "m": r.m,
                    "overlap": r.overlap,
                    "finetune_test_error": r.finetune_test_error,
                }
            )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
