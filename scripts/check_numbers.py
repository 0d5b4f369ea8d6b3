"""Refactor guard: the theory outputs at fixed points, saved once and compared bit for bit.

Points: the four cases of ``benchmarks/bench_theory.py`` (Fig. 1 softmax cold and warm, linear,
Fig. 3 e = 1), the theory points of ``scripts/validation_table.py`` (docs/validation.json), and a few
extra calls that exercise the code paths of the paper objects (baselines, recalibration at beta*,
active fine-tuning, the figure task functions, Bayes-optimal, the closed forms, a tiny simulation).

Usage:
    python scripts/check_numbers.py --save before.json          # record
    python scripts/check_numbers.py --compare before.json       # max |new - old| per key, NaN-aware

Prints one line per point: the maximum absolute difference over all its numbers (0 means
bit-identical; a NaN in one run but not the other, or a missing number, counts as inf), then
every non-numeric field (strings, flags) that changed.  Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
SKIP = {"wall_time", "wall_time_s", "wall_s", "time_s", "elapsed_s"}


def _validation_points() -> dict:
    spec = importlib.util.spec_from_file_location("validation_table", ROOT / "scripts" / "validation_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.POINTS


def _flat(x, prefix="") -> dict:
    out = {}
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        for k, v in x.items():
            if k in SKIP or "wall_time" in k:
                continue
            out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(_flat(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = x
    return out


def compute(n_mc: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from hdlora import Params
    from hdlora.theory import solve

    res: dict = {}
    fig1 = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
    fig3 = Params(alpha=0.2, alpha_ft=3, tokens=2, kappa0=0.5, kappa=1, noise=0.5, lam=0.3, lam_ft=0.5, reuse=True)
    neighbour = solve(fig1.replace(lam=0.12), n_mc=n_mc, warn=False)
    res["bench softmax_fig1_cold"] = solve(fig1, n_mc=n_mc, warn=False)
    res["bench softmax_fig1_warm"] = solve(fig1, n_mc=n_mc, init=neighbour, warn=False)
    res["bench linear_fig1_cold"] = solve(fig1.replace(activation="linear"), n_mc=n_mc, warn=False)
    res["bench softmax_fig3_reuse_cold"] = solve(fig3, n_mc=n_mc, warn=False)
    for name, kw in _validation_points().items():
        res[f"validation {name}"] = solve(Params(**kw), n_mc=n_mc, warn=False)

    small = 3000
    res["baseline frozen"] = solve(fig1, n_mc=small, baseline="frozen", warn=False)
    res["baseline lora-only"] = solve(fig1, n_mc=small, baseline="lora-only", warn=False)
    res["optimal_beta"] = solve(fig1, n_mc=small, optimal_beta=True, warn=False)
    res["optimal_beta linear e=1"] = solve(fig3.replace(activation="linear"), n_mc=small, optimal_beta=True, warn=False)
    res["active_pool"] = solve(fig1.replace(active_pool=6.0, beta=0.9), n_mc=small, warn=False)

    from hdlora.theory import applications, bayes, effective, errors, finetune

    res["active_comparison_effective"] = applications.active_comparison_effective(
        Params(tokens=3, noise=0.0, alpha=0.1, lam=0.1, lam_ft=0.5, active_pool=6.0), 2.0, 2.0, 1.0, n_mc=2000
    )
    res["solve_lora_only"] = finetune.solve_lora_only(fig1, n_mc=2048)
    res["frozen_baseline"] = finetune.frozen_baseline(fig1, 2.0, 0.3, 0.5, n_mc=2048)
    res["bayes_optimal softmax"] = bayes.bayes_optimal(fig1, n_mc=300, n_nodes=6, n_mc_error=1000)
    res["bayes_optimal linear e=1"] = bayes.bayes_optimal(
        fig3.replace(activation="linear"), n_mc=300, n_nodes=6, n_mc_error=1000
    )
    res["closed forms"] = {
        "delta_eff": effective.delta_eff(2.0, 0.3, 0.5, 0.5),
        "delta_eff_beta": effective.delta_eff_beta(2.0, 0.3, 0.5, 0.5, 0.7),
        "beta_min": effective.beta_min(0.3, 0.5),
        "delta_eff_min": effective.delta_eff_min(2.0, 0.3, 0.5, 0.5),
        "delta_eff_reuse_linear": effective.delta_eff_reuse_linear(2.0, 0.3, 0.5, 0.5, 1.7, 3, 0.8),
        "linear_finetune": errors.linear_finetune_test_error(3, 2.0, 0.3, 0.5, 0.5, 0.4, 0.6),
        "linear_forgetting": errors.linear_forgetting_error(3, 2.0, 0.3, 0.5, 0.5, 0.4),
        "linear_pretrain": errors.linear_pretrain_test_error(3, 2.0, 0.3, 0.5, 0.5),
        "pretrain_test_error softmax": errors.pretrain_test_error("softmax", 3, 2.0, 0.3, 0.5, 0.5, n_mc=2000),
        "mmse": bayes.matrix_denoising_mmse(0.7, 1.0),
    }
    from hdlora.experiments import tasks  # noqa: F401  (registers the kinds)
    from hdlora.experiments.tasks import resolve

    eff_p = Params(alpha=0.1, alpha_ft=3.0, tokens=3, kappa0=0.5, kappa=1.0, noise=0.5, lam=0.1, lam_ft=0.5)
    figure_tasks = {
        "effective_theory_task": (eff_p, {"n_mc": 2000}),
        "active_theory_task": (eff_p.replace(noise=0.0, active_pool=6.0), {"n_mc": 1000}),
        "recalibrated_theory_task": (fig1.replace(beta=0.8), {"n_mc": 2000}),
        "recalibrated_pretrain_task": (fig1.replace(beta=0.8), {"n_mc": 2000}),
        "effective_simulate_task": (eff_p, {"dim": 12, "seeds": 1}),
        "recalibrated_simulate_task": (fig1.replace(beta=0.8), {"dim": 12, "seeds": 1, "n_mc": 2000}),
    }
    for name, (p, opts) in figure_tasks.items():
        fn = resolve(f"hdlora.experiments.figures:{name}")
        res[f"figure task {name}"] = fn(p, opts, None)
    from hdlora import simulate

    res["simulate tiny beta=0.8"] = simulate.run(fig1.replace(beta=0.8), 12, 1).to_dict(per_seed=False)
    return {k: _flat(v) for k, v in res.items()}


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _diff(a, b) -> float:
    """|a - b| for two numbers (0 when both NaN, inf when only one is NaN or one is missing)."""
    if not (_is_num(a) and _is_num(b)):
        return math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if (math.isnan(a) and math.isnan(b)) else math.inf
    return 0.0 if a == b else abs(a - b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--compare")
    ap.add_argument("--n-mc", type=int, default=30000)
    a = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = compute(a.n_mc)
    if a.save:
        Path(a.save).write_text(json.dumps(new, indent=1, default=repr))
        print(f"saved {sum(len(v) for v in new.values())} numbers at {len(new)} points to {a.save}")
        return
    old = json.loads(Path(a.compare).read_text())
    new = json.loads(json.dumps(new, default=repr))
    worst, texts = 0.0, []
    for point in sorted(set(old) | set(new)):
        o, n = old.get(point, {}), new.get(point, {})
        keys = {k for k in set(o) | set(n) if "wall_time" not in k}
        num = {k for k in keys if _is_num(o.get(k)) or _is_num(n.get(k))}
        diffs = {k: _diff(o.get(k), n.get(k)) for k in num}
        texts += [f"{point}: {k} {o.get(k)!r} -> {n.get(k)!r}" for k in sorted(keys - num) if o.get(k) != n.get(k)]
        d = max(diffs.values(), default=0.0)
        worst = max(worst, d)
        where = "" if d == 0 else f"\t(worst: {max(diffs, key=diffs.get)}; {sum(v > 0 for v in diffs.values())} differ)"
        print(f"{d:.3g}\t{len(num)} numbers\t{point}{where}")
    for t in texts:
        print(f"non-numeric field changed: {t}")
    print(f"max abs diff over all points: {worst:.3g} ({'BIT-IDENTICAL' if worst == 0 else 'DIFFERS'})")
    sys.exit(0 if worst == 0 and not texts else 1)


if __name__ == "__main__":
    main()
