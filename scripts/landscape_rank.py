"""The landscape against the LoRA rank (issue 14): do more LoRA directions remove the bad minima?

In the rank-one model, random fine-tuning starts at large effective noise stop in worse local
minima than the informed start at w = w*.  Over-parameterised LoRA in the NTK regime has no
spurious local minima once r >~ sqrt(N) (Jang, Lee, Ryu, ICML 2024).  This script measures, for a
rank-one teacher (r* = 1) and LoRA ranks r, what many random starts reach.

Settings (effective pre-training, eq. 13, in both; sequence loss; orthonormal teacher, q0 = 1):
  hard: Q0 = Q = 4, M = 1, Delta = 0, alpha' = 1.5, lam' = 0.5, T = 3, softmax
        (Delta_eff = Delta/2 + Q0 - M^2/Q = 3.75, eq. 28).
  easy: the Fig. 1 point alpha = 0.1, alpha' = 3, T = 3, kappa0 = kappa = 1, Delta = 0.5, lam = 0.1,
        lam' = 0.5, softmax, with (Q0, Q, M) = (1 + kappa0, Q, M) of the pre-training state
        evolution :func:`hdlora.theory.pretrain.solve_pretrain` at that point (solved once per run).

Per (setting, seed) one fine-tuning set is drawn (it does not depend on r); per r the starts are
those of :func:`hdlora.simulate.finetune.starts` (the informed start w* padded with 0.05 x N(0, 1)
columns, then ``--starts`` random 0.5 x N(0, 1) starts; at r = 1 exactly the starts of
``hdlora simulate``), each minimised by L-BFGS to max|grad| <= 1e-6 x its initial value
(``--rtol``).  One CSV row per start: final objective, train error, E' (finetune test error, on
10 D fresh samples, the same for every start of a seed), E'' (forgetting), overlap, q, m, the
singular values of w/sqrt(D), E' of the rank-one truncation of w (its top singular direction only:
what the extra directions cost or gain), iterations, convergence, wall time.  After the starts of
a (setting, r, seed), the lowest end point is polished (minimised again to 1e-3 of its own
gradient); ``polish_drop`` = how much the objective still fell, the accuracy of a solve.

Resumable: a (setting, r, seed) whose rows are already in the CSV is skipped.
``--report`` reads the CSV, prints the summary per (setting, r) and draws the plot.

Usage:
    python scripts/landscape_rank.py --dim 200 --seeds 0 1 --starts 20         # run + report
    python scripts/landscape_rank.py --report                                   # summary + plot only
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hdlora import Params, activations  # noqa: E402
from hdlora.data import Effective, draw_teacher, effective_finetune_dataset, generator, token_chunk  # noqa: E402
from hdlora.simulate.finetune import finetune_value_and_grad, starts, train_error  # noqa: E402
from hdlora.simulate.metrics import lora_parameters, test_errors  # noqa: E402
from hdlora.simulate.optim import minimise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSV_DEFAULT = ROOT / "docs" / "validation" / "landscape_rank.csv"
PLOT_DEFAULT = ROOT / "docs" / "figures" / "landscape_rank.png"
RANKS = (1, 2, 4, 8, 16, 32)
HARD = dict(alpha=0.1, alpha_ft=1.5, tokens=3, noise=0.0, lam_ft=0.5, activation="softmax")
EASY = dict(
    alpha=0.1, alpha_ft=3.0, tokens=3, kappa0=1.0, kappa=1.0, noise=0.5, lam=0.1, lam_ft=0.5, activation="softmax"
)
N_SV = 4  # singular values of w/sqrt(D) kept in their own columns (the rest summed in sv_rest)
INIT_SCALE, PAD_SCALE = 0.5, 0.05  # those of hdlora.simulate.finetune.finetune
#: Default "reach" tolerance on the final objective, relative to |best| (see docs/landscape_rank.md).
REACH_RTOL = 1e-6
#: Looser tolerances also reported (relative to |best|): "practically as good".
NEAR_RTOLS = (1e-3, 1e-2)

FIELDS = [
    "setting", "D", "seed", "r", "r_star", "start", "N_ft", "alpha_ft", "lam_ft", "Delta", "Q0", "Q", "M",
    "objective", "train_error", "E_ft", "E_forget", "E_ft_trunc", "overlap", "overlap_trunc", "q", "m",
    "sv1", "sv2", "sv3", "sv4", "sv_rest", "numerical_rank", "iterations", "evaluations", "grad_norm",
    "grad_norm_initial", "converged", "reason", "wall_time", "polish_drop", "device", "torch",
]  # fmt: skip


def settings(which, n_mc: int) -> dict:
    """(Params, Effective) per setting name; the easy one solves the pre-training state evolution."""
    out = {}
    if "hard" in which:
        out["hard"] = (Params(**HARD), Effective(Q0=4.0, Q=4.0, M=1.0))
    if "easy" in which:
        from hdlora.theory.pretrain import solve_pretrain

        p = Params(**EASY)
        t0 = time.perf_counter()
        pr = solve_pretrain(p, n_mc=n_mc)
        if not pr.converged:
            raise SystemExit(f"easy setting: pre-training state evolution not converged (residual {pr.residual:.3g})")
        print(
            f"easy: state evolution Q0 = {p.Q0}, Q = {pr.Q:.6f}, M = {pr.M:.6f} "
            f"(residual {pr.residual:.2g}, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        out["easy"] = (p, Effective(Q0=p.Q0, Q=pr.Q, M=pr.M))
    return out


def rank_one_truncation(w: torch.Tensor) -> torch.Tensor:
    """The top singular component of w (D x r) as a D x 1 matrix (w itself at r = 1)."""
    if w.dim() == 1:
        return w
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return (U[:, :1] * S[:1]).contiguous()


def run_group(setting, params, eff, data, teacher, sigma, r, seed, args, dev) -> list[dict]:
    """All starts of one (setting, r, seed): one row each."""
    D = teacher.D
    chunk = token_chunk(params.tokens, D)
    vg = finetune_value_and_grad(data, sigma, params.lam_ft, "sequence", chunk)
    g = generator(seed, "finetune_init", dev)
    todo = starts(teacher.w_star, r, g, restarts=args.starts, init_scale=INIT_SCALE, informed=True, pad_scale=PAD_SCALE)
    test_kw = dict(
        teacher=teacher, W_hat=None, beta=1.0, T=params.tokens, Delta=params.noise, n_test=10 * D,
        seed=seed, sigma=sigma, loss="sequence", effective=eff,
    )  # fmt: skip
    rows, ends = [], []
    for name, w0 in todo:
        t0 = time.perf_counter()
        res = minimise(vg, w0, rtol=args.rtol, max_iter=args.max_iter)
        wall = time.perf_counter() - t0
        w = res.x
        lp = lora_parameters(w, teacher.w_star)
        te = test_errors(w_hat=w, **test_kw)
        wt = rank_one_truncation(w)
        te_t = test_errors(w_hat=wt, **test_kw) if r > 1 else te
        ov_t = lora_parameters(wt, teacher.w_star)["overlap"] if r > 1 else lp["overlap"]
        sv = lp["w_singular_values"]
        rows.append(
            {
                "setting": setting, "D": D, "seed": seed, "r": r, "r_star": 1, "start": name, "N_ft": data.n,
                "alpha_ft": params.alpha_ft, "lam_ft": params.lam_ft, "Delta": params.noise,
                "Q0": eff.Q0, "Q": eff.Q, "M": eff.M, "objective": res.objective,
                "train_error": train_error(w, data, sigma, "sequence", chunk),
                "E_ft": te["finetune_test_error"], "E_forget": te["forgetting_error"],
                "E_ft_trunc": te_t["finetune_test_error"], "overlap": lp["overlap"], "overlap_trunc": ov_t,
                "q": lp["q"], "m": abs(lp["m"]),
                **{f"sv{k + 1}": (sv[k] if k < len(sv) else 0.0) for k in range(N_SV)},
                "sv_rest": math.sqrt(sum(s * s for s in sv[N_SV:])), "numerical_rank": lp["numerical_rank"],
                "iterations": res.iterations, "evaluations": res.evaluations, "grad_norm": res.grad_norm,
                "grad_norm_initial": res.grad_norm_initial, "converged": int(res.converged), "reason": res.reason,
                "wall_time": wall, "device": str(dev), "torch": torch.__version__,
            }
        )  # fmt: skip
        ends.append(w)
    best = int(np.argmin([row["objective"] for row in rows]))
    pol = minimise(vg, ends[best], rtol=1e-3, max_iter=args.max_iter)
    drop = rows[best]["objective"] - pol.objective
    for row in rows:
        row["polish_drop"] = drop
    return rows


def done_groups(path: Path) -> set:
    if not path.exists():
        return set()
    with path.open() as f:
        return {(row["setting"], int(row["D"]), int(row["seed"]), int(row["r"])) for row in csv.DictReader(f)}


def append(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- report
def load(path: Path) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for k, v in row.items():
            if k in ("setting", "start", "reason", "device", "torch"):
                continue
            row[k] = float(v)
    return rows


def summarise(rows: list[dict], reach_rtol: float) -> list[dict]:
    """Per (setting, D, r): over the random starts of every seed, the fraction within reach_rtol x
    |best| of the lowest objective of their (setting, D, r, seed) (informed start included)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["setting"], int(row["D"]), int(row["r"]), int(row["seed"])), []).append(row)
    best_r1 = {}
    for (s, D, r, seed), g in groups.items():
        if r == 1:
            best_r1[(s, D, seed)] = min(x["objective"] for x in g)
    per: dict = {}
    for (s, D, r, seed), g in sorted(groups.items()):
        best = min(x["objective"] for x in g)
        tol = reach_rtol * abs(best)
        for x in g:
            x["gap"] = x["objective"] - best
            x["rel_gap"] = x["gap"] / abs(best)
            x["reached"] = x["gap"] <= tol
            x["best_minus_best_r1"] = best - best_r1.get((s, D, seed), math.nan)
        per.setdefault((s, D, r), []).append(g)
    out = []
    for (s, D, r), gs in sorted(per.items()):
        rand = [x for g in gs for x in g if x["start"] != "informed"]
        inf = [x for g in gs for x in g if x["start"] == "informed"]
        hit = [x for x in rand if x["reached"]]
        miss = [x for x in rand if not x["reached"]]
        winners = [min(g, key=lambda x: x["objective"]) for g in gs]
        arr = lambda xs, k: np.array([x[k] for x in xs], dtype=float)  # noqa: E731
        out.append(
            {
                "setting": s, "D": D, "r": r, "seeds": len(gs), "random_starts": len(rand),
                "N_ft": int(gs[0][0]["N_ft"]),
                "frac_reach": len(hit) / len(rand) if rand else math.nan,
                "frac_reach_per_seed": [
                    float(np.mean([x["reached"] for x in g if x["start"] != "informed"])) for g in gs
                ],
                **{
                    f"frac_near_{t:g}": float(np.mean([x["gap"] <= t * abs(x["objective"] - x["gap"]) for x in rand]))
                    for t in NEAR_RTOLS
                },
                "informed_reach": float(np.mean([x["reached"] for x in inf])) if inf else math.nan,
                "E_ft_reach_mean": float(arr(hit, "E_ft").mean()) if hit else math.nan,
                "E_ft_reach_std": float(arr(hit, "E_ft").std()) if hit else math.nan,
                "E_ft_reach_worst": float(arr(hit, "E_ft").max()) if hit else math.nan,
                "overlap_reach_mean": float(arr(hit, "overlap").mean()) if hit else math.nan,
                "overlap_reach_std": float(arr(hit, "overlap").std()) if hit else math.nan,
                "overlap_reach_worst": float(arr(hit, "overlap").min()) if hit else math.nan,
                "E_ft_all_mean": float(arr(rand, "E_ft").mean()),
                "E_ft_all_worst": float(arr(rand, "E_ft").max()),
                "overlap_all_mean": float(arr(rand, "overlap").mean()),
                "overlap_all_worst": float(arr(rand, "overlap").min()),
                "E_ft_best": float(arr(winners, "E_ft").mean()),
                "E_ft_trunc_best": float(arr(winners, "E_ft_trunc").mean()),
                "overlap_best": float(arr(winners, "overlap").mean()),
                "sv1_best": float(arr(winners, "sv1").mean()),
                "sv_extra_best": float(np.mean([math.sqrt(x["sv2"] ** 2 + x["sv3"] ** 2 + x["sv4"] ** 2 + x["sv_rest"] ** 2) for x in winners])),
                "sv2_best": float(arr(winners, "sv2").mean()),
                "best_minus_best_r1": float(np.mean([w["best_minus_best_r1"] for w in winners])),
                "objective_best": float(arr(winners, "objective").mean()),
                "gap_miss_median": float(np.median(arr(miss, "rel_gap"))) if miss else math.nan,
                "gap_miss_min": float(arr(miss, "rel_gap").min()) if miss else math.nan,
                "gap_miss_max": float(arr(miss, "rel_gap").max()) if miss else math.nan,
                "E_ft_miss_mean": float(arr(miss, "E_ft").mean()) if miss else math.nan,
                "overlap_miss_mean": float(arr(miss, "overlap").mean()) if miss else math.nan,
                "gap_reach_max": float(arr(hit, "rel_gap").max()) if hit else math.nan,
                "E_ft_zero": float(np.mean([g[0].get("E_ft_zero", math.nan) for g in gs])),
                "E_ft_wstar": float(np.mean([g[0].get("E_ft_wstar", math.nan) for g in gs])),
                "polish_drop_max": float(max(g[0]["polish_drop"] for g in gs)),
                "converged_frac": float(arr(rand + inf, "converged").mean()),
                "wall_per_start": float(arr(rand, "wall_time").mean()),
                "numerical_rank_median": float(np.median(arr(rand + inf, "numerical_rank"))),
                "numerical_rank_max": float(arr(rand + inf, "numerical_rank").max()),
                "iterations_mean": float(arr(rand, "iterations").mean()),
            }
        )  # fmt: skip
    return out


def print_summary(summary: list[dict], reach_rtol: float) -> None:
    print(f"reach: objective - best <= {reach_rtol:g} |best| (best per setting, D, r, seed, informed included)")
    head = (
        f"{'setting':7s} {'D':>4s} {'r':>3s} {'n':>4s} {'reach':>6s} {'E_reach':>16s} {'o_reach':>16s} "
        f"{'<1e-3':>5s} {'<1e-2':>5s} {'E_miss':>7s} {'o_miss':>6s} {'relgap_miss(med,min)':>19s} {'E_best':>7s} {'E_trunc':>7s} "
        f"{'sv2':>6s} {'sv_ext':>6s} {'dObj_r1':>9s} {'conv':>5s} {'s/start':>7s} {'E(w=0)':>7s} {'E(w*)':>7s} {'rank':>7s} {'E_worst':>7s} {'o_worst':>7s} {'E_all':>7s} {'o_all':>6s}"
    )
    print(head)
    print(
        "  n: random starts (all seeds); reach: fraction in the same minimum as the best; E_reach, o_reach: E' and "
        "overlap of those (mean +- std), E_worst, o_worst: their worst; <1e-3, <1e-2: fractions within 0.1 %, 1 % "
        "of the best objective; E_miss, o_miss: means of the others; relgap_miss: their objective gap / |best| "
        "(median, min); E_best, E_trunc: E' of the lowest objective and of its rank-one truncation (seed mean); "
        "sv2, sv_ext: second singular value of w/sqrt(D) and the norm of all beyond the first, at the best; "
        "dObj_r1: best objective minus that at r = 1; conv: converged fraction; E(w=0), E(w*): references; "
        "rank: numerical rank of the end points (median/max); E_all, o_all: means over all random starts"
    )
    for s in summary:
        f = lambda v, fmt=".4f": "nan" if v != v else format(v, fmt)  # noqa: E731
        print(
            f"{s['setting']:7s} {s['D']:4d} {s['r']:3d} {s['random_starts']:4d} {s['frac_reach']:6.2f} "
            f"{f(s['E_ft_reach_mean']):>7s}+-{f(s['E_ft_reach_std']):<7s} "
            f"{f(s['overlap_reach_mean']):>7s}+-{f(s['overlap_reach_std']):<7s} "
            f"{s['frac_near_0.001']:5.2f} {s['frac_near_0.01']:5.2f} {f(s['E_ft_miss_mean']):>7s} {f(s['overlap_miss_mean'], '.3f'):>6s} "
            f"{f(s['gap_miss_median'], '.2e'):>9s},{f(s['gap_miss_min'], '.1e'):>9s} "
            f"{s['E_ft_best']:7.4f} {s['E_ft_trunc_best']:7.4f} {s['sv2_best']:6.3f} {s['sv_extra_best']:6.3f} "
            f"{s['best_minus_best_r1']:9.2e} {s['converged_frac']:5.2f} {s['wall_per_start']:7.2f} "
            f"{s['E_ft_zero']:7.4f} {s['E_ft_wstar']:7.4f} {s['numerical_rank_median']:3.0f}/{s['numerical_rank_max']:<3.0f} "
            f"{f(s['E_ft_reach_worst']):>7s} {f(s['overlap_reach_worst']):>7s} {s['E_ft_all_mean']:7.4f} {s['overlap_all_mean']:6.3f}"
        )


def references(rows: list[dict]) -> None:
    """E' of w = 0 (no fine-tuning) and of w = w* (the teacher, not fitted) per (setting, D, seed),
    on the same test sets as the starts; stored in the rows as ``E_ft_zero``, ``E_ft_wstar``."""
    got: dict = {}
    for row in rows:
        key = (row["setting"], int(row["D"]), int(row["seed"]))
        if key not in got:
            p = Params(**(HARD if row["setting"] == "hard" else EASY))
            eff = Effective(Q0=row["Q0"], Q=row["Q"], M=row["M"])
            D, seed = key[1], key[2]
            teacher = draw_teacher(D, 0, seed, "cpu", rank=1, kind="orthonormal")
            kw = dict(
                teacher=teacher, W_hat=None, beta=1.0, T=p.tokens, Delta=p.noise, n_test=10 * D, seed=seed,
                sigma=activations.get(p.activation, "torch"), loss="sequence", effective=eff,
            )  # fmt: skip
            zero = torch.zeros(D, dtype=teacher.w_star.dtype)
            got[key] = (
                test_errors(w_hat=zero, **kw)["finetune_test_error"],
                test_errors(w_hat=teacher.w_star, **kw)["finetune_test_error"],
            )
        row["E_ft_zero"], row["E_ft_wstar"] = got[key]


def plot(summary: list[dict], rows: list[dict], out: Path, reach_rtol: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((a_frac, a_ov), (a_eh, a_ee)) = plt.subplots(2, 2, figsize=(12, 10))
    colors = {"hard": "C3", "easy": "C0"}
    e_axes = {"hard": a_eh, "easy": a_ee}
    Dmain = max(s["D"] for s in summary)
    for setting in ("hard", "easy"):  # smaller D: only their fractions, thin lines
        for D in sorted({s["D"] for s in summary} - {Dmain}):
            ss = [s for s in summary if s["setting"] == setting and s["D"] == D]
            if ss:
                a_frac.plot(
                    [s["r"] for s in ss], [s["frac_reach"] for s in ss], "x-.", color=colors[setting], lw=0.8, alpha=0.6,
                    label=f"{setting}, D = {D} (N' = {ss[0]['N_ft']}, {max(s['seeds'] for s in ss)} seeds): same minimum",
                )  # fmt: skip
                a_frac.axvline(math.sqrt(ss[0]["N_ft"]), color=colors[setting], ls="-.", lw=0.6, alpha=0.5)
    for setting in ("hard", "easy"):
        for D in (Dmain,):
            ss = [s for s in summary if s["setting"] == setting and s["D"] == D]
            if not ss:
                continue
            rs = [s["r"] for s in ss]
            c = colors[setting]
            nseeds = max(s["seeds"] for s in ss)
            lab = f"{setting} (D = {D}, N' = {ss[0]['N_ft']}, {nseeds} seeds)"
            a_frac.plot(rs, [s["frac_reach"] for s in ss], "o-", color=c, label=f"{lab}: same minimum")
            a_frac.plot(
                rs,
                [s["frac_near_0.001"] for s in ss],
                "s--",
                color=c,
                mfc="none",
                lw=1,
                label=f"{setting}: within 0.1 %",
            )
            a_frac.plot(
                rs, [s["frac_near_0.01"] for s in ss], "^:", color=c, mfc="none", lw=1, label=f"{setting}: within 1 %"
            )
            for s in ss:  # per-seed fractions
                a_frac.plot([s["r"]] * len(s["frac_reach_per_seed"]), s["frac_reach_per_seed"], "_", color=c, ms=10)
            sel = [x for x in rows if x["setting"] == setting and int(x["D"]) == D and x["start"] != "informed"]
            xs, e, o, reached = [], [], [], []
            cnt = dict.fromkeys(rs, 0)
            n_r = {r: sum(1 for x in sel if int(x["r"]) == r) for r in rs}
            for x in sel:
                r = int(x["r"])
                xs.append(r * 2 ** (0.25 * (cnt[r] / max(1, n_r[r] - 1) - 0.5)))
                cnt[r] += 1
                e.append(x["E_ft"])
                o.append(x["overlap"])
                reached.append(x["reached"])
            reached = np.array(reached, dtype=bool)
            xs, e, o = map(np.array, (xs, e, o))
            ae = e_axes[setting]
            for ax, y in ((ae, e), (a_ov, o)):
                ax.scatter(xs[reached], y[reached], s=14, color=c, alpha=0.8)
                ax.scatter(xs[~reached], y[~reached], s=12, facecolors="none", edgecolors=c, alpha=0.5)
            ae.plot(
                rs, [s["E_ft_best"] for s in ss], "-", color=c, lw=1, label="E' of the lowest objective (seed mean)"
            )
            ae.plot(rs, [s["E_ft_trunc_best"] for s in ss], "--", color="k", lw=1, label="same, rank-one truncation")
            if ss[0]["E_ft_zero"] == ss[0]["E_ft_zero"]:
                ae.axhline(ss[0]["E_ft_zero"], color="gray", ls="-.", lw=1, label="w = 0 (no fine-tuning)")
                ae.axhline(ss[0]["E_ft_wstar"], color="gray", ls=":", lw=1, label="w = w* (teacher)")
            ae.set_title(f"{setting}: E' of each random start (D = {D})", fontsize=9)
            ae.legend(fontsize=7)
            sqrt_n = math.sqrt(ss[0]["N_ft"])
            for ax in (a_frac, a_ov, ae):
                ax.axvline(sqrt_n, color=c, ls=":", lw=1)
    a_frac.set_ylabel("fraction of random starts")
    a_frac.set_ylim(-0.05, 1.05)
    a_frac.set_title(
        f"reaching the lowest objective found (same minimum: within {reach_rtol:g} |best|)\n"
        "dotted verticals: r = sqrt(N')", fontsize=9,
    )  # fmt: skip
    a_ov.set_ylabel("overlap ||m||_F / sqrt(||q||_F q0)")
    a_ov.set_title("overlap of each random start (filled: reached the lowest objective)", fontsize=9)
    for ax in (a_eh, a_ee):
        ax.set_ylabel("E' (fine-tuning test error)")
    for ax in (a_frac, a_ov, a_eh, a_ee):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r (teacher rank r* = 1)")
        ticks = sorted({s["r"] for s in summary})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(r) for r in ticks])
    a_frac.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle(
        "Landscape against the LoRA rank: random starts 0.5 N(0, 1), L-BFGS to 1e-6 of the initial gradient\n"
        "hard: Q0 = Q = 4, M = 1, Delta = 0, alpha' = 1.5; easy: Fig. 1 point (softmax, T = 3, lam' = 0.5)",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=200, help="D (default 200)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    ap.add_argument("--settings", nargs="+", default=["hard", "easy"], choices=["hard", "easy"])
    ap.add_argument(
        "--starts", type=int, default=20, help="random starts per (setting, r, seed), besides the informed one"
    )
    ap.add_argument("--rtol", type=float, default=1e-6, help="L-BFGS: max|grad| <= rtol x initial")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--n-mc", type=int, default=30000, help="Monte-Carlo samples of the easy setting's state evolution")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default=str(CSV_DEFAULT))
    ap.add_argument("--plot", default=str(PLOT_DEFAULT))
    ap.add_argument("--reach-rtol", type=float, default=REACH_RTOL)
    ap.add_argument("--report", action="store_true", help="only summarise the CSV and draw the plot")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-references", action="store_true", help="skip E'(w = 0), E'(w = w*) in the report")
    args = ap.parse_args(argv)
    for name, v, lo in (("--dim", args.dim, 2), ("--starts", args.starts, 1), ("--max-iter", args.max_iter, 1)):
        if v < lo:
            ap.error(f"{name} must be >= {lo}, got {v}")
    if any(r < 1 or r > args.dim for r in args.ranks):
        ap.error(f"--ranks must lie in [1, D = {args.dim}], got {args.ranks}")
    if any(s < 0 for s in args.seeds):
        ap.error(f"--seeds must be >= 0, got {args.seeds}")
    torch.set_num_threads(1)
    path = Path(args.csv)
    if not args.report:
        dev = torch.device(args.device)
        done = done_groups(path)
        todo = [
            (s, r, seed)
            for seed in args.seeds
            for s in args.settings
            for r in args.ranks
            if (s, args.dim, seed, r) not in done
        ]
        print(
            f"{len(todo)} (setting, r, seed) groups to run at D = {args.dim}, {len(done)} already in {path}", flush=True
        )
        sets = settings(sorted({s for s, _, _ in todo}), args.n_mc) if todo else {}
        t_all = time.perf_counter()
        cache: dict = {}
        for s, r, seed in todo:
            params, eff = sets[s]
            if (s, seed) not in cache:
                cache.clear()
                teacher = draw_teacher(args.dim, 0, seed, dev, rank=1, kind="orthonormal")
                n_ft = params.sizes(args.dim)["N_ft"]
                data = effective_finetune_dataset(n_ft, params.tokens, params.noise, eff, teacher, seed, dev)
                cache[(s, seed)] = (teacher, data)
            teacher, data = cache[(s, seed)]
            sigma = activations.get(params.activation, "torch")
            t0 = time.perf_counter()
            rows = run_group(s, params, eff, data, teacher, sigma, r, seed, args, dev)
            append(path, rows)
            objs = np.array([x["objective"] for x in rows])
            best = objs.min()
            rand = np.array([x["start"] != "informed" for x in rows])
            frac = float(np.mean(objs[rand] - best <= args.reach_rtol * abs(best)))
            print(
                f"{s} D={args.dim} seed={seed} r={r}: best objective {best:.6f} (winner {rows[int(objs.argmin())]['start']}), "
                f"random starts reaching it {frac:.2f}, E' of best {rows[int(objs.argmin())]['E_ft']:.4f}, "
                f"polish drop {rows[0]['polish_drop']:.1e}, {time.perf_counter() - t0:.0f} s "
                f"(total {time.perf_counter() - t_all:.0f} s)",
                flush=True,
            )
    if not path.exists():
        print(f"no data in {path}")
        return 1
    rows = load(path)
    if not args.no_references:
        references(rows)
    summary = summarise(rows, args.reach_rtol)
    print_summary(summary, args.reach_rtol)
    reached = [x["rel_gap"] for x in rows if x["reached"] and x["rel_gap"] > 0]
    missed = [x["rel_gap"] for x in rows if not x["reached"]]
    drops = [x["polish_drop"] / abs(x["objective"] - x["gap"]) for x in rows]
    print(
        f"tolerance check: end points counted as the best lie within {max(reached, default=0.0):.1e} of it "
        f"(relative); the nearest other end point {min(missed, default=math.nan):.1e}; polishing the best "
        f"lowered it by at most {max(drops):.1e} (relative)"
    )
    if not args.no_plot:
        plot(summary, rows, Path(args.plot), args.reach_rtol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
