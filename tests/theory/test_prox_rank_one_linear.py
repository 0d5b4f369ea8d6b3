"""The exact global prox of the linear fine-tuning potential (secular equation) and the linear
fine-tuning state evolution built on it."""

import itertools
import math

import numpy as np
import pytest

from hdlora import ParamError, Params
from hdlora.theory.finetune import finetune_potential_derivatives, prox_psi, solve_finetune, solve_finetune_effective
from hdlora.theory.prox_rank_one_linear import LinearRankOneProx, solve_secular
from hdlora.theory.sampling import frozen_fields, to_sym


def _samples(n, T, Q0=2.0, Q=2.0, M=1.0, noise=0.5, seed=1):
    f = frozen_fields(n, T, Q0 + noise / 2, Q, M, seed=seed)
    Zs, Zb = to_sym(f["z_star"], T), to_sym(f["z"], T)
    rng = np.random.default_rng(seed + 100)
    cs, ze = rng.standard_normal((n, T)), rng.standard_normal((n, T))
    return Zs, Zb, cs, ze


def _exact(Zs, Zb, cs, ze, m, q, v):
    P = LinearRankOneProx(Zb - Zs - cs[:, :, None] * cs[:, None, :], cs, ze)
    out = P(m, q, v)
    return P, out, P.to_original(out["y"])


# (T, law (Q0, Q, M, Delta), state (m, q, v)): moderate, large v (strongly non-concave psi),
# large effective noise, LoRA only (z = 0), T = 2 and T = 4
CASES = [
    (3, (2.0, 2.0, 1.0, 0.5), (0.7, 0.8, 0.3)),
    (3, (2.0, 2.0, 1.0, 0.5), (0.1, 0.2, 2.0)),
    (3, (6.0, 6.0, 1.0, 2.0), (0.3, 0.5, 5.0)),
    (3, (2.0, 0.0, 0.0, 0.5), (0.5, 0.6, 0.05)),
    (2, (1.5, 0.0, 0.0, 0.5), (0.9, 1.2, 0.4)),
    (4, (2.0, 1.5, 1.0, 1.0), (0.5, 0.7, 1.0)),
]


@pytest.mark.parametrize("T,law,state", CASES)
def test_exact_prox_is_the_global_maximiser_found_by_the_newton_search(T, law, state):
    """Against the independent multi-start Newton search of prox_psi (11+ starts per sample):
    the secular solution is a stationary point with -Hessian >= 0 (d >= 0), never has a lower psi
    than the search, and coincides with it (psi to 1e-10, chi where psi agrees)."""
    n = 3000
    Q0, Q, M, noise = law
    m, q, v = state
    Zs, Zb, cs, ze = _samples(n, T, Q0, Q, M, noise)
    P, out, chi = _exact(Zs, Zb, cs, ze, m, q, v)
    eye = np.eye(T)
    ct = m * cs + math.sqrt(q - m * m) * ze
    Y_arg = Zs + cs[:, :, None] * cs[:, None, :] - eye
    Zq = Zb - q * eye
    psi, grad, hess, dq = finetune_potential_derivatives(chi, Zq, Y_arg / T, ct, v, "linear")
    gscale = 1.0 + np.linalg.norm(ct, axis=1) / v
    assert np.max(np.linalg.norm(grad, axis=1) / gscale) < 1e-9
    assert out["d"].min() >= 0.0
    np.testing.assert_allclose(out["psi"], psi, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(out["dpsi_dq"], dq, rtol=1e-10, atol=1e-10)
    search = prox_psi(ct, Zq, Y_arg / T, v, "linear", Y_arg=Y_arg)
    gap = psi - search.value
    assert gap.min() > -1e-10 * (1.0 + np.abs(psi).max())  # never worse than the search
    same = np.abs(gap) < 1e-10 * (1.0 + np.abs(psi))
    assert same.mean() > 0.999  # the search finds the same maximiser
    np.testing.assert_allclose(chi[same], search.x[same], atol=1e-6)
    # C = v (D + 2 c y y^T)^{-1} (eq. 66) in the token basis equals -H^{-1} at the maximiser
    C = v * P.matrix_to_original(P.curvature(out))
    np.testing.assert_allclose(C[same], np.linalg.inv(-hess[same]), rtol=1e-6, atol=1e-8)


def test_exact_prox_beats_a_dense_grid_T2():
    """T = 2: brute force over a 401 x 401 grid (then the best grid point polished by the search)
    never finds a larger psi than the secular solution."""
    T, n = 2, 40
    Zs, Zb, cs, ze = _samples(n, T, 2.0, 0.0, 0.0, 0.5, seed=7)
    m, q, v = 0.4, 0.6, 3.0
    P, out, chi = _exact(Zs, Zb, cs, ze, m, q, v)
    eye = np.eye(T)
    ct = m * cs + math.sqrt(q - m * m) * ze
    Y_arg = Zs + cs[:, :, None] * cs[:, None, :] - eye
    Zq = Zb - q * eye
    # psi is genuinely non-concave here: Newton started from -chi_prox stops in a worse local
    # maximum on most samples (measured: 78 % of 400 samples at these settings)
    other = prox_psi(ct, Zq, Y_arg / T, v, "linear", starts=[-chi])
    assert np.mean(out["psi"] - other.value > 1e-8) > 0.5
    g = np.linspace(-5, 5, 401)
    grid = np.array(list(itertools.product(g, g)))  # (G, 2)
    for i in range(n):
        G = grid.shape[0]
        vals = finetune_potential_derivatives(
            grid,
            np.broadcast_to(Zq[i], (G, T, T)),
            np.broadcast_to(Y_arg[i] / T, (G, T, T)),
            np.broadcast_to(ct[i], (G, T)),
            v,
            "linear",
            order=0,
        )
        assert vals.max() <= out["psi"][i] + 1e-12 * (1 + abs(out["psi"][i]))


def test_hard_case_is_handled():
    """chi_tilde orthogonal to the bottom eigenvector of B, with phi(r_lo) < r_lo: there is no root
    of the secular equation beyond the pole, the maximiser has r = r_lo (the 'hard case' of
    trust-region subproblems); the returned point is still stationary with d >= 0 and |y|^2 = r."""
    c = 1.0
    b = np.array([[-3.0, 0.5, 2.0], [-3.0, 0.5, 2.0], [-1.5, -1.4999, 1.0]])
    yt = np.array([[0.0, 0.3, 0.1], [1e-14, 0.3, 0.1], [0.0, 0.2, 0.0]])
    y, r, d, _ = solve_secular(b, yt, c)
    grad = d * y - yt  # v * (-grad psi) in the eigenbasis
    assert np.abs(grad).max() < 1e-10
    assert d.min() >= 0
    np.testing.assert_allclose(r, (y * y).sum(axis=1))
    # first row: r_lo = 2, the bottom component carries |y_0|^2 = r - (others)^2 > 0
    assert r[0] == pytest.approx(2.0) and abs(y[0, 0]) > 1.0
    # sign continuity: a tiny positive component gives the positive branch
    assert y[1, 0] > 0


def test_warm_started_secular_root_equals_cold_one():
    Zs, Zb, cs, ze = _samples(5000, 3)
    P = LinearRankOneProx(Zb - Zs - cs[:, :, None] * cs[:, None, :], cs, ze)
    P(0.6, 0.9, 0.2)
    warm = P(0.65, 0.95, 0.25)  # warm start from the previous r
    cold = LinearRankOneProx(Zb - Zs - cs[:, :, None] * cs[:, None, :], cs, ze)(0.65, 0.95, 0.25)
    np.testing.assert_allclose(warm["y"], cold["y"], atol=1e-12)


@pytest.mark.parametrize("e", [0, 1])
def test_linear_state_evolution_exact_prox_equals_newton_search(e):
    """The whole fine-tuning fixed point is the same with the exact prox and with the multi-start
    Newton search (same samples): the search was measured to find the global maximiser on every
    sample here, so any difference would be an error of the secular route."""
    T = 3
    p = Params(tokens=T, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation="linear", reuse=bool(e))
    f = frozen_fields(4000, T, 2.25, 2.0, 1.0, seed=5)
    kw = dict(Q0=2.0, Q=2.0, M=1.0, seed=3, tol=1e-10)
    a = solve_finetune(p, f["z_star"], f["z"], linear_prox="exact", **kw)
    b = solve_finetune(p, f["z_star"], f["z"], linear_prox="search", **kw)
    assert a.converged and b.converged
    for k in ("q", "m", "v", "qhat", "mhat", "vhat", "finetune_train_error", "replicon_finetune"):
        assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-7, abs=1e-10), k
    assert a.prox_failed == 0 and a.prox_not_max == 0


def test_lora_only_T2_small_lam_ft_converges_from_the_default_start():
    """Linear LoRA only (W_hat = 0), T = 2, lam' = 0.05: the former cold start v = 1/(2 lam' + 1)
    sent v to infinity at the first step; the small-v start reaches a stable fixed point (replicon < 1),
    the same one as from other starts."""
    p = Params(tokens=2, noise=0.5, alpha_ft=3.0, lam_ft=0.05, activation="linear", lam=math.inf)
    r = solve_finetune_effective(p, p.Q0, 0.0, 0.0, n_mc=8000)
    assert r.converged and r.replicon_finetune < 1
    r2 = solve_finetune_effective(p, p.Q0, 0.0, 0.0, n_mc=8000, init={"m": 0.9, "q": 1.0, "v": 0.01})
    assert r2.q == pytest.approx(r.q, rel=1e-6) and r2.m == pytest.approx(r.m, rel=1e-6)


def test_bad_linear_prox_name():
    p = Params(tokens=3, activation="linear")
    f = frozen_fields(100, 3, 2.25, 2.0, 1.0)
    with pytest.raises(ParamError, match="linear_prox"):
        solve_finetune(p, f["z_star"], f["z"], Q0=2.0, Q=2.0, M=1.0, linear_prox="closed")


def test_curvature_and_loss_in_the_eigenbasis():
    """C / v (Sherman-Morrison, LAPACK near the hard case) equals LAPACK's inverse of D + 2 c y y^T on every
    sample, also on samples pushed near the hard case (smallest d below CURVATURE_SM_MIN_D); ``loss`` is the
    train loss ||B + chi chi^T||_F^2 / T^2 of eq. 20 evaluated in the token basis."""
    from hdlora.theory import prox_rank_one_linear as L

    T = 3
    Zs, Zb, cs, ze = _samples(4000, T)
    m, q, v = 0.3, 0.5, 5.0  # large v: many samples with a small d
    P, out, chi = _exact(Zs, Zb, cs, ze, m, q, v)
    y, d, c = out["y"].T, out["d"].T, out["c"]
    near = d.min(axis=1) < L.CURVATURE_SM_MIN_D
    assert 0 < near.sum() < near.size  # both inverses are exercised
    Mx = 2.0 * c * y[:, :, None] * y[:, None, :] + d[:, :, None] * np.eye(T)
    Cv = P.curvature(out)
    ref = np.linalg.inv(Mx)
    scale = np.abs(ref).max(axis=(1, 2))[:, None, None]
    assert np.all(np.abs(Cv - ref) <= 1e-11 * scale)
    B = Zb - Zs - cs[:, :, None] * cs[:, None, :] - (q - 1.0) * np.eye(T)
    loss = (((B + chi[:, :, None] * chi[:, None, :]) / T) ** 2).sum(axis=(1, 2))
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-12, atol=1e-14)
