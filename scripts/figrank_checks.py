"""Checks of the figure "rank" agreement at r = 1 (docs/VALIDATION.md section 11).

theory: the r = 1 points of the figure at Monte-Carlo seeds 1-6 (the figure's is seed 0), n_mc = 4000,
max_iter = 250 as its paper mode; prints the mean and sd of E' and o_w per alpha'.
dtrend: the same points simulated at other D (4 seeds, orthonormal teacher columns), one JSON line each.

Usage: python scripts/figrank_checks.py theory
       python scripts/figrank_checks.py dtrend --alpha-ft 4 --dims 100,300
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from hdlora import Params
from hdlora.experiments.figures import RANK_FIG, RANK_LAM_SMALL

#: the figure's panel (a) setting at r = 1
BASE = dict(RANK_FIG, lam_ft=RANK_LAM_SMALL, lora_rank=1)


def theory(alphas: list[float], seeds: range) -> None:
    from hdlora.theory import solve

    for a in alphas:
        E, o = [], []
        for seed in seeds:
            r = solve(Params(**BASE, alpha_ft=a), n_mc=4000, seed=seed, max_iter=250, warn=False)
            if r.converged:
                E.append(r.finetune_test_error)
                o.append(r.overlap)
        print(
            json.dumps(
                {
                    "alpha_ft": a,
                    "converged": len(E),
                    "E_mean": float(np.mean(E)),
                    "E_sd": float(np.std(E, ddof=1)),
                    "o_mean": float(np.mean(o)),
                    "o_sd": float(np.std(o, ddof=1)),
                }
            ),
            flush=True,
        )


def dtrend(a: float, dims: list[int]) -> None:
    from hdlora.simulate import run

    for D in dims:
        t0 = time.perf_counter()
        s = run(Params(**BASE, alpha_ft=a), D, 4, teacher="orthonormal")
        out = {"alpha_ft": a, "D": D, "wall_s": time.perf_counter() - t0}
        for k, name in (("E", "finetune_test_error"), ("o", "overlap")):
            out[k], out[k + "_se"] = s.mean[name], s.se[name]
        print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("theory", "dtrend"))
    ap.add_argument("--alpha-ft", type=float, default=4.0)
    ap.add_argument("--dims", default="100,300")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    if a.what == "theory":
        theory([1.0, 2.0, 4.0, 8.0], range(1, 7))
    else:
        dtrend(a.alpha_ft, [int(d) for d in a.dims.split(",")])


if __name__ == "__main__":
    main()
