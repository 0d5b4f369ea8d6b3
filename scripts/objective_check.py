"""The theory's fine-tuning objective against the simulator's kept objective, from the stored figure CSVs.

Theory (per D, eq. 65 at the fixed point): alpha' L'_train + lam' q; the simulator minimises
(sum_mu loss_mu + lam' ||w||^2) / N' = L'_train + lam' q / alpha' (N' = alpha' D, ||w||^2 = q D) and records
the kept start's final objective (``finetune_objective``, seed mean and s.e.).  Rows of the same
figure are matched on the parameters.  Prints one JSON object (per figure: points, |z| <= 2 count, the
others with the theory's convergence flag) and writes docs/validation/objective_vs_simulation.csv.

Usage: python scripts/objective_check.py [--figures 2,3,5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["alpha", "alpha_ft", "tokens", "kappa0", "kappa", "noise", "lam", "lam_ft", "activation", "reuse", "beta"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", default="2,3,5")
    a = ap.parse_args()
    out, rows = {}, []
    for n in a.figures.split(","):
        d = pd.read_csv(ROOT / "docs" / "figures" / f"fig{n}.csv")
        keys = [k for k in KEYS if k in d]
        th = d[~d["kind"].str.contains("simulate") & d["finetune_train_error"].notna() & d["q"].notna()]
        th = th.drop_duplicates(subset=keys)
        sm = d[d["kind"].str.contains("simulate") & d["finetune_objective"].notna()]
        m = sm.merge(th, on=keys, suffixes=("_s", "_t")).copy()
        m = m.assign(
            theory=m["finetune_train_error_t"] + m["lam_ft"] * m["q_t"] / m["alpha_ft"],
            simulation=m["finetune_objective_s"],
            se=m["finetune_objective_se_s"],
        )
        m = m.assign(z=(m["simulation"] - m["theory"]) / m["se"], figure=int(n))
        cols = ["figure", *keys, "dim_s", "converged_t", "theory", "simulation", "se", "z"]
        rows.append(m[cols])
        bad = m[m["z"].abs() > 2]
        conv = m["converged_t"].astype(bool)
        out[f"fig{n}"] = {
            "points": int(len(m)),
            "within_2se": int((m["z"].abs() <= 2).sum()),
            "within_2se_converged_theory": f"{int(((m['z'].abs() <= 2) & conv).sum())} of {int(conv.sum())}",
            "beyond_2se": [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                for r in bad[
                    ["alpha_ft", "lam_ft", "noise", "kappa0", "converged_t", "theory", "simulation", "z"]
                ].to_dict("records")
            ],
        }
    pd.concat(rows).to_csv(ROOT / "docs" / "validation" / "objective_vs_simulation.csv", index=False)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
