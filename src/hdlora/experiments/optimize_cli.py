"""``hdlora optimize``: theory-driven tuning of lam, lam_ft and beta (see :mod:`.optimize`)."""

from __future__ import annotations

import argparse
import math
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
)
from ..params import DEFAULT_N_MC, ParamError

# The same as hdlora.experiments.optimize's (a test checks it); not imported from there, which
# imports scipy, so that building the parser stays light.
TARGETS = ("finetune_test_error", "overlap", "pretrain_test_error")
HYPERPARAMETERS = ("lam", "lam_ft", "beta", "lora_rank")
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {"lam": (1e-3, 10.0), "lam_ft": (1e-3, 10.0), "beta": (0.3, 3.0)}
DEFAULT_XTOL = 0.01


def parse_bounds(text: str | None) -> dict[str, tuple[float, float]]:
    """'lam=1e-3:10,lam_ft=1e-2:1' -> {'lam': (1e-3, 10.0), 'lam_ft': (1e-2, 1.0)}."""
    out: dict[str, tuple[float, float]] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, rng = item.partition("=")
        name = name.strip()
        if not eq or name not in HYPERPARAMETERS:
            raise ParamError(
                f"--bounds: expected NAME=LOW:HIGH with NAME in {', '.join(HYPERPARAMETERS)}, got {item!r}"
            )
        if name in out:
            raise ParamError(f"--bounds: {name} given twice")
        lo, colon, hi = rng.partition(":")
        try:
            if not colon:
                raise ValueError
            out[name] = (float(lo), float(hi))
        except ValueError:
            raise ParamError(f"--bounds {name}: expected LOW:HIGH numbers, got {rng!r}") from None
    return out


def _over(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_param_arguments(p)
    add_rank_arguments(p)
    g = p.add_argument_group("optimize")
    g.add_argument(
        "--target",
        default="finetune_test_error",
        help=f"quantity to optimise: {' | '.join(TARGETS)} (errors minimised, overlap maximised)",
    )
    g.add_argument(
        "--over",
        required=True,
        help="comma-separated hyperparameters to search: lam, lam_ft, beta (e.g. lam,lam_ft), and lora_rank "
        "(an integer axis: every rank solved, the others tuned per rank; e.g. lora_rank,lam_ft)",
    )
    defaults = ",".join(f"{k}={lo:g}:{hi:g}" for k, (lo, hi) in DEFAULT_BOUNDS.items()) + ",lora_rank=1:8"
    g.add_argument("--bounds", default=None, help=f"search intervals (log scale), default {defaults}")
    g.add_argument("--beta", type=_float, default=1.0, help="recalibration beta (eq. 26) when beta is not searched")
    g.add_argument("--active-pool", type=_float, default=None, help="active fine-tuning pool alpha_bar' (Algorithm 1)")
    g.add_argument("--n-mc", type=integer, default=DEFAULT_N_MC, help="Monte-Carlo samples per expectation (>= 100)")
    g.add_argument("--seed", type=integer, default=0, help="seed of the fixed Monte-Carlo samples (all solves)")
    g.add_argument("--tol", type=_float, default=DEFAULT_XTOL, help="tolerance on log10 of each hyperparameter (> 0)")
    g.add_argument("--max-solves", type=integer, default=300, help="budget of state-evolution solves")
    g.add_argument(
        "--n-grid",
        type=integer,
        default=None,
        help="coarse-grid points per dimension (None: 7/5/4 for 1/2/3 hyperparameters)",
    )
    g.add_argument("--records", action="store_true", help="table output: list every solve")
    g.add_argument(
        "--json", action="store_true", help="print one JSON object (progress and warnings still go to stderr)"
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory / time estimate (and whether it fits) and stop; nothing is allocated",
    )
    add_common_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .optimize import optimize

    if args.target not in TARGETS:
        raise ParamError(f"--target must be one of {', '.join(TARGETS)}, got {args.target!r}")
    over = _over(args.over)
    bounds = parse_bounds(args.bounds)
    params = params_from_args(args, beta=args.beta, active_pool=args.active_pool, **rank_params(args))
    from ..resources_cli import optimize_gate

    if (rc := optimize_gate(args, params)) is not None:
        return rc
    bar = None
    if not args.quiet:
        from ..progress import bar as progress_bar

        bar = progress_bar(total=args.max_solves, desc="optimize", unit="solve", log_interval=5.0)

    def on_solve(rec) -> None:
        if bar is not None:
            point = ", ".join(f"{n} {v:.3g}" for n, v in rec.point.items())
            bar.set_postfix_str(
                f"{rec.phase}: {point}: {rec.value:.4g}" + ("" if rec.converged else " (nc)"), refresh=False
            )
            bar.update(1)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = optimize(
                params,
                args.target,
                over,
                bounds=bounds,
                n_mc=args.n_mc,
                seed=args.seed,
                tol=args.tol,
                max_solves=args.max_solves,
                n_grid=args.n_grid,
                on_solve=on_solve,
            )
    finally:
        if bar is not None:
            bar.close()
    d = res.to_dict()
    d["warnings"] = [str(w.message) for w in caught]
    print_warnings("optimize", d["warnings"], args.quiet)
    if args.json:
        print(dumps(d))
        return 0
    rows: dict = {f"optimal {n}": v for n, v in res.optimum.items()}
    rows[f"{res.target} ({'max' if res.maximize else 'min'})"] = res.value
    if res.per_rank:
        rows["ranks within 1 % of the best"] = (
            ", ".join(f"r={e['lora_rank']}: {e['value']:.6g}" for e in res.flat_ranks) or "none converged"
        )
    if math.isfinite(res.value_se) and res.value_se > 0:
        rows["MC standard error"] = res.value_se
    for n, b in res.at_bound.items():
        if b:
            rows[f"{n} at a bound"] = f"{res.bounds[n]} (the optimum may lie outside)"
    rows["converged"] = res.converged
    rows["solves"] = f"{res.n_solves} ({res.n_not_converged} not converged)"
    if res.budget_exhausted:
        rows["budget exhausted"] = True
    rows["bounds"] = ", ".join(f"{n} in [{lo:g}, {hi:g}]" for n, (lo, hi) in res.bounds.items())
    rows["tol (log10)"] = res.xtol
    rows["n_mc, seed"] = f"{res.n_mc}, {res.seed}"
    rows["wall time [s]"] = f"{res.wall_time:.2f}"
    print(format_table(rows, title="hdlora optimize (theory-driven tuning, state evolution)"))
    if res.per_rank:
        cont = [n for n in res.over if n != "lora_rank"]
        print("\n  " + f"{'r':>3}" + "".join(f"  {n:>10}" for n in cont) + f"  {res.target:>20}  converged  winner")
        for e in res.per_rank:
            print(
                f"  {e['lora_rank']:3d}"
                + "".join(f"  {e['optimum'].get(n, math.nan):10.4g}" for n in cont)
                + f"  {e['value']:20.8g}  {str(e['converged']):>9}  {e['winner'] or '-'} {e['winner_status']}"
            )
    if args.records:
        names = list(res.over)
        print("\n  " + "  ".join(f"{n:>10}" for n in names) + f"  {res.target:>20}  converged  phase")
        for r in res.records:
            print(
                "  "
                + "  ".join(f"{r.point[n]:10.4g}" for n in names)
                + f"  {r.value:20.8g}  {str(r.converged):>9}  {r.phase}"
            )
    return 0
