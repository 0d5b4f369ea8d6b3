"""Old code vs new code on the theory entry points that benchmarks/compare_theory.py does not reach: the numbers must
not move.

compare_theory.py solves rank-one points through ``solve``; this script also calls, at small n_mc: rank-r points
(through ``solve`` and ``solve_rank_r``), the baselines (LoRA-only, frozen), optimal beta, the coarse start and a warm
start, reused sequences, E', E'', the frozen and LoRA-only errors, ``bayes_optimal`` (linear, softmax, reuse) and the
effective-pre-training entry points of ``applications`` and ``finetune``.  Each code (this checkout's ``src`` and
``--base-src``) runs in its own subprocess, one thread; every float is compared by its repr (bit for bit).  Prints
one JSON object: the number of values, how many are identical, and the ones that differ.

Usage: python benchmarks/compare_api.py --base-src DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def flat(x: Any, pre: str = "") -> dict[str, str]:
    """{dotted name: repr} of every number, string and None in a result (dataclasses, dicts, sequences, arrays), wall
    times and histories left out."""
    out: dict[str, str] = {}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = x.to_dict() if hasattr(x, "to_dict") else dataclasses.asdict(x)
    if isinstance(x, dict):
        for k, v in x.items():
            if k in ("wall_time", "wall_time_s", "history"):
                continue
            out.update(flat(v, f"{pre}{k}."))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(flat(v, f"{pre}{i}."))
    elif isinstance(x, (float, int, bool, np.floating, np.integer, np.bool_)):
        out[pre[:-1]] = repr(float(x))
    elif x is None or isinstance(x, str):
        out[pre[:-1]] = repr(x)
    elif isinstance(x, np.ndarray):
        out.update(flat(x.tolist(), pre))
    else:
        raise TypeError(f"compare_api: {pre[:-1]} is a {type(x).__name__}, which it cannot compare")
    return out


def child() -> dict[str, dict[str, str]]:
    """Every entry point's outputs, flattened to {name: repr} (this process's hdlora)."""
    from hdlora import Params
    from hdlora.theory import applications, bayes, errors, finetune, solve
    from hdlora.theory.solve_rank_r import solve_rank_r

    warnings.simplefilter("ignore")
    R: dict[str, dict[str, str]] = {}
    FIG1 = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
    T2 = dict(tokens=2, kappa0=0.5, kappa=1, noise=0.5, alpha=0.2, alpha_ft=3, lam=0.3, lam_ft=0.5)
    # rank r (through solve and directly)
    R["rank2 linear"] = flat(
        solve(Params(**FIG1, activation="linear", lora_rank=2, teacher_rank=2), n_mc=2000, warn=False)
    )
    R["rank2 softmax T2"] = flat(solve(Params(**T2, lora_rank=2, teacher_rank=1), n_mc=2000, warn=False))
    R["rank2 direct"] = flat(
        solve_rank_r(
            Params(**T2, activation="linear", lora_rank=1, teacher_rank=2),
            n_mc=1500,
            tol=1e-9,
            max_iter=800,
            warn=False,
        )
    )
    # baselines, optimal beta, warm start, coarse path
    R["lora_only softmax"] = flat(solve(Params(**T2), n_mc=2000, baseline="lora_only", warn=False))
    R["frozen linear"] = flat(solve(Params(**FIG1, activation="linear"), n_mc=2000, baseline="frozen", warn=False))
    R["optimal_beta softmax"] = flat(solve(Params(**T2), n_mc=2000, optimal_beta=True, warn=False))
    cold = solve(Params(**T2), n_mc=8000, warn=False)
    R["coarse softmax 8000"] = flat(cold)
    R["warm softmax"] = flat(solve(Params(**dict(T2, lam=0.35)), n_mc=8000, init=cold, warn=False))
    R["reuse linear"] = flat(solve(Params(**T2, activation="linear", reuse=True), n_mc=2000, warn=False))
    # errors
    for act in ("linear", "softmax"):
        R[f"errors {act}"] = {
            "ft": repr(errors.finetune_test_error(act, 3, 2.0, 0.3, 0.5, 0.5, 0.4, 0.3, n_mc=3000, seed=2)),
            "fg": repr(errors.forgetting_error(act, 3, 2.0, 0.3, 0.5, 0.5, 0.4, 0.3, q0=1.2, n_mc=3000, seed=2)),
            "frozen": repr(errors.frozen_test_error(act, 3, 2.0, 0.3, 0.5, 0.5, n_mc=3000)),
            "lora_only": repr(errors.lora_only_test_error(act, 3, 2.0, 0.5, 0.4, 0.3, n_mc=3000)),
        }
    # Bayes-optimal (engine.solve_stage and fixed_point.iterate)
    for act in ("linear", "softmax"):
        R[f"bayes {act}"] = flat(
            bayes.bayes_optimal(Params(**T2, activation=act), n_mc=800, n_nodes=8, n_mc_error=2000)
        )
    R["bayes reuse"] = flat(bayes.bayes_optimal(Params(**dict(T2, reuse=True)), n_mc=800, n_nodes=8, n_mc_error=2000))
    # applications / effective pre-training
    p = Params(**dict(T2, active_pool=6.0))
    R["active effective"] = flat(applications.active_comparison_effective(p, 1.5, 1.0, 0.7, n_mc=2000, seed=1))
    R["finetune effective qmc"] = flat(
        finetune.solve_finetune_effective(Params(**T2), 1.5, 1.0, 0.7, n_mc=1024, method="qmc")
    )
    R["lora_only effective"] = flat(finetune.solve_lora_only(Params(**T2), n_mc=2000))
    return R


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-src", required=True)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child()))
        return
    base = Path(a.base_src)
    if not (base / "hdlora" / "theory").is_dir():
        print(f"compare_api: --base-src {base}: no hdlora/theory there; give a src directory", file=sys.stderr)
        raise SystemExit(2)
    res = {}
    for which, src in (("new", ROOT / "src"), ("old", base)):
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        r = subprocess.run(
            [sys.executable, __file__, "--base-src", str(base), "--child"], env=env, capture_output=True, text=True
        )
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"compare_api: the {which} code ({src}) failed: {last}", file=sys.stderr)
            raise SystemExit(1)
        res[which] = json.loads(r.stdout)
    differ = []
    total = 0
    for name in sorted(set(res["new"]) | set(res["old"])):
        new, old = res["new"].get(name, {}), res["old"].get(name, {})
        for k in sorted(set(new) | set(old)):
            total += 1
            if new.get(k) != old.get(k):
                differ.append({"entry": name, "value": k, "new": new.get(k), "old": old.get(k)})
    print(
        json.dumps(
            {
                "base": str(base),
                "entries": len(res["new"]),
                "values_compared": total,
                "bit_identical": total - len(differ),
                "differ": differ,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
