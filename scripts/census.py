"""Convergence census of every theory point of the six figures' grids and the validation table (issue 10).

Before: the stored figure CSVs (docs/figures/fig1..6.csv: ``converged``, ``replicon_ok`` /
``replicon_unstable`` where stored).  After: the same figures' theory sweeps (every sweep whose name
does not end in '-simulate'; Bayes-optimal sweeps included) rerun with this checkout at the settings
of the stored figures (README gallery commands), plus the validation points
(scripts/validation_table.py POINTS), into a fresh database.

Status of a point: 'not converged' (converged false, and not converged to Monte-Carlo resolution),
'converged to Monte-Carlo resolution', 'replica-unstable' (converged, a replicon >= 1), 'converged'.
For every point left 'not converged' after, the replicon upper bound (mean + 2 s.e.) and the tail
share (the ten largest per-sample terms' share of the sum) are listed: the acceptance is that no
point with an upper bound < 1 and a light tail (share < TAIL_LIGHT) is left 'not converged'.

Usage: python scripts/census.py [--out docs/census] [--figures 1,2,3,4,5,6] [--before-only] [--workers 1]
Writes census.json (counts before/after per figure, the not-converged list) and after.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the settings the stored figures were made with (README gallery)
SETTINGS = {
    1: dict(),
    2: dict(dim=1000, seeds=3, n_mc=10000),
    3: dict(dim=150, seeds=4, n_mc=10000),
    4: dict(dim=1000, seeds=3, n_mc=10000),
    5: dict(dim=1000, seeds=3, n_mc=10000),
    6: dict(dim=150, seeds=4, n_mc=10000),
}
#: a tail is light when the ten largest per-sample replicon terms hold less than this share of the sum
TAIL_LIGHT = 0.05
STATUSES = ("converged", "converged to Monte-Carlo resolution", "replica-unstable", "not converged")


def _truthy(x) -> bool | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, str):
        return x.strip().lower() in ("true", "1")
    return bool(x)


def status_of(row) -> str | None:
    """The census status of one stored row (None: not a theory point with a convergence record)."""
    conv = _truthy(row.get("converged"))
    if conv is None:
        conv = _truthy(row.get("bo_converged"))
    if conv is None:
        return None
    if not conv:
        return "not converged"
    if _truthy(row.get("replicon_ok")) is False or _truthy(row.get("replicon_unstable")) is True:
        return "replica-unstable"
    sts = {row.get(k) for k in ("result.status", "finetune_status", "pretrain_status")}
    return "converged to Monte-Carlo resolution" if "converged to Monte-Carlo resolution" in sts else "converged"


def _is_theory(kind: str) -> bool:
    return "simulate" not in str(kind)


def count(rows) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for r in rows:
        s = status_of(r)
        if s is not None:
            out[s] += 1
    return out


def before(figures) -> dict:
    import pandas as pd

    res = {}
    for n in figures:
        d = pd.read_csv(ROOT / "docs" / "figures" / f"fig{n}.csv")
        rows = [r for r in d.to_dict("records") if _is_theory(r["kind"])]
        res[f"fig{n}"] = count(rows)
    return res


def _validation_rows() -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import warnings

    from compare_theory import _points  # the validation POINTS, read from scripts/validation_table.py

    from hdlora import Params
    from hdlora.theory import solve

    rows = []
    for name, kw in _points().items():
        if not name.startswith("validation"):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = solve(Params(**kw), warn=False).to_dict()
        r["result.status"] = r.get("status")
        rows.append(dict(r, point=name, kind="theory"))
    return rows


def after(figures, out: Path, workers: int) -> tuple[dict, list[dict]]:
    from hdlora.experiments.figures import build_figure, figure_frame
    from hdlora.experiments.store import Store
    from hdlora.experiments.sweep import run_sweep

    res, allrows = {}, []
    for n in figures:
        fig = build_figure(n, out=out / "figures", **SETTINGS[n])
        specs = [s for s in fig.sweeps if not s.name.endswith("-simulate")]
        out.joinpath("figures").mkdir(parents=True, exist_ok=True)
        with Store(fig.database) as store:
            for spec in specs:
                run_sweep(spec, workers=workers, progress=True, store=store)
            if fig.followups is not None:  # Fig. 1's inset (theory, at the optimal lam)
                from hdlora.experiments.figures import _frame

                for spec in fig.followup_specs(_frame(fig.sweeps, fig.database)):
                    run_sweep(spec, workers=workers, progress=True, store=store)
        f = figure_frame(fig)
        rows = [
            dict(r, figure=n) for r in f.to_dict("records") if _is_theory(r.get("sweep", "")) and r["status"] == "ok"
        ]
        res[f"fig{n}"] = count(rows)
        allrows += rows
    val = _validation_rows()
    res["validation"] = count(val)
    allrows += [dict(r, figure="validation") for r in val]
    return res, allrows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "census"))
    ap.add_argument("--figures", default="1,2,3,4,5,6")
    ap.add_argument("--before-only", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", default="/tmp/hdlora-census", help="where the rerun's database goes")
    a = ap.parse_args()
    figures = [int(x) for x in a.figures.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"before": before(figures), "tail_light_below": TAIL_LIGHT}
    if not a.before_only:
        import pandas as pd

        counts, rows = after(figures, Path(a.work), a.workers)
        report["after"] = counts
        left = []
        for r in rows:
            if status_of(r) != "not converged":
                continue
            up = r.get("replicon_finetune_upper", r.get("replicon_upper"))
            tail = r.get("replicon_finetune_tail", r.get("replicon_tail"))
            up = None if up is None or (isinstance(up, float) and math.isnan(up)) else float(up)
            tail = None if tail is None or (isinstance(tail, float) and math.isnan(tail)) else float(tail)
            left.append(
                {
                    "figure": r.get("figure"),
                    "sweep": r.get("sweep", r.get("point")),
                    "params": {
                        k: r.get(k)
                        for k in ("alpha", "alpha_ft", "tokens", "kappa0", "noise", "lam", "lam_ft", "activation")
                        if k in r
                    },
                    "residual": r.get("finetune_residual", r.get("residual")),
                    "pretrain_converged": r.get("pretrain_converged"),
                    "replicon_upper": up,
                    "replicon_tail": tail,
                    "light_tail_and_stable": bool(up is not None and up < 1 and tail is not None and tail < TAIL_LIGHT),
                }
            )
        report["not_converged_after"] = left
        report["violations"] = [x for x in left if x["light_tail_and_stable"]]
        pd.DataFrame(rows).to_csv(out / "after.csv", index=False)
    (out / "census.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "not_converged_after"}, indent=1, default=str))


if __name__ == "__main__":
    main()
