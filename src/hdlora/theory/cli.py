"""``hdlora theory``: one theoretical point (Results 3-5) from the command line."""

from __future__ import annotations

import argparse
import time
import warnings

from ..cli import (
    _float,
    add_common_arguments,
    add_param_arguments,
    add_rank_arguments,
    dumps,
    format_table,
    integer,
    params_from_args,
    print_warnings,
    rank_params,
    tolerance,
)
from ..params import DEFAULT_N_MC, ParamError

#: the baselines of App. A.7 (the same as :data:`hdlora.theory.solve.BASELINES`; not imported from
#: there so that building the parser stays light)
BASELINES = ("frozen", "lora_only")
BASELINE_ALIASES = {"lora-only": "lora_only"}

_TABLE_KEYS = (
    "Q",
    "M",
    "V",
    "q",
    "m",
    "v",
    "pretrain_train_error",
    "pretrain_test_error",
    "finetune_train_error",
    "finetune_test_error",
    "forgetting_error",
    "overlap",
    "delta_eff",
    "replicon_pretrain",
    "replicon_finetune",
    "converged",
    "iterations",
)

#: extra rows of the table at rank r (q = tr q, m = ||m||_F there)
_RANK_R_KEYS = (
    "lora_rank",
    "teacher_rank",
    "q_eigenvalues",
    "m_singular_values",
    "principal_cosines",
    "rank_m",
    "objective",
    "winner",
    "winner_status",
)


def _beta(text: str):
    return "optimal" if text == "optimal" else _float(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_param_arguments(p)
    add_rank_arguments(p)
    g = p.add_argument_group("theory")
    g.add_argument("--n-mc", type=integer, default=DEFAULT_N_MC, help="Monte-Carlo samples per expectation (>= 100)")
    g.add_argument("--seed", type=integer, default=0, help="seed of the fixed Monte-Carlo samples")
    g.add_argument(
        "--baseline",
        choices=BASELINES,
        default=None,
        type=lambda s: BASELINE_ALIASES.get(s, s),
        help="frozen: lambda' = inf (w_hat = 0); lora_only (or lora-only): lambda = inf (W_hat = 0)",
    )
    g.add_argument(
        "--beta",
        type=_beta,
        default=1.0,
        help="recalibration W_hat -> sqrt(beta) W_hat (eq. 26); 'optimal' uses beta* = M/Q",
    )
    g.add_argument(
        "--active-pool",
        type=_float,
        default=None,
        help="active fine-tuning (Algorithm 1) from a pool of alpha_bar' D candidates",
    )
    g.add_argument("--bayes-optimal", action="store_true", help="add the Bayes-optimal benchmarks (App. B)")
    g.add_argument(
        "--tol", type=tolerance, default=1e-7, help="fixed-point tolerance on the relative residual, in [1e-12, 1e-3]"
    )
    g.add_argument("--json", action="store_true", help="print one JSON object (warnings also go to stderr)")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory / time estimate (and whether it fits) and stop; nothing is allocated",
    )
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .solve import solve

    optimal = args.beta == "optimal"
    params = params_from_args(
        args, beta=1.0 if optimal else args.beta, active_pool=args.active_pool, **rank_params(args)
    )
    if args.n_mc < 100:
        raise ParamError(f"--n-mc must be >= 100, got {args.n_mc}")
    if not params.rank_one:
        from .solve_rank_r import check_rank_params

        check_rank_params(params, args.baseline, bayes_optimal=args.bayes_optimal)
    from ..resources_cli import theory_gate

    if (rc := theory_gate(args, params)) is not None:
        return rc
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = solve(params, n_mc=args.n_mc, seed=args.seed, baseline=args.baseline, tol=args.tol, optimal_beta=optimal)
        d = res.to_dict()
        if args.bayes_optimal:
            from .bayes import bayes_optimal

            d.update(bayes_optimal(params).to_dict())
    d["wall_time_total"] = time.perf_counter() - t0
    d["warnings"] = [str(w.message) for w in caught]
    print_warnings("theory", d["warnings"], args.quiet)
    if args.json:
        print(dumps(d))
    else:
        rows = {k: d[k] for k in _TABLE_KEYS}
        for k in _RANK_R_KEYS:
            if k in d:
                rows[k] = ", ".join(f"{x:.6g}" for x in d[k]) if isinstance(d[k], list) else d[k]
        for k in ("bo_pretrain_test_error", "bo_finetune_test_error", "bo_overlap"):
            if k in d:
                rows[k] = d[k]
        rows["wall time [s]"] = f"{d['wall_time_total']:.2f}"
        print(format_table(rows, title="hdlora theory (state evolution, Results 3-5)"))
    return 0
