"""Theory vs simulation table for docs/VALIDATION.md.

For each validation point: the state evolution (``hdlora.theory.solve``, 3e4
Monte-Carlo samples) and the finite-D simulation (``hdlora.simulate.run``, D and
seeds as given), then for each quantity the deviation in units of the
simulation's standard error, z = (sim - theory) / se.  Results are cached in a
JSON file (one entry per point, written as each finishes) so the script can be
interrupted and resumed; the markdown table is printed (and written with --md).

Usage: python scripts/validation_table.py [--dim 150] [--seeds 4] [--json docs/validation.json]
                                          [--md docs/validation_table.md] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from hdlora import Params  # noqa: E402
from hdlora.simulate import run  # noqa: E402
from hdlora.theory import solve  # noqa: E402

FIG1 = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5)
FIG3 = dict(alpha=0.2, alpha_ft=3, tokens=2, kappa0=0.5, kappa=1, noise=0.5, reuse=True)

#: name -> Params keyword arguments. Together they cover both activations, e = 0 and 1,
#: kappa0 < 1 and >= 1, kappa = 1 and > 1, T = 2 and 3, small and large lam and lam'.
POINTS = {
    "fig1 softmax (lam=0.1, lam'=0.5)": dict(FIG1, lam=0.1, lam_ft=0.5),
    "fig1 softmax Delta=2 (lam=1, lam'=0.05)": dict(FIG1, noise=2.0, lam=1.0, lam_ft=0.05),
    "fig1 softmax frozen (lam=0.1, lam'=inf)": dict(FIG1, lam=0.1, lam_ft=math.inf),
    "fig3 softmax e=1 (lam=0.3, lam'=0.1)": dict(FIG3, lam=0.3, lam_ft=0.1),
    "fig3 softmax e=1 (lam=0.01, lam'=1)": dict(FIG3, lam=0.01, lam_ft=1.0),
    "softmax T=2 e=0 kappa0=0.5 (lam=2, lam'=0.05)": dict(FIG3, reuse=False, lam=2.0, lam_ft=0.05),
    "softmax T=3 kappa0=2 kappa=1.5 Delta=1 (lam=0.01, lam'=1)": dict(
        alpha=0.15, alpha_ft=3, tokens=3, kappa0=2, kappa=1.5, noise=1.0, lam=0.01, lam_ft=1.0
    ),
    "linear fig1 (lam=0.1, lam'=0.5)": dict(FIG1, activation="linear", lam=0.1, lam_ft=0.5),
    "linear T=2 e=1 kappa0=0.5 kappa=2 (lam=1, lam'=2)": dict(FIG3, activation="linear", kappa=2, lam=1.0, lam_ft=2.0),
    "linear T=3 e=1 kappa0=0.5 (lam=0.03, lam'=0.2)": dict(
        FIG1, activation="linear", kappa0=0.5, reuse=True, alpha=0.15, lam=0.03, lam_ft=0.2
    ),
}
QUANTITIES = (
    "pretrain_train_error",
    "pretrain_test_error",
    "finetune_train_error",
    "finetune_test_error",
    "forgetting_error",
    "overlap",
    "Q",
    "M",
    "q",
    "m",
)
SHORT = {
    "pretrain_train_error": "L",
    "pretrain_test_error": "E",
    "finetune_train_error": "L'",
    "finetune_test_error": "E'",
    "forgetting_error": "E''",
    "overlap": "o_w",
    "Q": "Q",
    "M": "M",
    "q": "q",
    "m": "m",
}


def simulate_point(kw: dict, dim: int, seeds: int, loss: str = "sequence") -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = run(Params(**kw), dim, seeds, loss=loss).to_dict()
    s.pop("per_seed", None)
    return {"result": s, "wall_s": time.perf_counter() - t0, "warnings": [str(w.message) for w in caught]}


def theory_point(kw: dict, n_mc: int) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = solve(Params(**kw), n_mc=n_mc).to_dict()
    return {"result": t, "wall_s": time.perf_counter() - t0, "warnings": [str(w.message) for w in caught]}


def combine(name: str, kw: dict, sim: dict, th: dict, dim: int, seeds: int, n_mc: int) -> dict:
    s, t = sim["result"], th["result"]
    rows = {}
    for k in QUANTITIES:
        mean, se = s.get(k, math.nan), s.get(k + "_se", math.nan)
        mean = math.nan if mean is None else mean
        rows[k] = {
            "theory": t[k],
            "sim": mean,
            "se": se,
            "z": (mean - t[k]) / se if se and se > 0 and math.isfinite(mean) else None,
        }
    return {
        "name": name,
        "params": Params(**kw).to_dict(),
        "dim": dim,
        "seeds": seeds,
        "n_mc": n_mc,
        "rows": rows,
        "theory_converged": t["converged"],
        "theory_iterations": t["iterations"],
        "replicon": [t["replicon_pretrain"], t["replicon_finetune"]],
        "sim_converged": [s.get("pretrain_converged"), s.get("finetune_converged")],
        "theory_s": th["wall_s"],
        "sim_s": sim["wall_s"],
        "warnings": sim["warnings"] + th["warnings"],
    }


def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}"


def markdown(results: list[dict]) -> str:
    """One row per (point, quantity); z = (sim - theory) / se, bold when |z| > 2.

    Quantities that are exactly 0 in the theory (Q, M when the pre-training ridge
    kills W_hat; q, m, o_w for lam' = inf) and below 1e-8 in the simulation are shown
    as "0 (both)" instead of a meaningless z.
    """
    out = ["| point | D × seeds | quantity | theory | simulation ± s.e. | z |", "|---|---|---|---|---|---|"]
    for r in results:
        first = True
        for k in QUANTITIES:
            row = r["rows"][k]
            if row["sim"] is None or not math.isfinite(row["sim"]):
                continue
            head = f"{r['name']}" if first else ""
            ds = f"{r['dim']} × {r['seeds']}" if first else ""
            first = False
            if row["theory"] == 0 and abs(row["sim"]) < 1e-8:
                out.append(f"| {head} | {ds} | {SHORT[k]} | 0 | {row['sim']:.0e} | 0 (both) |")
                continue
            z = row["z"]
            flag = "**" if z is not None and abs(z) > 2 else ""
            out.append(
                f"| {head} | {ds} | {SHORT[k]} | {fmt(row['theory'])} | {fmt(row['sim'])} ± {fmt(row['se'])} "
                f"| {flag}{fmt(z, 1)}{flag} |"
            )
        rp, rf = r["replicon"]
        status = "converged" if r["theory_converged"] else "**NOT converged**"
        unstable = " **replicon violated (>= 1): outside the replica-symmetric theory**" if max(rp, rf) >= 1 else ""
        out.append(
            f"| | | *theory* | {status}, {r['theory_iterations']} it., replicon (eq. 75, 78) = "
            f"{rp:.2f}, {rf:.2f}{unstable} | *{r['theory_s']:.1f} s theory, {r['sim_s']:.0f} s simulation* | |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--n-mc", type=int, default=30000)
    ap.add_argument("--json", default="docs/validation.json")
    ap.add_argument("--md", default=None)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument(
        "--part",
        choices=("sim", "theory", "both"),
        default="both",
        help="compute only the simulations, only the theory, or both (cached separately)",
    )
    ap.add_argument(
        "--loss",
        choices=("sequence", "attention"),
        default="sequence",
        help="simulation loss: eqs. 2-3 (default) or the attention-matrix loss of eq. 30",
    )
    ap.add_argument("--redo-theory", action="store_true", help="recompute the theory even if cached")
    a = ap.parse_args()
    cache = json.load(open(a.json)) if os.path.exists(a.json) else {"sim": {}, "theory": {}}
    results = []
    for name, kw in POINTS.items():
        if a.only and name not in a.only:
            continue
        ks = f"{name} @ D={a.dim} seeds={a.seeds}" + ("" if a.loss == "sequence" else f" loss={a.loss}")
        kt = f"{name} @ n_mc={a.n_mc}"
        if a.part in ("sim", "both") and ks not in cache["sim"]:
            print(f"[validation] simulate {ks} ...", file=sys.stderr, flush=True)
            cache["sim"][ks] = simulate_point(kw, a.dim, a.seeds, a.loss)
            json.dump(cache, open(a.json, "w"), indent=1, default=str)
            print(f"[validation]   {cache['sim'][ks]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        if a.part in ("theory", "both") and (a.redo_theory or kt not in cache["theory"]):
            print(f"[validation] theory {kt} ...", file=sys.stderr, flush=True)
            cache["theory"][kt] = theory_point(kw, a.n_mc)
            json.dump(cache, open(a.json, "w"), indent=1, default=str)
            print(f"[validation]   {cache['theory'][kt]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        if ks in cache["sim"] and kt in cache["theory"]:
            results.append(combine(name, kw, cache["sim"][ks], cache["theory"][kt], a.dim, a.seeds, a.n_mc))
    md = markdown(results)
    print(md)
    if a.md:
        open(a.md, "w").write(md + "\n")


if __name__ == "__main__":
    main()
