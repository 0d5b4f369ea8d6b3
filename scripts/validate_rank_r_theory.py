"""Theory side of the rank-r validation table (issue 11): writes docs/validation/rank_r_theory.json.

Fig. 1 setting (alpha = 0.1, alpha' = 3, T = 3, kappa0 = kappa = 1, Delta = 0.5, lam = 0.1, lam' = 0.5), e = 0, at
(r, r*) in (2, 1), (1, 2) [teacher strengths 1, 0.5], (2, 2), (3, 3), softmax and linear sigma, plus (2, 2) softmax
e = 1 (reuse); n_mc = 3e4, seed 0, tol 1e-7.  Per point: E', L', E'', tr q, ||m||_F, the overlap, eig q, sv m,
the principal-angle cosines, the replicon, the status (converged, winner_status, prox diagnostics) and every branch.
The simulation side (D = 200) is produced separately (the simulator's rank-r mode).

Usage: python scripts/validate_rank_r_theory.py [--n-mc 30000] [--out docs/validation/rank_r_theory.json]
       [--points 2-1-softmax,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FIG1 = dict(alpha=0.1, alpha_ft=3.0, tokens=3, kappa0=1.0, kappa=1.0, noise=0.5, lam=0.1, lam_ft=0.5)
RANKS = {(2, 1): None, (1, 2): (1.0, 0.5), (2, 2): None, (3, 3): None}


def points() -> dict[str, dict]:
    out = {}
    for act in ("softmax", "linear"):
        for (r, rs), s in RANKS.items():
            out[f"{r}-{rs}-{act}-e0"] = dict(
                FIG1, activation=act, lora_rank=r, teacher_rank=rs, teacher_strengths=s, reuse=False
            )
    out["2-2-softmax-e1"] = dict(FIG1, activation="softmax", lora_rank=2, teacher_rank=2, reuse=True)
    return out


KEYS = (
    "finetune_test_error",
    "finetune_train_error",
    "forgetting_error",
    "q",
    "m",
    "overlap",
    "q_eigenvalues",
    "m_singular_values",
    "principal_cosines",
    "rank_m",
    "objective",
    "replicon_finetune",
    "replicon_pretrain",
    "converged",
    "finetune_converged",
    "finetune_residual",
    "finetune_iterations",
    "winner",
    "winner_status",
    "prox_failed",
    "prox_not_max",
    "prox_uncertified",
    "Q",
    "M",
    "delta_eff",
    "delta_eff_finetune",
    "q_matrix",
    "m_matrix",
    "v_matrix",
    "q0_matrix",
    "mc_se",
    "branches",
    "wall_time",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-mc", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "validation" / "rank_r_theory.json"))
    ap.add_argument("--points", default=None, help="comma-separated point names (default: all)")
    a = ap.parse_args(argv)
    from hdlora.cli import _jsonable
    from hdlora.params import Params
    from hdlora.theory import solve

    pts = points()
    if a.points:
        pts = {k: pts[k] for k in a.points.split(",")}
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    doc: dict = {
        "description": __doc__.splitlines()[0],
        "n_mc": a.n_mc,
        "seed": a.seed,
        "tol": 1e-7,
        "points": {},
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
    if out_path.exists() and a.points:  # add to / replace points of an earlier run
        doc["points"] = json.loads(out_path.read_text()).get("points", {})
    t_all = time.perf_counter()
    for name, kw in pts.items():
        t0 = time.perf_counter()
        res = solve(Params(**kw), n_mc=a.n_mc, seed=a.seed, warn=False).to_dict()
        rec = {"params": {k: v for k, v in kw.items()}, **{k: res.get(k) for k in KEYS}}
        doc["points"][name] = rec
        print(
            f"{name}: E'={rec['finetune_test_error']:.4f} L'={rec['finetune_train_error']:.4f} "
            f"E''={rec['forgetting_error']:.4f} q={rec['q']:.4f} m={rec['m']:.4f} overlap={rec['overlap']:.4f} "
            f"replicon={rec['replicon_finetune']:.3f} winner={rec['winner']} ({rec['winner_status']}) "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        out_path.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")  # after every point
    doc["wall_time_s"] = time.perf_counter() - t_all
    doc["cpu_count"] = os.cpu_count()
    out_path.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
