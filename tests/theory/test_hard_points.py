"""Points of the phase diagram where the damped iteration failed, solved by the engine (issue 10).

Before the fixed-point loop became the engine (Anderson mixing, domain, projection; measured on
dfcdafa, the previous commit): the T = 2 fine-tuning point stopped at residual 5.6e-4 after 501
iterations; the small-lambda pre-training at residual 2.6e-5 after 500; the three noiseless
pre-trainings at residual 0.92 after 500.  Exact parameters from the issue, default n_mc = 3e4.
"""

from __future__ import annotations

import pytest

from hdlora import Params
from hdlora.theory import solve
from hdlora.theory.pretrain import solve_pretrain


def test_T2_finetuning_point_converges_and_is_continuous_in_alpha():
    p = Params(activation="softmax", tokens=2, kappa0=0.5, kappa=1, noise=0.5, alpha=0.106693, lam=0.01)
    p = p.replace(alpha_ft=3, lam_ft=0.5)
    r = solve(p, seed=0)
    assert r.converged and r.finetune_residual <= 1e-7 and r.finetune_iterations < 60
    assert r.replicon_finetune < 1.0
    near = solve(p.replace(alpha=0.107), seed=0)  # converged before too
    assert near.converged
    for k in ("q", "m", "v", "Q", "M", "V"):
        a, b = getattr(r, k), getattr(near, k)
        assert abs(a - b) <= 1e-2 * max(1.0, abs(b)), k


def test_small_lambda_pretraining_converges():
    p = Params(activation="softmax", tokens=2, kappa0=0.5, kappa=1, noise=0.5, alpha_ft=3, lam_ft=0.5)
    r = solve_pretrain(p.replace(alpha=0.301575, lam=1e-3))
    assert r.converged and r.residual <= 1e-7 and r.iterations < 100 and r.prox_failures == 0


@pytest.mark.parametrize("kappa0, alpha", [(0.1, 0.029998), (0.1, 0.010075), (2.0, 0.050008)])
def test_noiseless_pretraining_converges(kappa0, alpha):
    p = Params(activation="softmax", tokens=2, kappa=1, noise=0.0, lam=0.01, kappa0=kappa0, alpha=alpha)
    r = solve_pretrain(p)
    assert r.converged and r.residual <= 1e-7 and r.iterations < 100 and r.prox_failures == 0


@pytest.mark.slow
def test_Q0_Q_4_point_has_no_replica_stable_branch():
    """Effective pre-training Q0 = Q = 4, M = 1, Delta = 0, alpha' = 1.5, lam' = 0.5, softmax T = 3: the continuation in
    m finds every fixed point of the sampled map (n_mc = 1e4): a single root, uninformed (m < 0.15), replica-unstable;
    g(m) = m_hat v - m < 0 wherever it is defined for m >= 0.1 up to 0.9, so no informed fixed point exists."""
    import math

    import numpy as np

    from hdlora.theory.branches import finetune_m_scan_effective
    from hdlora.theory.engine import CONVERGED

    p = Params(activation="softmax", tokens=3, noise=0.0, alpha_ft=1.5, lam_ft=0.5)
    s = finetune_m_scan_effective(
        p,
        4.0,
        4.0,
        1.0,
        [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
        n_mc=10_000,
        tol=1e-6,
        root_tol=1e-5,
        edge_bisections=2,
    )
    assert len(s.branches) == 1 and not s.undefined_in_brackets
    (b,) = s.branches
    assert b.m < 0.15 and b.replicon > 1.0 and b.status != CONVERGED
    assert not s.stable
    hi = (s.m >= 0.1) & np.isfinite(s.g)
    assert hi.sum() >= 5 and np.all(s.g[hi] < 0) and math.isfinite(b.objective)
