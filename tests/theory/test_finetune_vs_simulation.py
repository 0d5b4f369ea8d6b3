"""Fine-tuning theory (Result 5) against the finite-D simulator in effective-pre-training mode.

Frozen fields drawn from Q with Q0 = Q = 2, M = 1 (Figs. 2, 4, 5 protocol), T = 3, alpha' = 3.
Measured (8 seeds, sequence loss, informed + 2 random starts, lowest objective kept):

  linear, Delta = 0.5, lam' = 0.5, D = 200:  overlap 0.9645 +- 0.0033, E' 3.199 +- 0.015,
      L' 2.802 +- 0.019;  D = 500: overlap 0.9631 +- 0.0016, E' 3.190 +- 0.013, L' 2.830 +- 0.010,
      E'' 4.35 +- 0.05.
  theory (n_mc = 3e4, seeds 0-2): overlap 0.9601-0.9616, E' 3.200-3.205, L' 2.826-2.845,
      E'' = 4.32 (closed form at q = 0.99).

Softmax disagreements measured at D = 500-1000 are recorded in the report / VALIDATION, and
tested in the slow test only where the agreement holds.
"""

import math

import pytest

from hdlora import Params
from hdlora.theory.finetune import solve_finetune_effective

EFF = {"Q0": 2.0, "Q": 2.0, "M": 1.0}


def _compare(theory, sim, keys, n_se=3.0, theory_sd=None):
    theory_sd = theory_sd or {}
    for k in keys:
        t = getattr(theory, k)
        s, se = sim.mean[k], sim.se[k]
        tol = n_se * math.hypot(se, theory_sd.get(k, 0.0))
        assert abs(t - s) < tol, (k, t, s, se, tol)


def test_linear_theory_vs_simulation_small_D():
    simulate = pytest.importorskip("hdlora.simulate")
    p = Params(tokens=3, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation="linear")
    r = solve_finetune_effective(p, **EFF, n_mc=30_000, seed=0)
    s = simulate.run(p, 200, 8, effective=EFF)
    # tolerance: 3 x (simulation seed se (measured above) (+) theory seed-to-seed sd at n_mc = 3e4,
    # measured over seeds 0-2: overlap 8e-4, E' 3e-3, L' 1e-2); finite-D shifts at D = 200 are
    # within these (D = 200 and D = 500 agree within their se).
    _compare(
        r,
        s,
        ["overlap", "finetune_test_error", "finetune_train_error"],
        theory_sd={"overlap": 8e-4, "finetune_test_error": 3e-3, "finetune_train_error": 1e-2},
    )
    # the branch's objective alpha' L' + lam' q (per D) against the simulator's final objective of the kept start,
    # (sum_mu loss_mu + lam' ||w||^2) / N' = L'_train + lam' q / alpha' (N' = alpha' D, ||w||^2 = q D)
    t, sm, se = r.objective / p.alpha_ft, s.mean["finetune_objective"], s.se["finetune_objective"]
    assert abs(t - sm) < 3.0 * math.hypot(se, 1e-2), (t, sm, se)


@pytest.mark.slow
def test_linear_theory_vs_simulation_D500():
    simulate = pytest.importorskip("hdlora.simulate")
    p = Params(tokens=3, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation="linear")
    r = solve_finetune_effective(p, **EFF, n_mc=30_000, seed=0)
    s = simulate.run(p, 500, 8, effective=EFF)
    _compare(
        r,
        s,
        ["overlap", "finetune_test_error", "finetune_train_error", "forgetting_error", "q", "m"],
        theory_sd={
            "overlap": 8e-4,
            "finetune_test_error": 3e-3,
            "finetune_train_error": 1e-2,
            "q": 7e-3,
            "m": 4e-3,
            "forgetting_error": 2e-2,
        },
    )


@pytest.mark.slow
def test_softmax_theory_vs_simulation_D1000_attention_loss():
    """Softmax main point (Delta = 0.5, lam' = 0.5), attention-matrix loss (eq. 30, the loss of the
    theory; removes the O(1/D) sequence-loss term).  Measured, seeds 0-11, D = 1000: overlap
    0.8665 +- 0.0031, E' 0.9526 +- 0.0039, L' 0.7658 +- 0.0021 (D = 500, 10 seeds: overlap
    0.8687 +- 0.0060).  Theory (qmc, n = 32768, seed 0): overlap 0.8616, E' 0.9597, L' 0.7656.
    Theory seed-to-seed sd at this n (measured: overlap 0.0041 at n = 8192 qmc -> 0.002; E' 0.004
    incl. its test-sample se 0.0038; L' 0.003).  Tolerance 3 x hypot(sim se, theory sd).  The
    overlap gap (0.005, 1.6 sigma) is the remaining systematic offset, not resolved here."""
    simulate = pytest.importorskip("hdlora.simulate")
    p = Params(tokens=3, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation="softmax")
    r = solve_finetune_effective(p, **EFF, n_mc=32768, seed=0, method="qmc")
    assert r.converged
    s = simulate.run(p, 1000, 12, loss="attention", effective=EFF)
    _compare(
        r,
        s,
        ["overlap", "finetune_test_error", "finetune_train_error"],
        theory_sd={"overlap": 2e-3, "finetune_test_error": 4e-3, "finetune_train_error": 3e-3},
    )


# ---------------------------------------------------------------- the T = 2 LoRA-only corner
# Softmax, T = 2, LoRA only (W_hat = 0, kappa0 = 0.5 so Q0 = 1.5), Delta = 0.5, alpha' = 3.
# Measured (VALIDATION 1c item 4): theory and simulation agree where the replicon is < 1
# (lam' = 1) and part where the theory's own flags go up (lam' <= 0.3).
T2 = {"tokens": 2, "kappa0": 0.5, "noise": 0.5, "alpha_ft": 3.0, "lam": math.inf}


def test_softmax_T2_small_lam_ft_is_flagged_outside_replica_symmetry():
    """lam' = 0.05: replicon (eq. 78) >= 1 at every sample size / seed measured (1.6-2.4 at
    n = 4000-8000, 3.8 at 3e4), so the result must carry the flag."""
    p = Params(lam_ft=0.05, **T2)
    with pytest.warns(RuntimeWarning):
        r = solve_finetune_effective(p, p.Q0, 0.0, 0.0, n_mc=4000, seed=0)
    assert r.replicon_unstable


def test_softmax_T2_lora_only_agrees_where_replicon_holds():
    """lam' = 1: replicon 0.51.  Measured, D = 500, 6 seeds, attention loss: overlap 0.8148 +- 0.0056,
    E' 0.4561 +- 0.0018, L' 0.3753 +- 0.0021, q 0.2259 +- 0.0041, m 0.3881 +- 0.0074; theory
    (n = 3e4, seed 0) 0.8022, 0.4599, 0.3785, 0.2247, 0.3803.  Theory seed sd at n = 3e4 taken as
    that of the T = 3 points (overlap 2e-3 .. 6e-3, E' 2e-3); tolerance 3 x hypot(sim se, theory sd)."""
    simulate = pytest.importorskip("hdlora.simulate")
    p = Params(lam_ft=1.0, **T2)
    law = {"Q0": p.Q0, "Q": 0.0, "M": 0.0}
    r = solve_finetune_effective(p, **law, n_mc=30_000, seed=0)
    assert r.converged and not r.replicon_unstable
    s = simulate.run(p, 500, 6, loss="attention", effective=law)
    _compare(
        r,
        s,
        ["overlap", "finetune_test_error", "finetune_train_error", "q", "m"],
        theory_sd={"overlap": 4e-3, "finetune_test_error": 2e-3, "finetune_train_error": 2e-3, "q": 4e-3, "m": 4e-3},
    )
