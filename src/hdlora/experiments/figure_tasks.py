"""The task functions of the figures: the numbers that ``hdlora figure N`` stores (Sections 4.1-4.3, App. E).

Each ``*_task`` is a "module:function" task kind of the figure sweeps (see
:mod:`hdlora.experiments.tasks`) and runs in a worker.  They live apart from the plots
(:mod:`hdlora.experiments.figures`) because they compute stored numbers: this module is
covered by the results key (:func:`hdlora.code_version`), the plotting code is not.

Effective pre-training (Figs. 2, 4, 5) is parameterised through ``kappa0``: Q0 = 1 + kappa0
and, by default, Q = Q0, M = 1, so Delta_eff = Delta/2 + Q0 - 2M + Q = Delta/2 + 2 kappa0 (eq. 25).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hdlora.params import DEFAULT_N_MC, ParamError, Params

__all__ = [
    "effective_theory_task",
    "effective_simulate_task",
    "active_theory_task",
    "recalibrated_theory_task",
    "recalibrated_simulate_task",
    "recalibrated_pretrain_task",
    "EFF_THEORY",
    "EFF_SIM",
    "ACTIVE_THEORY",
    "RECAL_THEORY",
    "RECAL_SIM",
    "RECAL_PRETRAIN",
    "rank_optimal_theory_task",
    "RANK_OPTIMAL",
]

_MOD = __name__
EFF_THEORY = f"{_MOD}:effective_theory_task"
EFF_SIM = f"{_MOD}:effective_simulate_task"
ACTIVE_THEORY = f"{_MOD}:active_theory_task"
RECAL_THEORY = f"{_MOD}:recalibrated_theory_task"
RECAL_SIM = f"{_MOD}:recalibrated_simulate_task"
RECAL_PRETRAIN = f"{_MOD}:recalibrated_pretrain_task"
RANK_OPTIMAL = f"{_MOD}:rank_optimal_theory_task"


def _effective_law(params: Params, options: Mapping[str, Any]) -> tuple[float, float, float]:
    """(Q0, Q, M) of the effective pre-training: Q0 = 1 + kappa0; options Q, M are numbers or "Q0"."""
    Q0 = params.Q0

    def val(name: str, default: Any) -> float:
        v = options.get(name, default)
        return Q0 if v == "Q0" else float(v)

    return Q0, val("Q", "Q0"), val("M", 1.0)


def _delta_eff(params: Params, Q0: float, Q: float, M: float) -> float:
    """Delta_eff(beta) of the effective law (eqs. 25-26, :func:`hdlora.theory.effective.delta_eff_beta`)."""
    from hdlora.theory.effective import delta_eff_beta

    return delta_eff_beta(Q0, Q, M, params.noise, params.beta)


def effective_theory_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Fine-tuning state evolution (Result 5) on an effective pre-training (Figs. 2, 5).

    Options: n_mc, seed, Q, M (numbers or "Q0"; default Q = Q0, M = 1).
    """
    from hdlora.theory.finetune import solve_finetune_effective

    Q0, Q, M = _effective_law(params, options)
    kw: dict[str, Any] = {"n_mc": int(options.get("n_mc", DEFAULT_N_MC)), "seed": int(options.get("seed", 0))}
    if init is not None and not params.frozen:
        kw["init"] = {k: init[k] for k in ("m", "q", "v") if k in init} or None
    r = solve_finetune_effective(params, Q0, Q, M, **kw)
    d = r.to_dict()
    d.update({"Q0": Q0, "Q": Q, "M": M, "delta_eff": _delta_eff(params, Q0, Q, M)})
    return d


effective_theory_task.warm_start = True  # type: ignore[attr-defined]  # marker read by tasks.Kind via getattr


def effective_simulate_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Finite-D fine-tuning on an effective pre-training (Figs. 2, 4, 5; active if params.active_pool).

    Options: dim, seeds, Q, M (as :func:`effective_theory_task`), other options go to
    :func:`hdlora.simulate.run` (device, restarts, ...).
    """
    from hdlora import simulate

    Q0, Q, M = _effective_law(params, options)
    kw = {k: v for k, v in options.items() if k not in ("dim", "seeds", "Q", "M")}
    r = simulate.run(params, int(options["dim"]), options["seeds"], effective={"Q0": Q0, "Q": Q, "M": M}, **kw)
    d = r.to_dict(per_seed=False)
    d.update({"Q0_eff": Q0, "Q_eff": Q, "M_eff": M, "delta_eff_law": _delta_eff(params, Q0, Q, M)})
    return d


def active_theory_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Active (Algorithm 1) vs uniform fine-tuning, paired state evolutions (Fig. 4, Section 4.3).

    Options: n_mc, seed, Q, M.
    """
    from hdlora.theory.applications import active_comparison_effective

    Q0, Q, M = _effective_law(params, options)
    r = active_comparison_effective(
        params, Q0, Q, M, n_mc=int(options.get("n_mc", DEFAULT_N_MC)), seed=int(options.get("seed", 0))
    )
    d = r.to_dict()
    d.update({"Q0": Q0, "Q": Q, "M": M})
    return d


def _beta_star(params: Params, n_mc: int, seed: int = 0) -> tuple[float, Any]:
    """beta* = M/Q from the pre-training state evolution at beta = 1 (eq. 26, App. E)."""
    from hdlora.theory.effective import beta_min
    from hdlora.theory.pretrain import solve_pretrain

    pre = solve_pretrain(params.replace(beta=1.0), n_mc=n_mc, seed=seed)
    if not pre.Q > 0:
        raise ParamError("recalibration needs a pre-trained map (Q > 0)")
    return beta_min(pre.Q, pre.M), pre


def recalibrated_theory_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Theory point (Results 3-5) with the frozen map recalibrated at beta = params.beta x beta*.

    ``params.beta`` is read as the *relative* factor beta/beta* (Fig. 6, App. E); beta* = M/Q
    from the pre-training fixed point.  Options: n_mc, seed.
    """
    from hdlora.theory.solve import solve

    n_mc, seed = int(options.get("n_mc", DEFAULT_N_MC)), int(options.get("seed", 0))
    bstar, _ = _beta_star(params, n_mc, seed)
    p = params.replace(beta=params.beta * bstar)
    kw: dict[str, Any] = {"n_mc": n_mc, "seed": seed}
    if init is not None:
        kw["init"] = {k: init[k] for k in ("Q", "M", "V", "q", "m", "v") if k in init}
    d = solve(p, **kw).to_dict()
    d.update({"beta_star": bstar, "beta_factor": params.beta, "beta_used": p.beta})
    return d


recalibrated_theory_task.warm_start = True  # type: ignore[attr-defined]  # marker read by tasks.Kind via getattr


def recalibrated_simulate_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Finite-D simulation with W_hat -> sqrt(beta) W_hat, beta = params.beta x beta* (theory beta*).

    Options: dim, seeds, n_mc (of the pre-training state evolution giving beta*), others to
    :func:`hdlora.simulate.run`.
    """
    from hdlora import simulate

    bstar, _ = _beta_star(params, int(options.get("n_mc", DEFAULT_N_MC)))
    kw = {k: v for k, v in options.items() if k not in ("dim", "seeds", "n_mc")}
    p = params.replace(beta=params.beta * bstar)
    d = simulate.run(p, int(options["dim"]), options["seeds"], **kw).to_dict(per_seed=False)
    d.update({"beta_star": bstar, "beta_factor": params.beta, "beta_used": p.beta})
    return d


def recalibrated_pretrain_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Pre-training test error E(beta) of the recalibrated map, beta = params.beta x beta* (Fig. 6 left).

    E(beta) = E ||sigma(beta z) - sigma(z*)||^2 with (z*, z) ~ Q (eq. 19 with Q -> beta^2 Q,
    M -> beta M).  Options: n_mc, seed.
    """
    from hdlora.theory.errors import pretrain_test_error

    n_mc, seed = int(options.get("n_mc", DEFAULT_N_MC)), int(options.get("seed", 0))
    bstar, pre = _beta_star(params, n_mc, seed)
    b = params.beta * bstar
    e, se = pretrain_test_error(
        params.activation, params.tokens, params.Q0, b * b * pre.Q, b * pre.M, params.noise, n_mc=n_mc, seed=seed
    )
    e1, se1 = pretrain_test_error(
        params.activation, params.tokens, params.Q0, pre.Q, pre.M, params.noise, n_mc=n_mc, seed=seed
    )
    return {
        "recalibrated_test_error": e,
        "recalibrated_test_error_se": se,
        "pretrain_test_error": e1,
        "pretrain_test_error_se": se1,
        "beta_star": bstar,
        "beta_factor": params.beta,
        "beta_used": b,
        "Q": pre.Q,
        "M": pre.M,
        "V": pre.V,
        "converged": pre.converged,
        "residual": pre.residual,
        "iterations": pre.iterations,
    }


def rank_optimal_theory_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """E' at the rank-r theory's optimal lam' (figure "rank", panel c): :func:`hdlora.experiments.optimize.optimize`
    over lam_ft at the given lora_rank (the lam_ft of ``params`` is replaced by the search).

    Options: n_mc, seed, n_grid (coarse grid of the search), tol (on log10 lam'), lam_ft_low, lam_ft_high (bounds),
    max_solves, max_iter (fixed-point iterations per solve: a non-converged solve is never chosen, so a lower cap
    only stops hopeless solves earlier; the converged rank-r solves measured took <= 60 iterations).
    The result: the optimised ``finetune_test_error`` and the solution there (overlap, converged, replicon_ok,
    winner, winner_status), ``lam_ft_opt``, ``lam_ft_at_bound``, ``n_solves``, ``n_not_converged``.
    """
    import warnings

    from hdlora.experiments.optimize import optimize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = optimize(
            params,
            "finetune_test_error",
            ("lam_ft",),
            bounds={"lam_ft": (float(options.get("lam_ft_low", 1e-2)), float(options.get("lam_ft_high", 3.0)))},
            n_mc=int(options.get("n_mc", DEFAULT_N_MC)),
            seed=int(options.get("seed", 0)),
            tol=float(options.get("tol", 0.05)),
            n_grid=int(options.get("n_grid", 4)),
            max_solves=int(options.get("max_solves", 40)),
            max_iter=int(options.get("max_iter", 500)),
            warn=False,
        )
    sol = res.solution or {}
    out = {k: sol.get(k) for k in ("overlap", "replicon_ok", "winner", "winner_status", "finetune_train_error")}
    out.update(
        finetune_test_error=res.value,
        finetune_test_error_mc_se=res.value_se,
        converged=res.converged,
        lam_ft_opt=res.optimum.get("lam_ft"),
        lam_ft_at_bound=res.at_bound.get("lam_ft", False),
        n_solves=res.n_solves,
        n_not_converged=res.n_not_converged,
    )
    return out


def _check_rank_optimal(options: Mapping[str, Any]) -> None:
    allowed = {"n_mc", "seed", "n_grid", "tol", "lam_ft_low", "lam_ft_high", "max_solves", "max_iter"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the rank-optimal task; allowed: {sorted(allowed)}")


rank_optimal_theory_task.check_options = _check_rank_optimal  # type: ignore[attr-defined]
