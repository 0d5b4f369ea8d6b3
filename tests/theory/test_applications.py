"""Theory vs simulation for the applications: active fine-tuning (Section 4.3, Fig. 4 setting, on an
effective pre-training) and recalibration of the frozen map (eq. 26, Fig. 1 setting).

Tolerances: ``k * sqrt(se_sim^2 + se_theory^2) + finite-D allowance``, with se_sim the
seed-to-seed standard error measured in the test, se_theory the Monte-Carlo spread of the state
evolution over its sample seeds (measured, quoted next to each constant), and the allowance
quoted from measurements at the same D.
"""

import math

import numpy as np
import pytest

from hdlora import Params
from hdlora.simulate import run
from hdlora.theory.applications import active_comparison_effective

FIG4 = dict(alpha=0.1, alpha_ft=3, tokens=3, noise=0.0, lam=0.1, lam_ft=0.5, activation="softmax")
EFF2 = {"Q0": 2.0, "Q": 2.0, "M": 1.0}
COMPARED = ("finetune_test_error", "uniform_finetune_test_error", "overlap", "uniform_overlap")


def _theory_values(r):
    return {
        "finetune_test_error": r.finetune_test_error,
        "uniform_finetune_test_error": r.uniform_finetune_test_error,
        "overlap": r.overlap,
        "uniform_overlap": r.uniform_overlap,
        "delta_finetune_test_error": r.delta_finetune_test_error,
        "delta_overlap": r.delta_overlap,
    }


def _check_active(p, dim, seeds, n_mc, se_theory, allowance, restarts, resolve_gains=True):
    th = _theory_values(active_comparison_effective(p, **EFF2, n_mc=n_mc, seed=0))
    sim = run(p, dim, seeds, effective=EFF2, restarts=restarts)
    report = {k: (sim.mean[k], sim.se[k], th[k]) for k in COMPARED + ("delta_finetune_test_error", "delta_overlap")}
    for k in COMPARED:
        tol = 4 * math.hypot(sim.se[k], se_theory[k]) + allowance[k]
        assert abs(sim.mean[k] - th[k]) < tol, (k, tol, report)
    # the selected set's effective noise lies between eq. 28 and eq. 25
    assert 1.5 < sim.mean["delta_eff_measured"] < sim.mean["uniform_delta_eff_measured"], report
    if not resolve_gains:
        return report
    # the paired gains of Algorithm 1 are resolved in the simulation and have the theory's sign
    assert sim.mean["delta_finetune_test_error"] > 3 * sim.se["delta_finetune_test_error"], report
    assert sim.mean["delta_overlap"] > 3 * sim.se["delta_overlap"], report
    assert th["delta_finetune_test_error"] > 0 and th["delta_overlap"] > 0, report
    return report


def test_active_theory_vs_simulation_small():
    """Fast version: D = 200, 3 seeds, rho = 0.1 (alpha_bar' = 30), theory n_mc = 6000.  Values
    only: the gains themselves (Delta E' ~ 0.01, 1% of E') are not resolved at this size (measured
    at D = 300, 4 seeds: Delta E' = 0.0017 +- 0.0030), they are checked at D = 1000 (slow test).
    Theory MC spread over sample seeds at n_mc = 1e4 (measured, seeds 0-1): E' ~0.006, o_w ~0.004
    (active), ~0.009 (uniform); ~1.3x that at 6000.  Finite D: at D = 300 (4 seeds) sim - theory was
    -0.008 (E' active, s.e. 0.006); we allow 0.02 beyond 4 combined s.e."""
    p = Params(**FIG4, active_pool=30.0)
    _check_active(
        p,
        200,
        3,
        6_000,
        se_theory={
            "finetune_test_error": 0.008,
            "uniform_finetune_test_error": 0.008,
            "overlap": 0.005,
            "uniform_overlap": 0.012,
        },
        allowance={k: 0.02 for k in COMPARED},
        restarts=1,
        resolve_gains=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("pool", [30.0, 10.0])
def test_active_theory_vs_simulation_D1000(pool):
    """The issue's check: D = 1000 (N' = 3000, pool 1e4 or 3e4), 5 seeds, rho in {0.1, 0.3},
    theory n_mc = 3e4.  Measured theory spread over sample seeds 0-2 at n_mc = 3e4: E' 0.001
    (active), 0.0025 (uniform); o_w 0.003 (active), 0.0045 (uniform).  Measured at rho = 0.1:
    sim - theory = -0.0047 (E' active, sim s.e. 0.0027), -0.0025 (E' uniform, s.e. 0.0037),
    -0.0017 (o_w active, s.e. 0.0018), -0.0072 (o_w uniform, s.e. 0.0048): we allow 0.005 beyond
    4 combined s.e. for the O(1/sqrt(D)) finite-size bias."""
    p = Params(**FIG4, active_pool=pool)
    _check_active(
        p,
        1000,
        5,
        30_000,
        se_theory={
            "finetune_test_error": 0.001,
            "uniform_finetune_test_error": 0.0025,
            "overlap": 0.003,
            "uniform_overlap": 0.0045,
        },
        allowance={k: 0.005 for k in COMPARED},
        restarts=2,
    )


# ----------------------------------------------------------------------------- recalibration (eq. 26)
FIG1 = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5)


def _check_recalibration(p, dim, seeds, k_se, allowance, n_mc=30000):
    """beta in {1, beta*_theory}: E' and o_w vs theory, and the paired change E'(1) - E'(beta*)."""
    from hdlora.theory import solve

    th_opt = solve(p, optimal_beta=True, n_mc=n_mc)
    th_one = solve(p, n_mc=n_mc, init=th_opt)
    b = th_opt.params["beta"]
    one = run(p, dim, seeds, restarts=1)
    opt = run(p.replace(beta=b), dim, seeds, restarts=1)
    d_sim = np.array(
        [r1["finetune_test_error"] - r2["finetune_test_error"] for r1, r2 in zip(one.per_seed, opt.per_seed)]
    )
    dd_sim = np.array([r1["delta_eff"] - r2["delta_eff"] for r1, r2 in zip(one.per_seed, opt.per_seed)])
    d_th = th_one.finetune_test_error - th_opt.finetune_test_error
    se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))  # noqa: E731
    report = {
        "beta*": b,
        "E'(1)": (one["finetune_test_error"], one.se["finetune_test_error"], th_one.finetune_test_error),
        "E'(b*)": (opt["finetune_test_error"], opt.se["finetune_test_error"], th_opt.finetune_test_error),
        "dE'": (d_sim.mean(), se(d_sim), d_th),
        "dDeff": (dd_sim.mean(), se(dd_sim), th_one.delta_eff - th_opt.delta_eff),
    }
    for sim, th in ((one, th_one), (opt, th_opt)):
        for k in ("finetune_test_error", "overlap"):
            assert abs(sim[k] - getattr(th, k)) < k_se * sim.se[k] + allowance[k], (k, report)
    # the paired change: same pre-training, same data and test sets, only beta differs
    assert abs(d_sim.mean() - d_th) < k_se * se(d_sim) + allowance["delta"], report
    # eq. 26: Delta_eff(beta*) <= Delta_eff(1) in the theory and, seed by seed, from the measured Q, M
    assert th_opt.delta_eff <= th_one.delta_eff + 1e-12 and np.all(dd_sim > 0), report
    return report


@pytest.mark.slow
def test_recalibration_theory_vs_simulation_linear_D80():
    """Linear sigma (~110 s on the shared 2-core machine, hence slow) (closed-form theory), lam = 0.1, lam' = 1, D = 80, 3 seeds.
    Theory: beta* = 1.113, E' 1.0107 (beta = 1) -> 0.9881 (beta*).  Finite D: at D = 150 one seed
    gave E'(beta*) = 1.058 with Delta_eff 0.705 vs theory 0.679 (pre-training Q, M ~4% below
    theory at finite D, see test_pretrain_theory.py), i.e. +0.035 on E' from Delta_eff alone;
    at D = 80 we allow 0.1 on E', 0.03 on o_w and 0.02 on the paired change, beyond 4 s.e."""
    p = Params(**FIG1, lam=0.1, lam_ft=1.0, activation="linear")
    _check_recalibration(p, 80, 3, 4, {"finetune_test_error": 0.1, "overlap": 0.03, "delta": 0.02})


@pytest.mark.slow
def test_recalibration_theory_vs_simulation_softmax_D150():
    """Softmax, lam = 0.01, lam' = 1, D = 150, 4 seeds (Fig. 1 setting).  Measured: beta* = 1.060,
    sim E'(1) = 0.4363 +- 0.0027 (theory 0.4359), E'(beta*) = 0.4471 +- 0.0031 (theory 0.4473),
    paired E'(1) - E'(beta*) = -0.0109 +- 0.0004 (theory -0.0114): recalibration at beta* *raises*
    E' for softmax although it lowers Delta_eff (paired 0.0038 +- 0.0009).  Allowances: 0.01 on E'
    and o_w (finite D, O(1/sqrt(D)) in Q, M, q0), 0.002 on the paired change."""
    p = Params(**FIG1, lam=0.01, lam_ft=1.0, activation="softmax")
    _check_recalibration(p, 150, 4, 4, {"finetune_test_error": 0.01, "overlap": 0.03, "delta": 0.002})
