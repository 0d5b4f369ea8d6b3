"""E'' of the rank-r validation points, re-evaluated at the simulation's own order parameters.

The forgetting error (eq. 84 at rank r) depends on the pre-training law (Q0, Q, M) and on q only
(through its eigenvalues: the rows of chi ~ N(0, q) enter through chi chi^T).  This evaluates the
theory's formula (linear: the closed form; softmax: Monte Carlo, 3e5 samples) at the simulation's
seed-mean Q0, Q, M and eigenvalues of q, to separate the formula from the finite-D shifts of the
order parameters it is evaluated at.

Usage: python scripts/rank_r_forgetting_check.py [--sim docs/validation/rank_r_sim_attention.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hdlora import Params
from hdlora.theory.finetune_rank_r import _test_errors

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", default=str(ROOT / "docs" / "validation" / "rank_r_sim_attention.json"))
    ap.add_argument("--theory", default=str(ROOT / "docs" / "validation" / "rank_r_theory.json"))
    ap.add_argument("--n", type=int, default=300_000)
    a = ap.parse_args(argv)
    sim = json.loads(Path(a.sim).read_text())
    th = {
        (p["params"]["lora_rank"], p["params"]["teacher_rank"], p["params"]["activation"], p["params"]["reuse"]): p
        for p in json.loads(Path(a.theory).read_text())["points"].values()
    }
    for name, sp in sim["points"].items():
        pd = dict(sp["params"])
        if pd.get("teacher_strengths") is not None:
            pd["teacher_strengths"] = tuple(pd["teacher_strengths"])
        p = Params.from_dict(pd)
        mean, se = sp["mean"], sp["se"]
        q = np.diag(mean["q_eigenvalues"])
        r, rs = p.lora_rank, p.teacher_rank
        q0 = np.diag(p.q0)
        m = np.zeros((r, rs))
        law = (mean["Q0"], mean["Q"], mean["M"])
        t_sim = _test_errors(p, q, m, q0, law, None, None, 0, a.n, a.n)
        tp = th[(p.lora_rank, p.teacher_rank, p.activation, p.reuse)]
        e_sim, s = mean["E_forget"], se["E_forget"]
        e_th = tp["forgetting_error"]
        e_at = t_sim["forgetting_error"]
        print(
            f"{name}: E'' simulation {e_sim:.4f} +- {s:.4f}; theory {e_th:.4f} (z {(e_sim - e_th) / s:+.1f}); "
            f"theory's formula at the simulation's Q0, Q, M, eig q: {e_at:.4f} (z {(e_sim - e_at) / s:+.1f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
