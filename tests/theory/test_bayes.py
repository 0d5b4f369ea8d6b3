"""Tests of the Bayes-optimal benchmarks (Result 6, Appendix B): hdlora.theory.bayes."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from hdlora import ParamError, Params
from hdlora.activations import get as get_activation
from hdlora.theory import bayes as B
from hdlora.theory.sampling import frozen_fields, s_ab, standard_normals, to_sym

HAS_SPECTRAL = importlib.util.find_spec("hdlora.theory.spectral") is not None
HAS_ERM = (
    importlib.util.find_spec("hdlora.theory.pretrain") is not None
    and importlib.util.find_spec("hdlora.theory.finetune") is not None
)
needs_spectral = pytest.mark.skipif(not HAS_SPECTRAL, reason="hdlora.theory.spectral not available")
needs_erm = pytest.mark.skipif(not HAS_ERM, reason="ERM theory not available")

softmax = get_activation("softmax", "numpy")
linear = get_activation("linear", "numpy")


# ----------------------------------------------------------------------------- output channel (eq. 89)
def test_output_coefficient():
    for T in (2, 3, 5):
        assert B.output_coefficient(T, "softmax") == T * T + T - 2
        assert B.output_coefficient(T, "linear") == T * T + T
    with pytest.raises(ParamError, match="activation"):
        B.output_coefficient(3, "relu")
    with pytest.raises(ParamError, match="tokens"):
        B.output_coefficient(1, "softmax")


@pytest.mark.parametrize("T", [2, 3, 4])
def test_softmax_of_symmetric_loses_exactly_one_direction(T):
    """The Jacobian of z -> softmax(z) restricted to S(T) has rank L - 1, kernel spanned by 1 1^T."""
    rng = np.random.default_rng(T)
    L = T * (T + 1) // 2
    z0 = to_sym(rng.standard_normal(L), T)
    eps = 1e-6
    cols = []
    for k in range(L):
        e = np.zeros(L)
        e[k] = 1.0
        d = to_sym(e, T)
        cols.append(((softmax(z0 + eps * d) - softmax(z0 - eps * d)) / (2 * eps)).ravel())
    sv = np.linalg.svd(np.array(cols).T, compute_uv=False)
    assert sv[-1] < 1e-8 * sv[0] and sv[-2] > 1e-3 * sv[0]  # rank exactly L - 1
    # the fibre point recovered from y alone lies on z0 + s 1 1^T
    y = softmax(z0)
    z_rec = B._softmax_fibre_point(y)
    np.testing.assert_allclose(softmax(z_rec), y, atol=1e-13)
    diff = z_rec - z0
    np.testing.assert_allclose(diff, diff.mean() * np.ones((T, T)), atol=1e-12)


@pytest.mark.parametrize("T,noise,Q", [(2, 0.5, 1.2), (3, 0.5, 1.6), (3, 2.0, 1.0), (4, 1.0, 0.5)])
def test_eq89_closed_form_matches_monte_carlo(T, noise, Q):
    """alpha (T^2+T-2)/V (eq. 89) vs 2 alpha sum s_ab E g_ab^2 with the softmax fibre found numerically."""
    alpha, Q0 = 0.3, 2.0
    mc, se = B.pretrain_qhat_monte_carlo(Q, alpha=alpha, T=T, Q0=Q0, noise=noise, n_mc=20000, n_s=801, seed=1)
    closed = B.pretrain_qhat(Q, alpha=alpha, T=T, Q0=Q0, noise=noise, activation="softmax")
    # statistical tolerance: 4 standard errors of the Monte-Carlo mean
    assert abs(mc - closed) < 4 * se, (mc, se, closed)
    # the check has power: the coefficient without the lost direction (T^2 + T) is rejected
    wrong = B.pretrain_qhat(Q, alpha=alpha, T=T, Q0=Q0, noise=noise, activation="linear")
    assert abs(mc - wrong) > 10 * se


# ----------------------------------------------------------------------------- input channel (eq. 87)
@needs_spectral
def test_mmse_agrees_with_spectral_and_limits():
    from hdlora.theory import spectral

    for k0 in (0.5, 1.0, 2.0):
        vals = [B.matrix_denoising_mmse(q, k0) for q in (1e-6, 1e-2, 1.0, 1e2, 1e6)]
        assert abs(vals[0] - 1.0) < 1e-5  # Var(mu0) = 1 with no data
        assert all(a > b for a, b in zip(vals, vals[1:]))  # decreasing in Qhat
        assert 0 < vals[-1] <= 1e-6 * (1 + 1e-6)  # <= 1/Qhat (the noise itself)
        assert abs(B.matrix_denoising_mmse(1.0, k0) - spectral.mmse(1.0, k0)) < 1e-12
    assert B.matrix_denoising_mmse(0.0, 1.0) == 1.0


@needs_spectral
@pytest.mark.parametrize("activation", ["linear", "softmax"])
@pytest.mark.parametrize("kappa0", [0.5, 1.0, 2.0])
def test_pretrain_limits(activation, kappa0):
    T, noise = 3, 0.5
    Q0, A0 = 1 + kappa0, 1 + kappa0 + noise / 2
    lo = B.solve_pretrain_bo(alpha=1e-6, tokens=T, kappa0=kappa0, noise=noise, activation=activation, n_mc=20000)
    hi = B.solve_pretrain_bo(alpha=1e4, tokens=T, kappa0=kappa0, noise=noise, activation=activation, n_mc=20000)
    assert lo.converged and hi.converged
    assert (
        abs(lo.Q_BO - kappa0) < 1e-4
    )  # no data (Q_BO - kappa0 = O(Qhat) ~ 1e-5 at alpha = 1e-6): only the prior mean sqrt(kappa0) I of S*/sqrt(D)
    assert 0 < Q0 - hi.Q_BO < 1e-4  # infinite data: S* recovered (Q0 - Q_BO ~ 1/Qhat ~ 1e-5 here)
    # errors against independent Monte Carlo (different seed) of the two limiting channels
    rng = np.random.default_rng(11)
    n, L = 40000, T * (T + 1) // 2
    s = np.sqrt(s_ab(T))
    sig = get_activation(activation, "numpy")
    z_nd = to_sym(s * math.sqrt(kappa0) * rng.standard_normal((n, L)), T)  # z ~ s kappa0
    zs_nd = z_nd + to_sym(s * math.sqrt(A0 - kappa0) * rng.standard_normal((n, L)), T)
    z_inf = to_sym(s * math.sqrt(Q0) * rng.standard_normal((n, L)), T)  # z = S* part exactly
    zs_inf = z_inf + to_sym(s * math.sqrt(noise / 2) * rng.standard_normal((n, L)), T)
    for res, z, zs in ((lo, z_nd, zs_nd), (hi, z_inf, zs_inf)):
        e = np.sum((sig(z) - sig(zs)) ** 2, axis=(-1, -2))
        se = math.hypot(e.std() / math.sqrt(n), res.bo_pretrain_test_error_se)
        assert abs(res.bo_pretrain_test_error - e.mean()) < 4 * se + 1e-12, (res, e.mean(), se)
    if activation == "linear":  # closed forms
        assert abs(lo.bo_pretrain_test_error - (T * T + T) * (A0 - kappa0) / T**2) < 1e-4
        assert abs(hi.bo_pretrain_test_error - (T * T + T) * (noise / 2) / T**2) < 2e-4


@needs_spectral
def test_pretrain_monotone_unique_and_eq87_89_hold():
    Qs = []
    for alpha in (0.01, 0.1, 1.0, 10.0):
        r = B.solve_pretrain_bo(alpha=alpha, tokens=3, kappa0=1.0, noise=0.5, activation="softmax", n_mc=2000)
        r2 = B.solve_pretrain_bo(
            alpha=alpha, tokens=3, kappa0=1.0, noise=0.5, activation="softmax", n_mc=2000, Q_init=1.999
        )
        assert r.converged and r2.converged and abs(r.Q_BO - r2.Q_BO) < 1e-8  # same fixed point from both sides
        # the returned pair satisfies eqs. 87 and 89
        assert abs(r.Qhat_BO - alpha * (9 + 3 - 2) / (2.25 - r.Q_BO)) < 1e-12 * r.Qhat_BO
        assert abs(r.Q_BO - B.pretrain_q_from_qhat(r.Qhat_BO, 1.0)) < 1e-8
        Qs.append(r.Q_BO)
    assert all(a < b for a, b in zip(Qs, Qs[1:])) and 1.0 < Qs[0] and Qs[-1] < 2.0


def test_pretrain_bad_input():
    with pytest.raises(ParamError, match="alpha"):
        B.solve_pretrain_bo(alpha=-1, tokens=3, kappa0=1, noise=0.5, activation="softmax")
    with pytest.raises(ParamError, match="noise"):
        B.solve_pretrain_bo(alpha=1, tokens=3, kappa0=1, noise=-0.5, activation="softmax")
    with pytest.raises(ParamError, match="activation"):
        B.solve_pretrain_bo(alpha=1, tokens=3, kappa0=1, noise=0.5, activation="tanh")


# ----------------------------------------------------------------------------- fine-tuning channel (eqs. 94-96)
def test_gauss_hermite_grid_moments():
    nodes, logw = B.gauss_hermite_grid(3, 8)
    w = np.exp(logw)
    assert abs(w.sum() - 1) < 1e-13
    np.testing.assert_allclose(w @ (nodes**2), [1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(w @ (nodes[:, 0] ** 4 * nodes[:, 1] ** 2), 3.0, atol=1e-11)


@pytest.mark.parametrize("activation", ["softmax", "linear"])
def test_channel_posterior_mean_matches_inner_monte_carlo(activation):
    """Gauss-Hermite posterior mean E[chi~ | Y, omega] vs plain Monte Carlo on the same integral."""
    T, q, V = 3, 0.6, 0.8
    smp = B.finetune_channel_samples(4, T, seed=3)
    omega, chi_star, Y = B._channel_draw(q, V, T, smp)
    v = 1 - q
    g, _ = B.finetune_output_channel(Y, omega, v=v, V=V, activation=activation, n_nodes=24)
    post_gh = omega + v * g
    rng = np.random.default_rng(5)
    n_in = 400000
    for i in range(4):
        chi = omega[i] + math.sqrt(v) * rng.standard_normal((n_in, T))
        R = Y[i] - chi[:, :, None] * chi[:, None, :]
        F = np.sum(R * R, axis=(1, 2))
        if activation == "softmax":
            F = F - R.sum(axis=(1, 2)) ** 2 / T**2
        w = np.exp(-(F - F.min()) / (4 * V))
        mean = (w[:, None] * chi).sum(0) / w.sum()
        # self-normalised importance-sampling standard error (delta method)
        se = np.sqrt(np.sum((w[:, None] * (chi - mean)) ** 2, axis=0)) / w.sum()
        assert np.all(np.abs(mean - post_gh[i]) < 5 * se + 1e-10), (i, mean, post_gh[i], se)


@pytest.mark.parametrize("activation", ["softmax", "linear"])
def test_channel_gauss_hermite_convergence(activation):
    """qhat converges in n_nodes: fast at a typical fixed point (q = 0.95, v = 0.05), slowly at q = 0.5.

    Measured (300 samples, V = 0.56): at q = 0.95 the values for 16, 22, 30 nodes agree to ~3e-7
    relative; at q = 0.5 (prior wider than the likelihood) the rule converges slowly and
    oscillates: 6..30 nodes spread ~0.6 %, 16 vs 22 ~0.35 %, i.e. far below the outer
    Monte-Carlo error (~3 % at 300 samples, ~1 % at 4000).  Only the fixed point enters results.
    """
    smp = B.finetune_channel_samples(300, 3, seed=0)
    for q, rtol in ((0.95, 1e-6), (0.5, 1e-2)):
        vals = [
            B.finetune_qhat(q, alpha_ft=3, V=0.56, activation=activation, samples=smp, n_nodes=n)[0]
            for n in (6, 10, 16, 22)
        ]
        assert abs(vals[2] - vals[3]) <= rtol * vals[3], vals


@pytest.mark.parametrize("activation", ["softmax", "linear"])
def test_channel_nishimori_identity(activation):
    """E<chi~>.chi* = E|<chi~>|^2: holds only when Y is drawn from the channel that defines Z_out."""
    smp = B.finetune_channel_samples(3000, 3, seed=2)
    q, V = 0.6, 0.7
    omega, chi_star, Y = B._channel_draw(q, V, 3, smp)
    g, _ = B.finetune_output_channel(Y, omega, v=1 - q, V=V, activation=activation, n_nodes=14)
    post = omega + (1 - q) * g
    d = np.sum(post * chi_star, axis=1) - np.sum(post * post, axis=1)
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(d.size)
    # power: a likelihood with the wrong residual variance (4 V instead of V) breaks the identity
    g_bad, _ = B.finetune_output_channel(Y, omega, v=1 - q, V=4 * V, activation=activation, n_nodes=14)
    post_bad = omega + (1 - q) * g_bad
    d_bad = np.sum(post_bad * chi_star, axis=1) - np.sum(post_bad * post_bad, axis=1)
    assert abs(d_bad.mean()) > 6 * d_bad.std() / math.sqrt(d_bad.size)


@pytest.mark.parametrize("activation", ["softmax", "linear"])
def test_finetune_q_in_range_and_monotone_in_alpha_ft(activation):
    qs = []
    for a in (0.3, 1.0, 3.0, 10.0):
        r = B.solve_finetune_bo(
            alpha_ft=a,
            tokens=3,
            Q_BO=1.6,
            kappa0=1.0,
            noise=0.5,
            activation=activation,
            n_mc=400,
            n_nodes=8,
            n_mc_error=2000,
        )
        assert r.converged and 0.0 <= r.q_BO <= 1.0
        assert abs(r.bo_overlap - math.sqrt(r.q_BO)) < 1e-15
        assert abs(r.q_BO - r.qhat_BO / (1 + r.qhat_BO)) < 1e-7  # eq. 92 at the fixed point
        qs.append(r.q_BO)
    assert all(x < y for x, y in zip(qs, qs[1:])), qs
    assert qs[-1] > 0.97


@pytest.mark.parametrize("q", [0.3, 0.8])
def test_finetune_linear_error_closed_form(q):
    """(T^2+T)(V + q0^2 - q^2)/T^2 (and the printed -q0 I variant) against Monte Carlo."""
    T, Q0, noise, Q_BO = 3, 2.0, 0.5, 1.6
    n = 200000
    f = frozen_fields(n, T, Q0 + noise / 2, Q_BO, Q_BO, seed=21)
    x = standard_normals(n, 2 * T, seed=22)
    chi = math.sqrt(q) * x[:, :T]
    chi_s = chi + math.sqrt(1 - q) * x[:, T:]
    outer = lambda c: c[:, :, None] * c[:, None, :]  # noqa: E731
    star = to_sym(f["z_star"], T) + outer(chi_s) - np.eye(T)
    for shift, c in (("q", q), ("q0", 1.0)):
        e = np.sum((linear(to_sym(f["z"], T) + outer(chi) - c * np.eye(T)) - linear(star)) ** 2, axis=(1, 2))
        val, _ = B.finetune_bo_test_error(q, Q_BO=Q_BO, T=T, Q0=Q0, noise=noise, activation="linear", shift=shift)
        assert abs(val - e.mean()) < 4 * e.std() / math.sqrt(n), (shift, val, e.mean())


def test_finetune_reuse():
    r = B.solve_finetune_bo(
        alpha_ft=0.5, tokens=3, Q_BO=1.6, kappa0=1.0, noise=0.5, activation="softmax", reuse=True, n_mc_error=2000
    )
    assert r.q_BO == 1.0 and r.bo_overlap == 1.0 and r.start == "exact"
    with pytest.raises(ParamError, match="alpha_ft"):
        B.solve_finetune_bo(alpha_ft=0.4, tokens=3, Q_BO=1.6, kappa0=1.0, noise=0.5, activation="softmax", reuse=True)
    with pytest.raises(ParamError, match="alpha_ft"):
        B.solve_finetune_bo(alpha_ft=0.0, tokens=3, Q_BO=1.6, kappa0=1.0, noise=0.5, activation="softmax")


# ----------------------------------------------------------------------------- public entry
@needs_spectral
def test_bayes_optimal_entry_and_json():
    p = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, activation="linear")
    r = B.bayes_optimal(p, n_mc=500, n_nodes=8, n_mc_error=2000)
    d = r.to_dict()
    for k in (
        "bo_pretrain_test_error",
        "bo_finetune_test_error",
        "bo_overlap",
        "Q_BO",
        "q_BO",
        "bo_pretrain_converged",
        "bo_finetune_converged",
    ):
        assert k in d
    assert d["bo_converged"] is True and r.converged
    json.dumps(d, allow_nan=False)
    assert d["Q_BO"] == r.pretrain.Q_BO and d["q_BO"] == r.finetune.q_BO
    with pytest.raises(ParamError):
        B.bayes_optimal({"alpha": 0.1})


# ----------------------------------------------------------------------------- BO <= ERM
@needs_spectral
@needs_erm
@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_bo_below_erm_linear(noise):
    """Linear sigma: every quantity is closed form (ERM 'exact' method), so BO <= ERM is checked tightly."""
    from hdlora.theory.finetune import solve_finetune_effective
    from hdlora.theory.pretrain import solve_pretrain

    base = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=noise, activation="linear")
    bo = B.bayes_optimal(base, n_mc=800, n_nodes=10, n_mc_error=2000)
    for lam in (0.003, 0.05, 0.3):
        pre = solve_pretrain(base.replace(lam=lam))
        assert pre.converged
        assert bo.pretrain.bo_pretrain_test_error <= pre.pretrain_test_error
        assert bo.pretrain.Q_BO >= pre.M**2 / pre.Q  # the best rescaled ERM overlap
        for lam_ft in (0.05, 1.0):
            ft = solve_finetune_effective(base.replace(lam=lam, lam_ft=lam_ft), base.Q0, pre.Q, pre.M, n_mc=1000)
            assert ft.converged
            assert bo.finetune.bo_finetune_test_error <= ft.finetune_test_error, (lam, lam_ft)


@pytest.mark.slow
@needs_spectral
@needs_erm
@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_bo_below_erm_softmax(noise):
    """Softmax, Fig. 1 setting: BO <= ERM up to 3 combined Monte-Carlo standard errors."""
    from hdlora.theory.finetune import solve_finetune_effective
    from hdlora.theory.pretrain import solve_pretrain

    base = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=noise, activation="softmax")
    bo = B.bayes_optimal(base, n_mc=3000, n_nodes=14, n_mc_error=30000)
    for lam in (0.01, 0.1, 0.5):
        pre = solve_pretrain(base.replace(lam=lam), n_mc=20000)
        assert pre.converged
        assert bo.pretrain.bo_pretrain_test_error <= pre.pretrain_test_error + 3 * bo.pretrain.bo_pretrain_test_error_se
        for lam_ft in (0.05, 1.0):
            ft = solve_finetune_effective(base.replace(lam=lam, lam_ft=lam_ft), base.Q0, pre.Q, pre.M, n_mc=4000)
            assert ft.converged
            assert (
                bo.finetune.bo_finetune_test_error <= ft.finetune_test_error + 3 * bo.finetune.bo_finetune_test_error_se
            )


@pytest.mark.slow
@needs_spectral
def test_fig1_setting_converges_in_samples_and_nodes():
    """Softmax, Fig. 1: q_BO stable when n_mc and n_nodes grow (MC error of q ~ 1e-3 at n_mc = 4000)."""
    out = {}
    for n_mc, n_nodes in ((2000, 12), (8000, 12), (8000, 18)):
        p = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, activation="softmax")
        r = B.bayes_optimal(p, n_mc=n_mc, n_nodes=n_nodes, seed=n_mc)
        assert r.converged
        out[(n_mc, n_nodes)] = r.finetune.q_BO
    assert abs(out[(8000, 12)] - out[(8000, 18)]) < 2e-4
    assert abs(out[(2000, 12)] - out[(8000, 12)]) < 5e-3
