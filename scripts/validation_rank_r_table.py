"""The rank-r validation table (issue 11): theory vs simulation, one markdown table.

Reads the theory side (``scripts/validate_rank_r_theory.py`` -> docs/validation/rank_r_theory.json)
and a simulation side (``scripts/validate_rank_r_sim.py`` -> docs/validation/rank_r_sim*.json) and
prints, per point (r, r*, activation, e) and quantity, theory, simulation mean +- s.e. over seeds
and z = (simulation - theory) / sqrt(se_sim^2 + se_theory^2) (the theory's Monte-Carlo s.e. where
it reports one); |z| > 2 in bold.

Usage: python scripts/validation_rank_r_table.py [--theory F] [--sim F] > table.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (label, simulation key, theory key)
QUANTITIES = (
    ("E'", "E_ft", "finetune_test_error"),
    ("L'", "L_ft", "finetune_train_error"),
    ("E''", "E_forget", "forgetting_error"),
    ("tr q", "q", "q"),
    ("‖m‖_F", "m", "m"),
    ("overlap", "overlap", "overlap"),
    ("Q", "Q", "Q"),
    ("M", "M", "M"),
)


def _key(params: dict) -> tuple:
    return (params["lora_rank"], params["teacher_rank"], params["activation"], bool(params.get("reuse")))


def rows(theory: dict, sim: dict) -> list[str]:
    th = {_key(p["params"]): p for p in theory["points"].values()}
    out = [
        "| (r, r*) | σ, e | quantity | theory | simulation ± s.e. | z |",
        "|---|---|---|---|---|---|",
    ]
    for sp in sim["points"].values():
        k = _key(sp["params"])
        tp = th.get(k)
        if tp is None:
            continue
        strengths = sp["params"].get("teacher_strengths")
        first = f"({k[0]}, {k[1]})" + (f" s = {', '.join(f'{x:g}' for x in strengths)}" if strengths else "")
        mode = f"{k[2]}, e = {int(k[3])}"
        for i, (label, sk, tk) in enumerate(QUANTITIES):
            t, m, se = tp.get(tk), sp["mean"].get(sk), sp["se"].get(sk)
            if t is None or m is None:
                continue
            t_se = (tp.get("mc_se") or {}).get(tk, 0.0) or 0.0
            den = math.sqrt((se or 0.0) ** 2 + t_se**2)
            z = (m - t) / den if den > 0 else math.nan
            zs = f"**{z:+.1f}**" if abs(z) > 2 else f"{z:+.1f}"
            out.append(
                f"| {first if i == 0 else ''} | {mode if i == 0 else ''} | {label} | {t:.4f} | {m:.4f} ± {se:.4f} | {zs} |"
            )
        status = tp.get("winner_status", "")
        rep = tp.get("replicon_finetune")
        out.append(
            f"| | | *theory* | winner {tp.get('winner')} ({status}), rank(m) = {tp.get('rank_m')}, "
            f"replicon {rep:.2f} | *{sp.get('wall_time', math.nan):.0f} s simulation* | |"
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--theory", default=str(ROOT / "docs" / "validation" / "rank_r_theory.json"))
    ap.add_argument("--sim", default=str(ROOT / "docs" / "validation" / "rank_r_sim_attention.json"))
    a = ap.parse_args(argv)
    theory = json.loads(Path(a.theory).read_text())
    sim = json.loads(Path(a.sim).read_text())
    print(
        f"D = {sim['D']}, seeds {sim['seeds']}, teacher {sim['teacher']}, {sim['pipeline']}; theory n_mc = {theory.get('n_mc')}"
    )
    print()
    print("\n".join(rows(theory, sim)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
