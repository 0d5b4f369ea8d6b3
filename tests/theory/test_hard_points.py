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
