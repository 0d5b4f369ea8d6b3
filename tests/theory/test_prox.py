"""Tests of the batched proximal operator (eqs. 15-16, 41-42; App. C)."""

import numpy as np
import pytest
from scipy.optimize import minimize

from hdlora.params import ParamError
from hdlora.theory import prox as P
from hdlora.theory.sampling import frozen_fields


def _fields(n, T, seed=0, Q=0.8, M=0.7, A0=2.25):
    f = frozen_fields(n, T, A0, Q, M, seed=seed)
    return f["z_star"], f["z"]


@pytest.mark.parametrize("activation", ["softmax", "linear"])
@pytest.mark.parametrize("T", [2, 3])
def test_derivatives_match_finite_differences(activation, T):
    rng = np.random.default_rng(1)
    L = T * (T + 1) // 2
    h, zs, zt = (rng.standard_normal((4, L)) for _ in range(3))
    V, e = 0.7, 1e-6
    val, g, H = P.pretrain_potential_derivatives(h, zs, zt, V, activation)
    assert np.allclose(val, P.pretrain_potential(h, zs, zt, V, activation), rtol=1e-13, atol=1e-13)
    for i in range(L):
        dh = np.zeros(L)
        dh[i] = e
        vp, gp, _ = P.pretrain_potential_derivatives(h + dh, zs, zt, V, activation)
        vm, gm, _ = P.pretrain_potential_derivatives(h - dh, zs, zt, V, activation)
        assert np.allclose(g[:, i], (vp - vm) / (2 * e), atol=1e-7)
        assert np.allclose(H[:, :, i], (gp - gm) / (2 * e), atol=1e-7)


def test_off_diagonal_entries_count_twice_in_the_loss():
    # ||sigma(h) - sigma(z*)||_F^2 sums all T x T entries: for linear sigma and V -> inf,
    # Psi = -(1/T^2) (sum_diag d^2 + 2 sum_offdiag d^2)
    T = 3
    d = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # upper triangle: (0,0),(0,1),(0,2),(1,1),(1,2),(2,2)
    val = P.pretrain_potential(d, np.zeros_like(d), d, 1e300, "linear")
    assert np.isclose(val[0], -(1 + 16 + 36 + 2 * (4 + 9 + 25)) / T**2)


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("V", [0.05, 1.0, 10.0])
def test_prox_is_a_strict_local_maximum_that_beats_perturbations(T, V):
    zs, zt = _fields(2000, T, seed=T)
    r = P.prox(zs, zt, V)
    assert r.all_converged
    _, g, H = P.pretrain_potential_derivatives(r.x, zs, zt, V, "softmax")
    assert np.max(np.abs(V * 2 * g)) < 1e-8  # stationary (V s grad, s <= 2)
    assert np.all(np.linalg.eigvalsh(H)[:, -1] < 0)  # a maximum
    assert np.allclose(H, r.hessian)
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1e-1, 1.0):
        pert = r.x + scale * rng.standard_normal(r.x.shape)
        assert np.all(P.pretrain_potential(pert, zs, zt, V) <= r.value + 1e-12)


def test_prox_tends_to_z_tilde_as_V_to_0():
    zs, zt = _fields(500, 3)
    for V in (1e-3, 1e-5, 1e-7):
        r = P.prox(zs, zt, V)
        # first order: h = z~ - V s grad l(z~) + O(V^2), |grad l| <= O(1)
        assert np.max(np.abs(r.x - zt)) < 10 * V
        assert np.max(r.replicon) < 1e3 * V**2 + 1e-12  # (V Hess_u)^-1 + I = O(V)
        assert np.allclose(r.jacobian_diag, 1.0, atol=10 * V)


def test_batched_prox_equals_per_sample_scipy():
    zs, zt = _fields(8, 3, seed=5)
    V = 2.0
    r = P.prox(zs, zt, V)
    for i in range(len(zs)):
        best = None
        for x0 in (zt[i], zs[i], np.zeros(6)):
            res = minimize(
                lambda x: -P.pretrain_potential(x[None], zs[i : i + 1], zt[i : i + 1], V)[0],
                x0,
                method="BFGS",
                options={"gtol": 1e-11},
            )
            if best is None or res.fun < best.fun:
                best = res
        assert -best.fun <= r.value[i] + 1e-10
        assert np.allclose(best.x, r.x[i], atol=1e-5)


@pytest.mark.parametrize("T", [2, 3])
def test_linear_closed_form_equals_newton_path(T):
    zs, zt = _fields(1000, T)
    for V in (0.1, 3.0):
        closed = P.prox(zs, zt, V, "linear")
        newton = P.prox(zs, zt, V, "linear", closed_form=False)
        assert newton.all_converged and closed.all_converged
        assert np.allclose(closed.x, newton.x, atol=1e-9)
        # App. C: Prox - z* = (z~ - z*) / (1 + 4V/T^2)  (amplitude exponent -1)
        assert np.allclose(closed.x - zs, (zt - zs) / (1 + 4 * V / T**2), atol=1e-12)
        c = 4 * V / (T**2 + 4 * V)
        assert np.allclose(closed.jacobian_diag, 1 - c)
        assert np.allclose(closed.replicon, zs.shape[1] * c**2)


def test_warm_start_and_jacobian():
    zs, zt = _fields(300, 3, seed=3)
    V = 1.3
    cold = P.prox(zs, zt, V)
    warm = P.prox(zs, zt, V, init=cold.x + 0.05)
    assert warm.all_converged
    assert np.allclose(warm.x, cold.x, atol=1e-9)
    assert warm.iterations < cold.iterations
    e = 1e-6
    for i in range(6):
        zp, zm = zt.copy(), zt.copy()
        zp[:, i] += e
        zm[:, i] -= e
        fd = (P.prox(zs, zp, V, init=cold.x).x[:, i] - P.prox(zs, zm, V, init=cold.x).x[:, i]) / (2 * e)
        assert np.allclose(fd, cold.jacobian_diag[:, i], atol=1e-6)


def test_bad_input():
    zs, zt = _fields(10, 2)
    with pytest.raises(ParamError, match="V"):
        P.prox(zs, zt, 0.0)
    with pytest.raises(ParamError, match="activation"):
        P.prox(zs, zt, 1.0, "relu")
    with pytest.raises(ValueError, match="shape|both"):
        P.prox(zs, zt[:, :2], 1.0)
    with pytest.raises(ValueError, match="T\\(T\\+1\\)/2"):
        P.tokens_from_L(4)


@pytest.mark.parametrize("T", [2, 3])
def test_softmax_prox_at_large_V_converges_to_the_interpolating_projection(T):
    """V ~ 1/lam up to 1e12: the shift along 11^T is fixed analytically (sum (h - z~)/s = 0, the loss is
    invariant along it) and the Newton step is the stopping measure, so every sample converges (the
    residual |V s grad l + d| carries V x rounding); the prox tends to the projection onto sigma(h) = sigma(z*)
    like 1/V, and so does its Jacobian diagonal."""
    from hdlora.theory.sampling import s_ab

    rng = np.random.default_rng(0)
    L = T * (T + 1) // 2
    zs, zt = rng.standard_normal((2000, L)), rng.standard_normal((2000, L))
    s = s_ab(T).astype(float)
    h_inf, jac_inf = P.prox_interpolating(zs, zt)
    errs = []
    for V in (1e4, 1e8, 1e12):
        px = P.prox(zs, zt, V, tol=1e-11)
        assert px.n_failed == 0 and px.n_not_max == 0
        assert np.max(np.abs(np.sum((px.x - zt) / s, axis=1))) < 1e-9 * (1 + np.abs(zt).max())
        errs.append((np.abs(px.x - h_inf).max(), np.abs(px.jacobian_diag - jac_inf).max()))
    for (e0, j0), (e1, j1) in zip(errs, errs[1:]):
        assert e1 < 2e-3 * e0 and j1 < 2e-3 * j0
    assert errs[-1][0] < 1e-6
