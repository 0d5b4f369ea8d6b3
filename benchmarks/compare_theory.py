"""Old code vs new code on the theory points: the numbers must not move.

Solves every validation theory point (``scripts/validation_table.py`` POINTS, n_mc = 3e4) and the
benchmark points (``benchmarks/bench_theory.py``: Fig. 1 softmax cold and warm, linear, Fig. 3
e = 1) with this checkout's ``src`` and with the old code (``--base-src``, or a temporary git
worktree of ``--base-rev``), each in its own subprocess, and prints one JSON object: per
quantity the maximum relative difference |new - old| / max(|old|, 1e-300) over the points, the
points where it moved more than ``--flag`` (default 10 x the fixed-point tolerance 1e-7), and
the iteration counts that changed.

With ``--replicas K`` (K >= 2) the new code is also solved at seeds 0..K-1 (independent Monte-Carlo
replicas: the named random streams share no draws between seeds), and every old value (seed 0) must lie
within max(2 se, 10 tol max(1, |value|)) of the new replicas' mean, se = sd_K sqrt(1 + 1/K) the combined
standard error of (one old replica - the mean of K new ones), sd_K the new replicas' standard deviation:
the check of a change that redraws the samples (e.g. the switch to named streams).

Usage: python benchmarks/compare_theory.py [--base-src DIR | --base-rev REV] [--points a,b] [--n-mc 30000]
       [--replicas 5]
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE_REV = "81e7eed"
SKIP = {"wall_time", "wall_time_s", "params", "n_mc", "seed", "baseline"}


def _points() -> dict[str, dict]:
    """POINTS of scripts/validation_table.py (read from its source: no import of the old/new package)
    plus the benchmark points."""
    src = (ROOT / "scripts" / "validation_table.py").read_text()
    tree = ast.parse(src)
    env: dict = {"math": math, "dict": dict}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("FIG1", "FIG3", "POINTS")
        ):
            exec(compile(ast.Module([node], []), "validation_table", "exec"), env)
    pts = {f"validation: {k}": v for k, v in env["POINTS"].items()}
    fig1 = env["FIG1"]
    pts["bench: softmax_fig1_warm (from lam=0.12)"] = dict(fig1, lam=0.1, lam_ft=0.5, _warm_lam=0.12)
    pts["bench: softmax_fig3_reuse_cold (lam=0.3, lam'=0.5)"] = dict(env["FIG3"], lam=0.3, lam_ft=0.5)
    return pts


def child(names: list[str], n_mc: int, seeds: list[int]) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import warnings

    from hdlora import Params
    from hdlora.theory import solve

    warnings.simplefilter("ignore")
    pts = _points()
    out: dict = {}
    for name in names:
        for seed in seeds:
            kw = dict(pts[name])
            warm = kw.pop("_warm_lam", None)
            init = solve(Params(**dict(kw, lam=warm)), n_mc=n_mc, seed=seed, warn=False) if warm is not None else None
            r = solve(Params(**kw), n_mc=n_mc, seed=seed, init=init, warn=False).to_dict()
            out[name if seed == 0 else f"{name} @seed {seed}"] = r
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if k in SKIP:
            continue
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        elif isinstance(v, (bool, int, float)) and v is not None:
            out[prefix + k] = float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-src", default=os.environ.get("HDLORA_BASE_SRC"))
    ap.add_argument("--base-rev", default=DEFAULT_BASE_REV)
    ap.add_argument("--points", default=None, help="comma-separated substrings selecting points")
    ap.add_argument("--n-mc", type=int, default=30000)
    ap.add_argument("--flag", type=float, default=1e-6)
    ap.add_argument("--replicas", type=int, default=1, help="new-code replicas (seeds 0..K-1)")
    ap.add_argument("--tol", type=float, default=1e-7, help="the fixed-point tolerance of the replica check")
    ap.add_argument("--seeds", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child), a.n_mc, [int(x) for x in a.seeds.split(",")])))
        return
    names = list(_points())
    if a.points:
        names = [n for n in names if any(s in n for s in a.points.split(","))]
    tmp = None
    if a.base_src:
        base = Path(a.base_src)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="hdlora-base-"))
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "wt"), a.base_rev],
            check=True,
            capture_output=True,
        )
        base = tmp / "wt" / "src"
    res = {}
    try:
        for which, src, seeds in (("new", ROOT / "src", range(max(1, a.replicas))), ("old", base, [0])):
            env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
            r = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(names), "--n-mc", str(a.n_mc)]
                + ["--seeds", ",".join(map(str, seeds))],
                env=env,
                capture_output=True,
                text=True,
            )
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            res[which] = json.loads(r.stdout)
    finally:
        if tmp is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "wt")], capture_output=True
            )
            shutil.rmtree(tmp, ignore_errors=True)
    per_q: dict[str, float] = {}
    moved, iters, identical = [], [], 0
    total = 0
    for name in names:
        new, old = _flat(res["new"][name]), _flat(res["old"][name])
        for k in sorted(set(new) & set(old)):
            o, n_ = old[k], new[k]
            if "iterations" in k:
                if o != n_:
                    iters.append(f"{name}: {k} {o:g} -> {n_:g}")
                continue
            total += 1
            if o == n_ or (math.isnan(o) and math.isnan(n_)):
                identical += 1
                rel = 0.0
            else:
                rel = abs(n_ - o) / max(abs(o), 1e-300)
            per_q[k] = max(per_q.get(k, 0.0), rel)
            if rel > a.flag and not k.startswith("mc_se"):
                moved.append(f"{name}: {k} {o!r} -> {n_!r} (rel {rel:.2g})")
    replica = _replica_check(names, res, a.replicas, a.tol) if a.replicas >= 2 else None
    print(
        json.dumps(
            {
                **({"replica_check": replica} if replica else {}),
                "points": len(names),
                "values_compared": total,
                "bit_identical": identical,
                "max_rel_diff_per_quantity": dict(sorted(per_q.items())),
                f"moved_more_than_{a.flag:g}": moved,
                "iteration_counts_changed": iters,
            },
            indent=1,
        )
    )


def _replica_check(names: list[str], res: dict, K: int, tol: float) -> dict:
    """Every old value against the mean of K new replicas: |old - mean| <= max(2 se, 10 tol max(1, |mean|))."""
    import numpy as np

    outside, checked, worst = [], 0, 0.0
    for name in names:
        old = _flat(res["old"][name])
        reps = [_flat(res["new"][name if s == 0 else f"{name} @seed {s}"]) for s in range(K)]
        for k in sorted(old):
            if "iterations" in k or "residual" in k or k.startswith("mc_se") or any(k not in r for r in reps):
                continue
            x = np.array([r[k] for r in reps], dtype=float)
            o = old[k]
            if not (np.all(np.isfinite(x)) and math.isfinite(o)):
                continue
            checked += 1
            mean, sd = float(x.mean()), float(x.std(ddof=1))
            se = sd * math.sqrt(1.0 + 1.0 / K)
            bound = max(2.0 * se, 10.0 * tol * max(1.0, abs(mean)))
            z = abs(o - mean) / bound if bound > 0 else (0.0 if o == mean else math.inf)
            worst = max(worst, z)
            if abs(o - mean) > bound:
                outside.append(f"{name}: {k} old {o:.6g}, new {mean:.6g} +- {se:.2g} (se, {K} replicas)")
    return {
        "replicas": K,
        "values_checked": checked,
        "outside_bound": outside,
        "max_ratio_to_bound": worst,
    }


if __name__ == "__main__":
    main()
