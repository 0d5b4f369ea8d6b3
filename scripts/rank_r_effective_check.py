"""Rank-r fine-tuning on an effective pre-training: theory vs simulation without the full data model.

The full data model has an O(D^-1/2) correlation between the fine-tuning teacher w* and the
pre-trained S* (docs/VALIDATION.md §1c.3) that a LoRA update can exploit on the pre-training task
(the forgetting error E'').  Here (z*, z) of the pre-training task are drawn from the law
(Q0, Q, M) independently of w* (``hdlora simulate --effective-Q0 ...``), with (Q0, Q, M) the
theory's pre-training fixed point at the Fig. 1 setting, and compared with the rank-r theory on the
same law (branches, winner).

Usage: python scripts/rank_r_effective_check.py [--dim 300] [--seeds 4] [--n-mc 30000] [--out F]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

from hdlora import Params
from hdlora.params import A0 as A0_of
from hdlora.simulate import run as simulate_run
from hdlora.theory.finetune import solve_finetune_effective
from hdlora.theory.pretrain import solve_pretrain
from hdlora.theory.sampling import frozen_fields
from hdlora.theory.solve_rank_r import pick_winner, solve_branches

ROOT = Path(__file__).resolve().parents[1]
FIG1 = dict(alpha=0.1, alpha_ft=3.0, tokens=3, kappa0=1.0, kappa=1.0, noise=0.5, lam=0.1, lam_ft=0.5)
POINTS = (("softmax", 1), ("softmax", 2), ("softmax", 3), ("linear", 1), ("linear", 2))
KEYS = ("finetune_test_error", "forgetting_error", "finetune_train_error", "overlap")


def theory(p: Params, Q0: float, Q: float, M: float, n_mc: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p.rank_one:
            return {k: getattr(solve_finetune_effective(p, Q0, Q, M, n_mc=n_mc, seed=0), k) for k in KEYS}
        f = frozen_fields(n_mc, p.tokens, A0_of(Q0, p.noise), Q, M, seed=0)
        res, _, _ = solve_branches(p, f["z_star"], f["z"], Q0=Q0, Q=Q, M=M, seed=2, tol=1e-7, max_iter=400)
        name, status = pick_winner(res)
        d = res[name].to_dict()
        return {**{k: d[k] for k in KEYS}, "winner": name, "status": status}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--n-mc", type=int, default=30000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "validation" / "rank_r_effective.json"))
    a = ap.parse_args(argv)
    doc = {"what": __doc__.splitlines()[0], "D": a.dim, "seeds": a.seeds, "n_mc": a.n_mc, "points": {}}
    for act, r in POINTS:
        base = Params(**FIG1, activation=act)
        pre = solve_pretrain(base)
        Q0, Q, M = base.Q0, pre.Q, pre.M
        p = base.replace(lora_rank=r, teacher_rank=r)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sim = simulate_run(
                p,
                a.dim,
                list(range(a.seeds)),
                effective={"Q0": Q0, "Q": Q, "M": M},
                teacher="orthonormal",
                loss="attention",
            )
        ts = time.perf_counter() - t0
        th = theory(p, Q0, Q, M, a.n_mc)
        row = {"law": [Q0, Q, M], "theory": th, "sim_wall_s": ts}
        for k in KEYS:
            m, s = sim.mean[k], sim.se[k]
            row[k] = {"sim": m, "se": s, "theory": th[k], "z": (m - th[k]) / s if s > 0 else math.nan}
        doc["points"][f"{act}_r{r}"] = row
        print(
            f"{act} r = r* = {r}:",
            {k: (round(row[k]["sim"], 4), round(row[k]["theory"], 4), round(row[k]["z"], 1)) for k in KEYS},
            flush=True,
        )
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
