"""Rank-r fine-tuning state evolution (src/hdlora/theory/finetune_rank_r.py, prox_rank_r.py; docs/theory/rank_r.md)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from hdlora.params import Params
from hdlora.theory import finetune_rank_r as fr
from hdlora.theory import newton as nw
from hdlora.theory import prox_rank_r as pr
from hdlora.theory.finetune import solve_finetune
from hdlora.theory.sampling import frozen_fields


def _rand_sym(rng, k, shift=0.0):
    A = rng.standard_normal((k, k))
    return A @ A.T / k + shift * np.eye(k)


def _channel_data(rng, n, T, r, act):
    ct = rng.standard_normal((n, T, r))
    Zq = rng.standard_normal((n, T, T))
    Zq = Zq + np.swapaxes(Zq, 1, 2)
    Ya = Zq + 1.5 * rng.standard_normal((n, T, T))
    Ya = 0.5 * (Ya + np.swapaxes(Ya, 1, 2))
    if act == "linear":
        Y = Ya / T
    else:
        Y = np.exp(Ya - Ya.max(axis=2, keepdims=True))
        Y /= Y.sum(axis=2, keepdims=True)
    return ct, Zq, Y, Ya


def _psi(chi, ct, Zq, Y, v, act):
    """psi (eq. 63 at rank r) directly from its definition, one sample."""
    T = Zq.shape[0]
    X = Zq + chi @ chi.T
    if act == "linear":
        P = X / T
    else:
        P = np.exp(X - X.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
    D = chi - ct
    return -np.sum((P - Y) ** 2) - 0.5 * np.trace(D @ np.linalg.solve(v, D.T))


# ----------------------------------------------------------------------------------------
# r = r* = 1: the generic path reproduces the rank-one solve_finetune
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "act,n,form",
    [
        ("linear", 600, "direct"),
        ("linear", 400, "stein"),
        pytest.param("softmax", 300, "direct", marks=pytest.mark.slow),
    ],
)
def test_rank_one_reduction(act, n, form):
    p = Params(activation=act, tokens=3, alpha_ft=3.0, lam_ft=0.5, noise=0.5)
    f = frozen_fields(n, 3, 2.25, 2.0, 1.0, seed=1)
    a = solve_finetune(p, f["z_star"], f["z"], tol=1e-11, seed=0, max_iter=2000, form=form, warn=False)
    b = fr.solve_finetune_rank_r(p, f["z_star"], f["z"], tol=1e-11, seed=0, max_iter=2000, form=form)
    assert a.converged and b.converged
    assert b.prox_failed == 0 and b.prox_not_max == 0
    diffs = {
        "q": abs(a.q - b.q[0][0]),
        "m": abs(a.m - b.m[0][0]),
        "v": abs(a.v - b.v[0][0]),
        "E'": abs(a.finetune_test_error - b.finetune_test_error),
        "replicon": abs(a.replicon_finetune - b.replicon_finetune),
    }
    assert max(diffs.values()) < 1e-8, diffs
    assert abs(b.overlap - a.overlap) < 1e-8


# ----------------------------------------------------------------------------------------
# the potential and the prox
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["linear", "softmax"])
@pytest.mark.parametrize("T,r", [(3, 2), (2, 3)])
def test_loss_derivatives_finite_differences(act, T, r):
    rng = np.random.default_rng(1)
    n = 4
    xi = rng.standard_normal((n, T, r))
    _ct, Zq, Y, _ = _channel_data(rng, n, T, r, act)
    loss, g, H, dq = pr.loss_derivatives(xi, Zq, Y, act)
    eps = 1e-6
    for i in range(T * r):
        e = np.zeros(T * r)
        e[i] = eps
        e = e.reshape(T, r)
        lp, gp = pr.loss_derivatives(xi + e, Zq, Y, act, 1)
        lm, gm = pr.loss_derivatives(xi - e, Zq, Y, act, 1)
        np.testing.assert_allclose((lp - lm) / (2 * eps), g.reshape(n, -1)[:, i], atol=1e-7)
        np.testing.assert_allclose(((gp - gm) / (2 * eps)).reshape(n, -1), H[:, :, i], atol=1e-7)
    # d psi / d tr q = Tr G: psi = -l(Zq + xi xi^T) with Zq = z - tr(q) I
    lp = pr.loss_derivatives(xi, Zq - eps * np.eye(T), Y, act, 0)
    lm = pr.loss_derivatives(xi, Zq + eps * np.eye(T), Y, act, 0)
    np.testing.assert_allclose(-(lp - lm) / (2 * eps), dq, atol=1e-7)


@pytest.mark.parametrize("act", ["linear", "softmax"])
def test_prox_optimality_and_multistart(act):
    rng = np.random.default_rng(2)
    n, T, r = 60, 3, 2
    ct, Zq, Y, Ya = _channel_data(rng, n, T, r, act)
    v = np.array([[0.6, 0.2], [0.2, 0.4]])
    p = pr.prox_rank_r(ct, Zq, Y, v, act, Y_arg=Ya)
    assert p["converged"].all() and p["n_not_max"] == 0
    chi = p["chi"]
    # stationarity of psi at the returned chi (in the original coordinates)
    _l, gl = pr.loss_derivatives(chi, Zq, Y, act, 1)
    grad_psi = -gl - (chi - ct) @ np.linalg.inv(v)
    scale = 1.0 + np.abs(ct).max(axis=(1, 2)) / v.min()
    assert np.max(np.abs(grad_psi).max(axis=(1, 2)) / scale) < 1e-7
    for i in range(n):
        assert abs(_psi(chi[i], ct[i], Zq[i], Y[i], v, act) - p["psi"][i]) < 1e-10 * (1 + abs(p["psi"][i]))
    # never below a multi-start BFGS search (independent optimiser) on a subsample
    for i in range(0, n, 10):

        def negpsi(x):
            return -_psi(x.reshape(T, r), ct[i], Zq[i], Y[i], v, act)

        best = np.inf
        for _s in range(12):
            x0 = rng.standard_normal(T * r) * (1 + np.abs(ct[i]).max()) * rng.uniform(0.3, 2.0)
            best = min(best, minimize(negpsi, x0, method="BFGS", options={"gtol": 1e-10}).fun)
        assert p["psi"][i] >= -best - 1e-8 * (1 + abs(best)), (i, p["psi"][i], -best)


@pytest.mark.parametrize("act", ["linear", "softmax"])
def test_prox_rotates_with_chi_tilde(act):
    """chi_tilde -> chi_tilde O (and v -> O^T v O): the returned chi rotates, psi is unchanged."""
    rng = np.random.default_rng(3)
    n, T, r = 80, 3, 2
    ct, Zq, Y, Ya = _channel_data(rng, n, T, r, act)
    th = 0.7
    O = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    for v in (0.5 * np.eye(r), np.array([[0.6, 0.2], [0.2, 0.4]])):
        p1 = pr.prox_rank_r(ct, Zq, Y, v, act, Y_arg=Ya)
        p2 = pr.prox_rank_r(ct @ O, Zq, Y, O.T @ v @ O, act, Y_arg=Ya)
        np.testing.assert_allclose(p2["psi"], p1["psi"], rtol=1e-10, atol=1e-10)
        # the maximiser is unique up to ties between global maxima: compare where psi has one basin
        np.testing.assert_allclose(p2["chi"], p1["chi"] @ O, atol=1e-6)


# ----------------------------------------------------------------------------------------
# input channel, matrix functions, gauge
# ----------------------------------------------------------------------------------------
def test_ridge_channel_against_direct_ridge_solve():
    """v = (2 lam' I + v_hat)^-1, m = v m_hat q0, q = v (m_hat q0 m_hat^T + q_hat) v: the overlaps of the
    solution of the decoupled ridge problem max_W -lam'||W||^2 - tr(W v_hat W^T)/2 + tr(W^T B),
    B = W* m_hat^T + Xi q_hat^{1/2}, with samples whitened so that W*^T W*/D = q0, Xi^T Xi/D = I, Xi^T W* = 0."""
    rng = np.random.default_rng(4)
    r, rs, D, lam = 3, 2, 40, 0.3
    q0 = _rand_sym(rng, rs, 0.5)
    mhat = rng.standard_normal((r, rs))
    qhat = _rand_sym(rng, r, 0.1)
    vhat = _rand_sym(rng, r, 0.2)
    Qm, _ = np.linalg.qr(rng.standard_normal((D, rs + r)))
    Ws = np.sqrt(D) * Qm[:, :rs] @ fr.sqrtm_psd(q0)
    Xi = np.sqrt(D) * Qm[:, rs:]
    B = Ws @ mhat.T + Xi @ fr.sqrtm_psd(qhat)
    # direct solve of the stationarity (2 lam' I (x) I + I (x) v_hat) vec W = vec B, on the stacked system
    A = np.kron(np.eye(D), 2 * lam * np.eye(r) + vhat)
    W = np.linalg.solve(A, B.reshape(-1)).reshape(D, r)
    m, q, v = fr.ridge_channel(mhat, qhat, vhat, lam, q0)
    np.testing.assert_allclose(W.T @ Ws / D, m, atol=1e-12)
    np.testing.assert_allclose(W.T @ W / D, q, atol=1e-12)
    # v is the response d w_i / d b_i of one coordinate
    e = 1e-6 * rng.standard_normal(r)
    B2 = B.copy()
    B2[0] += e
    W2 = np.linalg.solve(A, B2.reshape(-1)).reshape(D, r)
    np.testing.assert_allclose(W2[0] - W[0], v @ e, atol=1e-15)
    assert fr.ridge_channel(mhat, qhat, -10 * np.eye(r), lam, q0)[2] is None


def test_sqrtm_and_frechet_derivative():
    rng = np.random.default_rng(5)
    for k in (1, 2, 4):
        S = _rand_sym(rng, k, 0.3)
        R = fr.sqrtm_psd(S)
        np.testing.assert_allclose(R @ R, S, atol=1e-13)
        np.testing.assert_allclose(R, R.T, atol=0)
        E = rng.standard_normal((k, k))
        E = E + E.T
        eps = 1e-6
        fd = (fr.sqrtm_psd(S + eps * E) - fr.sqrtm_psd(S - eps * E)) / (2 * eps)
        X = fr.sqrtm_frechet(S, E)
        np.testing.assert_allclose(X, fd, atol=1e-8)
        np.testing.assert_allclose(R @ X + X @ R, E, atol=1e-12)  # the Sylvester equation


@pytest.mark.parametrize("r,rs", [(1, 1), (2, 2), (3, 1), (1, 3), (3, 2)])
def test_canonical_gauge(r, rs):
    rng = np.random.default_rng(6)
    m = rng.standard_normal((r, rs))
    q = _rand_sym(rng, r, 0.2) + m @ m.T
    v = _rand_sym(rng, r, 0.1)
    mc, qc, vc, O = fr.canonical_gauge(m, q, v)
    np.testing.assert_allclose(O.T @ O, np.eye(r), atol=1e-12)
    # invariants kept
    np.testing.assert_allclose(np.linalg.eigvalsh(qc), np.linalg.eigvalsh(q), atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(mc, compute_uv=False), np.linalg.svd(m, compute_uv=False), atol=1e-12)
    k = min(r, rs)
    lead = mc[:k, :k]
    np.testing.assert_allclose(lead, lead.T, atol=1e-12)
    assert np.linalg.eigvalsh(0.5 * (lead + lead.T)).min() > -1e-12
    # every point of the orbit has the same canonical form
    Q, _ = np.linalg.qr(rng.standard_normal((r, r)))
    m2, q2, v2, _ = fr.canonical_gauge(Q.T @ m, Q.T @ q @ Q, Q.T @ v @ Q)
    np.testing.assert_allclose(m2, mc, atol=1e-10)
    np.testing.assert_allclose(q2, qc, atol=1e-10)
    np.testing.assert_allclose(v2, vc, atol=1e-10)


# ----------------------------------------------------------------------------------------
# the conjugates are the derivatives of the sampled free entropy (envelope theorem)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["linear", "softmax"])
def test_direct_conjugates_are_free_entropy_derivatives(act):
    rng = np.random.default_rng(7)
    n, T, r, rs = 60, 3, 2, 2
    q0 = np.diag([1.0, 0.5])
    chi_star = rng.standard_normal((n, T, rs)) @ fr.sqrtm_psd(q0)
    zeta = rng.standard_normal((n, T, r))
    Zb = rng.standard_normal((n, T, T))
    Zb = 0.7 * (Zb + np.swapaxes(Zb, 1, 2))
    Zs = Zb + 0.5 * rng.standard_normal((n, T, T))
    Zs = 0.5 * (Zs + np.swapaxes(Zs, 1, 2))
    Ya = Zs + chi_star @ np.swapaxes(chi_star, 1, 2) - np.trace(q0) * np.eye(T)
    Y = Ya / T if act == "linear" else np.exp(Ya) / np.exp(Ya).sum(axis=2, keepdims=True)
    m = np.array([[0.6, 0.1], [-0.2, 0.4]])
    q = np.array([[1.0, 0.1], [0.1, 0.8]])
    v = np.array([[0.5, 0.1], [0.1, 0.3]])

    def phi(m_, q_, v_):
        return fr.output_channel(m_, q_, v_, chi_star, zeta, Zb, Y, q0, 1.0, act, Y_arg=Ya, xtol=1e-12)["phi_out"]

    out = fr.output_channel(m, q, v, chi_star, zeta, Zb, Y, q0, 1.0, act, Y_arg=Ya, xtol=1e-12)
    eps = 1e-5
    for i in range(r):
        for j in range(rs):
            E = np.zeros((r, rs))
            E[i, j] = eps
            fd = (phi(m + E, q, v) - phi(m - E, q, v)) / (2 * eps)
            assert abs(fd - out["dphi_dm"][i, j]) < 1e-6 * (1 + abs(fd)), ("m", i, j, fd, out["dphi_dm"][i, j])
    for i in range(r):
        for j in range(i, r):
            E = np.zeros((r, r))
            E[i, j] = E[j, i] = eps
            w = 1.0 if i == j else 2.0  # d phi = tr(G dq): an off-diagonal pair counts twice
            fd = (phi(m, q + E, v) - phi(m, q - E, v)) / (2 * eps)
            assert abs(fd - w * out["dphi_dq"][i, j]) < 1e-6 * (1 + abs(fd)), ("q", i, j, fd, out["dphi_dq"][i, j])
            fd = (phi(m, q, v + E) - phi(m, q, v - E)) / (2 * eps)
            assert abs(fd - w * out["dphi_dv"][i, j]) < 1e-6 * (1 + abs(fd)), ("v", i, j, fd, out["dphi_dv"][i, j])


def test_replicon_map_rank_one_is_eq78():
    rng = np.random.default_rng(8)
    n, T = 50, 3
    Hl = rng.standard_normal((n, T, T))
    Hl = Hl @ np.swapaxes(Hl, 1, 2) / T
    v = 0.4
    Hf = Hl + np.eye(T) / v
    rad, M = fr.replicon_map(Hf, np.array([v]), 2.0)
    C = np.linalg.inv(Hf)
    eq78 = 2.0 * np.mean(np.sum((C / v - np.eye(T)) ** 2, axis=(1, 2)))
    assert M.shape == (1, 1)
    assert abs(rad - eq78) < 1e-12 * eq78


def test_linear_test_error_matches_monte_carlo():
    """E' closed form for sigma(x) = x/T at rank r against Monte Carlo over tokens and fields."""
    rng = np.random.default_rng(9)
    T, r, rs, n = 3, 2, 2, 400_000
    q0 = np.diag([1.0, 0.5])
    m = np.array([[0.6, 0.1], [-0.2, 0.4]])
    q = np.array([[1.0, 0.1], [0.1, 0.8]])
    dz = 0.3
    cs = rng.standard_normal((n, T, rs)) @ fr.sqrtm_psd(q0)
    ch = cs @ np.linalg.inv(q0) @ m.T + rng.standard_normal((n, T, r)) @ fr.sqrtm_psd(q - m @ np.linalg.inv(q0) @ m.T)
    h = rng.standard_normal((n, T, T)) * np.sqrt(dz / 2)
    h = h + np.swapaxes(h, 1, 2)  # off-diagonal var dz, diagonal 2 dz
    F = ch @ np.swapaxes(ch, 1, 2) - cs @ np.swapaxes(cs, 1, 2) - (np.trace(q) - np.trace(q0)) * np.eye(T)
    losses = np.sum(((h + F) / T) ** 2, axis=(1, 2))
    se = losses.std() / np.sqrt(n)
    assert abs(losses.mean() - fr.linear_test_error(T, dz, q, m, q0)) < 4 * se


@pytest.mark.parametrize("act", ["linear", "softmax"])
def test_stein_form_equals_direct_form_in_expectation(act):
    """E[zeta^T g_out] = S^{1/2} E[Gamma_T] (Gaussian integration by parts, docs sec. 7): the per-sample
    difference of the direct (R.8) and Stein (R.10) conjugates has mean zero within its standard error
    (small v: psi concave, chi_prox smooth in chi_tilde, so Stein's lemma applies)."""
    rng = np.random.default_rng(10)
    n, T, r, rs = 6000, 3, 2, 2
    q0 = np.diag([1.0, 0.5])
    chi_star = rng.standard_normal((n, T, rs)) @ fr.sqrtm_psd(q0)
    zeta = rng.standard_normal((n, T, r))
    Zb = rng.standard_normal((n, T, T))
    Zb = 0.5 * (Zb + np.swapaxes(Zb, 1, 2))
    Ya = Zb + chi_star @ np.swapaxes(chi_star, 1, 2) - np.trace(q0) * np.eye(T)
    Y = Ya / T if act == "linear" else np.exp(Ya) / np.exp(Ya).sum(axis=2, keepdims=True)
    m = np.array([[0.6, 0.1], [-0.2, 0.4]])
    q = np.array([[1.0, 0.1], [0.1, 0.8]])
    v = np.array([[0.2, 0.05], [0.05, 0.15]])
    out = fr.output_channel(m, q, v, chi_star, zeta, Zb, Y, q0, 1.0, act)
    p = out["prox"]
    assert np.linalg.eigvalsh(p["hess_f"]).min() > 0  # concave psi at every sample
    ct, chi = out["chi_tilde"], p["chi"]
    vi = np.linalg.inv(v)
    g = (chi - ct) @ vi
    S = q - m @ np.linalg.inv(q0) @ m.T
    Sh = fr.sqrtm_psd(S)
    U = p["U"]
    C = np.linalg.inv(p["hess_f"]).reshape(n, T, r, T, r)
    CT = U @ np.einsum("nakaj->nkj", C) @ U.T  # per-sample C_T (chi coordinates)
    GT = vi @ CT @ vi - T * vi  # Gamma_T (R.9)
    diff = np.einsum("nak,naj->nkj", zeta, g) - Sh @ GT  # zeta^T g - S^{1/2} Gamma_T, mean 0
    mean, se = diff.mean(axis=0), diff.std(axis=0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(mean) < 4 * se + 1e-12), (mean, se)
    # the two forms differ exactly by the sample estimates of these mean-zero quantities
    st = fr.output_channel(m, q, v, chi_star, zeta, Zb, Y, q0, 1.0, act, form="stein")
    Ld = fr.sqrtm_frechet(S, 0.5 * (mean + mean.T))  # Y_S - E[Gamma_T]/2
    np.testing.assert_allclose(out["vhat"] - st["vhat"], -2.0 * Ld, atol=1e-10)
    ctcs = np.einsum("nak,naj->kj", ct, chi_star) / n - T * m  # E[chi_tilde^T chi*] - T m, mean 0
    np.testing.assert_allclose(out["mhat"] - st["mhat"], (-vi @ ctcs - 2.0 * Ld @ m) @ np.linalg.inv(q0), atol=1e-10)


def _kernel_eval(xi, Zq, Y, act, order=2):
    n, T, r = xi.shape
    rows = np.concatenate([Zq.reshape(n, -1), Y.reshape(n, -1)], axis=1)
    og, oH, oa = np.empty((n, T * r)), np.empty((n, T * r, T * r)), np.empty((n, 1))
    consts = np.array([float(T), 1.0 if act == "softmax" else 0.0])
    lc = nw.kernel().evaluate_batch(nw.FINETUNE_RANK_R, xi.reshape(n, -1).copy(), rows, consts, order, og, oH, oa)
    return lc, og, oH, oa[:, 0], rows, consts


def test_kernel_rank_r_potential_matches_numpy_and_finite_differences():
    """The kernel's FINETUNE_RANK_R potential equals the batched NumPy reference (R.11) and finite differences of
    its own loss; at r = 1 it equals the kernel's FINETUNE potential."""
    rng = np.random.default_rng(11)
    for act in ("linear", "softmax"):
        for T, r in ((3, 1), (3, 2), (2, 3), (4, 2)):
            n = 6
            xi = rng.standard_normal((n, T, r))
            _ct, Zq, Y, _ = _channel_data(rng, n, T, r, act)
            lc, og, oH, oa, rows, consts = _kernel_eval(xi, Zq, Y, act)
            ln, gn, Hn, dqn = pr.loss_derivatives(xi, Zq, Y, act)
            np.testing.assert_allclose(lc, ln, rtol=1e-13, atol=1e-14)
            np.testing.assert_allclose(og, gn.reshape(n, -1), rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(oH, Hn, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(oa, dqn, rtol=1e-12, atol=1e-14)
            eps = 1e-6
            for i in range(T * r):  # finite differences of the kernel's own value and gradient
                e = np.zeros(T * r)
                e[i] = eps
                e = e.reshape(T, r)
                lp, gp = _kernel_eval(xi + e, Zq, Y, act, 1)[:2]
                lm, gm = _kernel_eval(xi - e, Zq, Y, act, 1)[:2]
                np.testing.assert_allclose((lp - lm) / (2 * eps), og[:, i], atol=1e-7)
                np.testing.assert_allclose((gp - gm) / (2 * eps), oH[:, :, i], atol=1e-7)
            lp = _kernel_eval(xi, Zq - eps * np.eye(T), Y, act, 0)[0]
            lm = _kernel_eval(xi, Zq + eps * np.eye(T), Y, act, 0)[0]
            np.testing.assert_allclose(-(lp - lm) / (2 * eps), oa, atol=1e-7)
            if r == 1:
                kg, kH, ka = np.empty((n, T)), np.empty((n, T, T)), np.empty((n, 1))
                lk = nw.kernel().evaluate_batch(nw.FINETUNE, xi[:, :, 0].copy(), rows, consts, 2, kg, kH, ka)
                np.testing.assert_allclose(lc, lk, rtol=1e-13, atol=1e-14)
                np.testing.assert_allclose(oH, kH, rtol=1e-12, atol=1e-13)


def test_linear_certificate():
    """R.16: at r = 1 the certificate holds at the exact global prox (the secular-equation solution); at r = 2 every
    certified sample is not beaten by an independent multi-start BFGS, and a non-global stationary point (a
    sign-flipped start kept by Newton) is not certified."""
    rng = np.random.default_rng(12)
    T, act = 3, "linear"
    for r in (1, 2):
        n = 40
        ct, Zq, Y, Ya = _channel_data(rng, n, T, r, act)
        v = np.eye(r) * 0.5 if r == 1 else np.array([[0.6, 0.2], [0.2, 0.4]])
        p = pr.prox_rank_r(ct, Zq, Y, v, act, Y_arg=Ya)
        cert = p["certified"]
        assert cert is not None and cert.sum() >= 0.9 * n, cert.sum()
        if r == 1:
            assert cert.all()
        for i in np.flatnonzero(cert)[:5]:

            def negpsi(x, i=i):
                return -_psi(x.reshape(T, r), ct[i], Zq[i], Y[i], v, act)

            for _s in range(8):
                x0 = rng.standard_normal(T * r) * (1 + np.abs(ct[i]).max())
                assert p["psi"][i] >= -minimize(negpsi, x0, method="BFGS").fun - 1e-8
    # a local, non-global maximum is not certified: one start only, far from the global maximiser
    ct, Zq, Y, Ya = _channel_data(rng, 200, T, 1, act)
    v = np.eye(1) * 2.0
    g = pr.prox_rank_r(ct, Zq, Y, v, act, Y_arg=Ya)
    loc = pr.prox_rank_r(ct, Zq, Y, v, act, Y_arg=Ya, warm=-g["chi"], global_search=False)
    worse = loc["psi"] < g["psi"] - 1e-8
    assert worse.any()
    assert not pr.linear_certificate(loc["xi"], Ya - Zq, loc["d"])[worse].any()
