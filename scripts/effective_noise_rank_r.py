"""The effective-noise picture at rank r (issue 11): does E' depend on the pre-training only through Delta_eff?

For sigma(x) = x/T the fine-tuning state evolution sees the frozen fields only through
Delta_eff = A0 - 2 M + Q (eq. 25), at any rank: E' is the same for every (Q0, Q, M) with the
same Delta_eff (exact; here up to Monte-Carlo error).  For softmax it is an approximation.  This
script measures the spread of E' (and of the overlap) over several effective pre-trainings
(Q0, Q, M) with one Delta_eff, at rank one (r = r* = 1) and rank two (r = r* = 2), both
activations, on the same Monte-Carlo seed.

Usage: python scripts/effective_noise_rank_r.py [--n-mc 10000] [--delta-eff 1.0] [--out F]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

from hdlora import Params
from hdlora.params import A0 as A0_of
from hdlora.theory.finetune import solve_finetune_effective
from hdlora.theory.sampling import frozen_fields
from hdlora.theory.solve_rank_r import pick_winner, solve_branches

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(alpha_ft=3.0, tokens=3, noise=0.5, lam_ft=0.5)
#: (Q0, M): Q follows from Delta_eff = Q0 + Delta/2 - 2 M + Q
LAWS = ((1.0, 0.3), (1.0, 0.6), (2.0, 1.0), (2.0, 1.5), (3.0, 1.5), (3.0, 2.0))


def solve_point(act: str, r: int, Q0: float, Q: float, M: float, n_mc: int, seed: int) -> dict:
    p = Params(**BASE, activation=act, lora_rank=r, teacher_rank=r)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if r == 1:
            res = solve_finetune_effective(p, Q0, Q, M, n_mc=n_mc, seed=seed)
            out = {"E_ft": res.finetune_test_error, "overlap": res.overlap, "converged": res.converged}
            out["replicon"] = res.replicon_finetune
        else:
            f = frozen_fields(n_mc, p.tokens, A0_of(Q0, p.noise), Q, M, seed=seed)
            results, _, _ = solve_branches(
                p, f["z_star"], f["z"], Q0=Q0, Q=Q, M=M, seed=seed + 2, tol=1e-7, max_iter=400
            )
            name, status = pick_winner(results)
            d = results[name].to_dict()
            out = {"E_ft": d["finetune_test_error"], "overlap": d["overlap"], "converged": d["converged"]}
            out["replicon"] = d.get("replicon_finetune", math.nan)
            out["winner"], out["status"] = name, status
    out["wall_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-mc", type=int, default=10000)
    ap.add_argument("--delta-eff", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "validation" / "effective_noise_rank_r.json"))
    a = ap.parse_args(argv)
    doc = {"what": __doc__.splitlines()[0], "n_mc": a.n_mc, "seed": a.seed, "delta_eff": a.delta_eff, "base": BASE}
    doc["laws"] = []
    for Q0, M in LAWS:
        Q = a.delta_eff - A0_of(Q0, BASE["noise"]) + 2 * M
        if Q <= 0 or Q < M * M / A0_of(Q0, BASE["noise"]):
            continue
        doc["laws"].append({"Q0": Q0, "Q": Q, "M": M})
    doc["results"] = {}
    for act in ("linear", "softmax"):
        for r in (1, 2):
            rows = []
            for law in doc["laws"]:
                row = {**law, **solve_point(act, r, law["Q0"], law["Q"], law["M"], a.n_mc, a.seed)}
                rows.append(row)
                print(act, r, json.dumps(row), flush=True)
            e = np.array([x["E_ft"] for x in rows])
            o = np.array([x["overlap"] for x in rows])
            doc["results"][f"{act}_r{r}"] = {
                "rows": rows,
                "E_ft_spread": float(e.max() - e.min()),
                "E_ft_rel_spread": float((e.max() - e.min()) / e.mean()),
                "overlap_spread": float(o.max() - o.min()),
            }
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
