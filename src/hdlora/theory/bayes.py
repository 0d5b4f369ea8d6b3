"""Bayes-optimal (BO) benchmarks of the two stages (Result 6, Appendix B).

Pre-training (B.1)
------------------
The BO overlap Q_BO = D^-2 Tr(S_BO S*) (= D^-2 Tr S_BO^2, Nishimori) solves

    Q_BO = Q0 - mmse(Qhat_BO),                                                   (eq. 87)
    mmse(Qhat) = 1/Qhat - 4 pi^2 / (3 Qhat^2) int mu_{1/Qhat}(t)^3 dt,

the MMSE of the matrix-denoising channel Y = S* + Qhat^-1/2 Z (eq. 88) in the
S*/sqrt(D) scaling, i.e. mu_{1/Qhat} = mu0 boxplus semicircle of variance 1/Qhat
(:func:`hdlora.theory.spectral.cubic_integral` with eta = Qhat^-1/2).  With no
data mmse -> Var(mu0) = 1 and Q_BO -> Q0 - 1 = kappa0 (the prior mean of S* is
known); with infinite data mmse -> 0 and Q_BO -> Q0.

The output channel (eq. 89 and its linear counterpart):

    Qhat_BO = alpha (T^2 + T - 2 l) / (Q0 + Delta/2 - Q_BO),   l = lost directions,

Derivation.  With Phi_BO = -Q Qhat / 4 + I_in + alpha I_out (eq. 85),
Qhat = 4 alpha dI_out/dQ and, for a channel observed through the T(T+1)/2
upper-triangle fields, dI_out/dQ = 1/2 sum_{a<=b} s_ab E[g_ab^2] with
g = grad_omega log Z_out and s_ab = 1 + delta_ab, so

    Qhat = 2 alpha sum_{a<=b} s_ab E[g_ab^2].                                     (*)

The residual r = z* - omega has entries of variance s_ab V (V = Q0 + Delta/2 - Q),
i.e. density ~ exp(-||r||_F^2 / (4V)): it is isotropic for the Frobenius inner
product on symmetric matrices, with variance 2V per orthonormal direction.

* linear sigma(x) = x/T is invertible: the channel observes z* exactly and
  Z_out = N(z*; omega, s V), g_ab = r_ab / (s_ab V), s_ab E g_ab^2 = 1/V, so
  Qhat = 2 alpha L / V = alpha (T^2 + T) / V  (L = T(T+1)/2; no lost direction).
* the row-wise softmax of a symmetric matrix is invariant exactly under
  z -> z + s 1 1^T (a row shift c_a keeps the matrix symmetric only if all c_a
  are equal), so the channel observes z* modulo J = 1 1^T.  Integrating the
  Gaussian over s gives log Z_out = -(||r||_F^2 - (sum_ab r_ab)^2 / T^2)/(4V) + c,
  the Frobenius norm of the projection of r orthogonal to J.  Then
  g_ab = m_ab (r_ab - R/T^2)/(2V) (m_ab = 2 - delta_ab, R = sum_ab r_ab) and
  (*) gives Qhat = alpha (2L - 2)/V = alpha (T^2 + T - 2)/V: eq. 89.  The
  Monte-Carlo check :func:`pretrain_qhat_monte_carlo` evaluates (*) with the
  fibre of the softmax found numerically and the integral over s done by
  quadrature.

Test error (eq. 90-91): (z*, z) with covariance s_ab [[A0, Q_BO], [Q_BO, Q_BO]],
A0 = Q0 + Delta/2; E_BO = E||sigma(z) - sigma(z*)||_F^2: closed form
(T^2+T)(A0 - Q_BO)/T^2 for linear sigma, Monte Carlo with fixed samples for softmax.

Fine-tuning, e = 0 (B.2)
------------------------
q_BO = qhat/(1 + qhat) (eq. 92) and qhat = alpha' E||g_out'||^2 (eq. 95), with the
output channel of the rank-one fields.  Given the BO extensive-rank field z of a
fine-tuning sequence, the statistician observes (sigma and q0 known)

    Y = chi* chi*^T + h,   h = z* - z,  h_ab ~ N(0, s_ab V_BO),  V_BO = A0 - Q_BO,

modulo J for the softmax.  Hence, with omega = chi (eq. 93) and v = q0 - q,

    Z_out'(Y, omega) = int prod_a dN(chi~_a; omega_a, v) exp(-F(Y - chi~ chi~^T)),      (eq. 94/96)
    F(A) = ||A||_F^2/(4 V_BO) - l (sum_ab A_ab)^2/(4 T^2 V_BO),   l = 1 softmax, 0 linear.

For the softmax with h = 0, sum_ab (chi~chi~^T - chi*chi*^T)_ab = (sum chi~)^2 - (sum chi*)^2
and this is eq. 96 exactly; the integral over s of the Gaussian residual along J gives
the second term (the same computation as for eq. 89).  Eq. 96 as printed omits the
realised residual h = z* - z inside the norm: the likelihood must be evaluated at the
observed Y (which contains h), not averaged over h; we keep h.  For the linear
activation no direction is lost and the second term is absent.
g_out' = (E[chi~ | Y, omega] - omega)/v; the T-dimensional integral is done on a
Gauss-Hermite tensor grid of the prior N(omega, v I_T) (n_nodes per axis; the
convergence in n_nodes is tested).  The outer expectation over (chi*, omega, h)
uses fixed samples (common random numbers), so the map q -> q_new is deterministic.

The uninformative point q = 0 is always a fixed point (sign symmetry chi -> -chi),
so the solve starts from an informed point (q near q0) and from an uninformed one
(q small) and keeps the fixed point of larger free entropy
phi(q) = -q qhat/2 + I_in(qhat) + alpha' E log Z_out',  I_in = qhat/2 - log(1+qhat)/2.

Test error and overlap: E'_BO of eq. 97 and o_BO = sqrt(q_BO/q0) (eq. 98).  Eq. 97
prints the shift -q0 I_T for the BO prediction; the estimator built from the BO
posterior (posterior mean of w w^T, or of w) has the batch-normalisation shift
-q_BO I_T (eq. 1: E_X A uses the estimator's own weights, as in eq. 19), which is the
one used here:  E'_BO = E||sigma(z + chi chi^T - q_BO I) - sigma(z* + chi* chi*^T - q0 I)||_F^2.
For linear sigma this is the Bayes risk, in closed form
(T^2 + T)(V_BO + q0^2 - q_BO^2)/T^2; the printed -q0 I_T adds T (q0 - q_BO)^2 / T^2.
The printed variant is returned as ``bo_finetune_test_error_eq97_printed``.

Fine-tuning, e = 1
------------------
The fine-tuning sequences and noises are those of pre-training, so sigma(z*) and
sigma(z* + chi* chi*^T - q0 I) are both observed and chi* chi*^T (hence chi* up to a
sign) is known for each of the N' samples.  The paper (B.2) concludes q_BO = 1 for
alpha' >= 1.  A sharper sufficient condition holds: each sample gives T - 1 linear
equations u^T X_mu w* = 0 (u orthogonal to chi*_mu), whose vectors, projected
orthogonally to w*, are i.i.d. Gaussian; N'(T - 1) >= D - 1 of them determine w* up
to scale, and the scale is known from |chi*|.  So q_BO = q0 for alpha' >= 1/(T - 1)
(this includes the paper's alpha' >= 1).  Below that the partial-recovery q_BO is
not derived here and a ParamError is raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, SupportsFloat

import numpy as np
from scipy.special import logsumexp

from ..activations import get as get_activation
from ..params import A0 as _A0
from ..params import ACTIVATIONS, ParamError, Params
from . import engine as _engine
from .fixed_point import iterate
from .sampling import frozen_fields, s_ab, standard_normals, to_sym, upper_indices

__all__ = [
    "lost_directions",
    "output_coefficient",
    "pretrain_qhat",
    "matrix_denoising_mmse",
    "pretrain_q_from_qhat",
    "pretrain_qhat_monte_carlo",
    "PretrainBO",
    "solve_pretrain_bo",
    "pretrain_bo_test_error",
    "gauss_hermite_grid",
    "finetune_output_channel",
    "finetune_channel_samples",
    "finetune_qhat",
    "finetune_free_entropy",
    "FinetuneBO",
    "solve_finetune_bo",
    "finetune_bo_test_error",
    "BayesResult",
    "bayes_optimal",
]

Q_FINETUNE0 = 1.0  # q0 = ||w*||^2 / D -> 1 (eq. 9)


# ---------------------------------------------------------------------------
# pre-training (B.1)
# ---------------------------------------------------------------------------
def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ParamError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_tokens(T: int) -> None:
    if isinstance(T, bool) or int(T) != T or T < 2:
        raise ParamError(f"tokens (T) must be an integer >= 2, got {T!r}")


def lost_directions(activation: str) -> int:
    """Directions of S(T) invisible through sigma: 1 for softmax (z -> z + s 1 1^T), 0 for linear."""
    _check_activation(activation)
    return 1 if activation == "softmax" else 0


def output_coefficient(T: int, activation: str) -> float:
    """2 (L - l) = T^2 + T - 2 l: T^2 + T - 2 for softmax (eq. 89), T^2 + T for linear."""
    _check_tokens(T)
    return float(T * T + T - 2 * lost_directions(activation))


def pretrain_qhat(Q: float, *, alpha: float, T: int, Q0: float, noise: float, activation: str) -> float:
    """Qhat_BO = alpha (T^2 + T - 2 l) / (Q0 + Delta/2 - Q)   (eq. 89; l = 0 for linear)."""
    V = _A0(Q0, noise) - Q
    if V <= 0:
        raise ValueError(f"Q0 + Delta/2 - Q must be > 0, got {V} (Q = {Q}, Q0 = {Q0}, Delta = {noise})")
    return alpha * output_coefficient(T, activation) / V


def _default_cubic_integral() -> Callable[[float, float], SupportsFloat]:
    from .spectral import cubic_integral  # written concurrently; imported lazily

    return cubic_integral


def matrix_denoising_mmse(
    Qhat: float, kappa0: float, cubic_integral: Callable[[float, float], SupportsFloat] | None = None
) -> float:
    """mmse(Qhat) = 1/Qhat - 4 pi^2/(3 Qhat^2) int mu_eta^3,  eta = Qhat^-1/2  (eqs. 87-88).

    MMSE per D^2-normalised squared Frobenius norm of estimating S*/sqrt(D) from
    Y = S* + Qhat^-1/2 Z.  Qhat = 0 gives Var(mu0) = 1.
    """
    if Qhat < 0 or not math.isfinite(Qhat):
        raise ValueError(f"Qhat must be finite and >= 0, got {Qhat}")
    if Qhat == 0.0:
        return 1.0
    ci = cubic_integral or _default_cubic_integral()
    eta = Qhat**-0.5
    try:
        c = ci(eta, kappa0)
    except ValueError as exc:  # e.g. eta below the spectral module's range (huge Qhat, i.e. huge alpha)
        raise ParamError(
            f"Bayes-optimal input channel (eq. 87) at Qhat = {Qhat:.4g} (eta = {eta:.3g}) "
            f"is outside the range of the spectral quadrature: {exc}"
        ) from exc
    c = float(getattr(c, "value", c))  # spectral.cubic_integral returns a QuadratureResult
    return 1.0 / Qhat - 4.0 * math.pi**2 / (3.0 * Qhat**2) * c


def pretrain_q_from_qhat(
    Qhat: float, kappa0: float, cubic_integral: Callable[[float, float], SupportsFloat] | None = None
) -> float:
    """Q_BO = Q0 - mmse(Qhat)   (eq. 87), Q0 = 1 + kappa0."""
    return 1.0 + kappa0 - matrix_denoising_mmse(Qhat, kappa0, cubic_integral)


def _softmax_fibre_point(y: np.ndarray) -> np.ndarray:
    """A symmetric z0 with softmax(z0) = y, found from y alone (rows: log y_ab = z_ab - c_a).

    z = log y + c 1^T is symmetric iff c_a - c_b = log y_ba - log y_ab; we fix c_0 = 0.
    """
    ly = np.log(y)
    c = ly[..., 0, :] - ly[..., :, 0]  # c_a = log y_0a - log y_a0
    z0 = ly + c[..., :, None]
    return 0.5 * (z0 + np.swapaxes(z0, -1, -2))  # symmetric up to rounding; symmetrise


def pretrain_qhat_monte_carlo(
    Q: float, *, alpha: float, T: int, Q0: float, noise: float, n_mc: int = 20000, seed: int = 0, n_s: int = 2001
) -> tuple[float, float]:
    """Monte-Carlo evaluation of the softmax output update (*): Qhat = 2 alpha sum s_ab E g_ab^2.

    Independent of the closed form of eq. 89: for each sample, y = softmax(z*) is
    computed, a point z0 of the fibre {z symmetric : softmax(z) = y} is recovered from
    y numerically, log Z_out(y, omega) = log int ds N(z0 + s J; omega, s_ab V) is
    integrated over s by quadrature (n_s points over +-12 posterior standard
    deviations), and g = grad_omega log Z_out = (E[z | y, omega] - omega)/(s_ab V)
    on the upper triangle.  Returns (Qhat, standard error).
    """
    A0 = _A0(Q0, noise)
    V = A0 - Q
    f = frozen_fields(n_mc, T, A0, Q, Q, seed=seed, purpose="bayes")  # (z*, omega) of eq. 90 (Nishimori M = Q)
    z_star, omega = to_sym(f["z_star"], T), to_sym(f["z"], T)
    y = get_activation("softmax", "numpy")(z_star)
    z0 = _softmax_fibre_point(y)
    # along the fibre: -||z0 + sJ - omega||_F^2/(4V) is quadratic in s with curvature T^2/(2V)
    r0 = z0 - omega
    s_mode = -r0.sum(axis=(-1, -2)) / T**2
    width = math.sqrt(2.0 * V) / T
    s = s_mode[:, None] + width * np.linspace(-12.0, 12.0, n_s)[None, :]
    J = np.ones((T, T))
    # ||r0 + s J||^2 = ||r0||^2 + 2 s sum(r0) + s^2 T^2, evaluated pointwise (no completion of the square)
    logk = -(np.sum(r0**2, axis=(-1, -2))[:, None] + 2 * s * r0.sum(axis=(-1, -2))[:, None] + s**2 * T**2) / (4.0 * V)
    w = np.exp(logk - logk.max(axis=1, keepdims=True))
    s_mean = np.trapezoid(w * s, s, axis=1) / np.trapezoid(w, s, axis=1)
    z_mean = z0 + s_mean[:, None, None] * J
    a, b = upper_indices(T)
    sab = s_ab(T)
    g = (z_mean - omega)[:, a, b] / (sab * V)
    per = 2.0 * alpha * np.sum(sab * g**2, axis=1)
    return float(per.mean()), float(per.std(ddof=1) / math.sqrt(n_mc))


def pretrain_bo_test_error(
    Q_BO: float, *, T: int, Q0: float, noise: float, activation: str, n_mc: int = 20000, seed: int = 0
) -> tuple[float, float]:
    """E_BO = E||sigma(z) - sigma(z*)||_F^2 with (z*, z) of eq. 90   (eq. 91).

    Linear: (T^2 + T)(Q0 + Delta/2 - Q_BO)/T^2 exactly (standard error 0).
    Softmax: Monte Carlo with fixed samples; returns (value, standard error).
    """
    A0 = _A0(Q0, noise)
    if activation == "linear":
        return (T * T + T) * (A0 - Q_BO) / T**2, 0.0
    f = frozen_fields(n_mc, T, A0, Q_BO, Q_BO, seed=seed, purpose="test")
    sig = get_activation(activation, "numpy")
    err = np.sum((sig(to_sym(f["z"], T)) - sig(to_sym(f["z_star"], T))) ** 2, axis=(-1, -2))
    return float(err.mean()), float(err.std(ddof=1) / math.sqrt(n_mc))


@dataclass(frozen=True)
class PretrainBO:
    """BO pre-training benchmark (B.1)."""

    Q_BO: float
    Qhat_BO: float
    V_BO: float  # Q0 + Delta/2 - Q_BO, variance of the residual z* - z (off-diagonal)
    bo_pretrain_test_error: float
    bo_pretrain_test_error_se: float  # Monte-Carlo standard error (0 for linear)
    converged: bool
    residual: float
    iterations: int


def solve_pretrain_bo(
    *,
    alpha: float,
    tokens: int,
    kappa0: float,
    noise: float,
    activation: str,
    n_mc: int = 20000,
    seed: int = 0,
    tol: float = 1e-9,
    max_iter: int = 2000,
    mixing: float = 1.0,
    Q_init: float | None = None,
    cubic_integral: Callable[[float, float], SupportsFloat] | None = None,
) -> PretrainBO:
    """Solve eqs. 87 + 89 for (Q_BO, Qhat_BO) with the shared fixed-point engine, then eq. 91.

    Starts from the no-data point Q = kappa0 unless ``Q_init`` is given.  One start only: comparing branches needs
    the free entropy, whose input part I_in of the rotationally invariant (Wishart-type) prior is not implemented
    here; a single start from the no-data point follows the branch continuous in alpha from alpha = 0, which is
    the one the paper's Fig. 2 reports (tested against the published values).
    """
    _check_tokens(tokens)
    _check_activation(activation)
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ParamError(f"alpha must be finite and >= 0, got {alpha}")
    if not (kappa0 > 0 and math.isfinite(kappa0)):
        raise ParamError(f"kappa0 must be finite and > 0, got {kappa0}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ParamError(f"noise (Delta) must be finite and >= 0, got {noise}")
    Q0 = 1.0 + kappa0
    ci = cubic_integral or _default_cubic_integral()

    def update(x: dict[str, float]):
        Qhat = pretrain_qhat(x["Q"], alpha=alpha, T=tokens, Q0=Q0, noise=noise, activation=activation)
        return {"Q": pretrain_q_from_qhat(Qhat, kappa0, ci)}, {"Qhat": Qhat}

    hi = Q0 * (1.0 - 1e-12) if noise == 0 else Q0
    res = iterate(
        update,
        {"Q": kappa0 if Q_init is None else Q_init},
        mixing=mixing,
        tol=tol,
        max_iter=max_iter,
        bounds={"Q": (0.0, hi)},
        name="Bayes-optimal pre-training (eqs. 87, 89)",
    )
    Q = res.state["Q"]
    Qhat = pretrain_qhat(Q, alpha=alpha, T=tokens, Q0=Q0, noise=noise, activation=activation)
    err, se = pretrain_bo_test_error(Q, T=tokens, Q0=Q0, noise=noise, activation=activation, n_mc=n_mc, seed=seed)
    return PretrainBO(
        Q_BO=Q,
        Qhat_BO=Qhat,
        V_BO=_A0(Q0, noise) - Q,
        bo_pretrain_test_error=err,
        bo_pretrain_test_error_se=se,
        converged=res.converged,
        residual=res.residual,
        iterations=res.iterations,
    )


# ---------------------------------------------------------------------------
# fine-tuning (B.2)
# ---------------------------------------------------------------------------
@lru_cache(maxsize=32)
def gauss_hermite_grid(T: int, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor Gauss-Hermite rule for E_{x ~ N(0, I_T)}: nodes (n_nodes^T, T), log-weights (n_nodes^T,)."""
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    x, w = np.polynomial.hermite_e.hermegauss(n_nodes)  # weight exp(-x^2/2)
    logw1 = np.log(w / np.sqrt(2 * np.pi))
    grids = np.meshgrid(*([x] * T), indexing="ij")
    nodes = np.stack([gi.ravel() for gi in grids], axis=-1)
    lw = np.meshgrid(*([logw1] * T), indexing="ij")
    logw = np.sum(np.stack([li.ravel() for li in lw], axis=-1), axis=-1)
    nodes.setflags(write=False)
    logw.setflags(write=False)
    return nodes, logw


def finetune_output_channel(
    Y: np.ndarray,
    omega: np.ndarray,
    *,
    v: float,
    V: float,
    activation: str,
    n_nodes: int = 16,
    chunk_points: int = 2_000_000,
) -> tuple[np.ndarray, np.ndarray]:
    """g_out' = grad_omega log Z_out' and log Z_out' of eq. 94/96 (see module docstring).

    Args:
        Y: (n, T, T) symmetric observations chi* chi*^T + h.
        omega: (n, T) means of the prior on chi~.
        v: prior variance q0 - q (> 0).
        V: V_BO, off-diagonal variance of the residual h.
    Returns:
        g (n, T) and log Z (n,) (unnormalised kernel exp(-F); the omitted constant
        depends on V only).
    """
    n, T = omega.shape
    if v <= 0 or V <= 0:
        raise ValueError(f"need v > 0 and V > 0, got v={v}, V={V}")
    lost = lost_directions(activation)
    nodes, logw = gauss_hermite_grid(T, n_nodes)
    K = nodes.shape[0]
    sv = math.sqrt(v)
    g = np.empty((n, T))
    logZ = np.empty(n)
    step = max(1, chunk_points // K)
    Y2 = np.sum(Y * Y, axis=(-1, -2))
    SY = np.sum(Y, axis=(-1, -2))
    for i in range(0, n, step):
        sl = slice(i, min(n, i + step))
        chi = omega[sl, None, :] + sv * nodes[None, :, :]  # (m, K, T)
        quad = np.einsum("mkt,mts,mks->mk", chi, Y[sl], chi, optimize=True)
        r2 = np.sum(chi * chi, axis=-1)
        F = Y2[sl, None] - 2.0 * quad + r2 * r2  # ||Y - chi chi^T||_F^2
        if lost:
            F = F - (SY[sl, None] - np.sum(chi, axis=-1) ** 2) ** 2 / T**2
        lk = logw[None, :] - F / (4.0 * V)
        lz = logsumexp(lk, axis=1)
        p = np.exp(lk - lz[:, None])
        mean = np.einsum("mk,mkt->mt", p, chi)
        g[sl] = (mean - omega[sl]) / v
        logZ[sl] = lz
    return g, logZ


@dataclass(frozen=True)
class _FtSamples:
    zeta_omega: np.ndarray  # (n, T)
    zeta_chi: np.ndarray  # (n, T)
    zeta_h: np.ndarray  # (n, L)


def finetune_channel_samples(n: int, T: int, seed: int = 0, method: str = "mc") -> _FtSamples:
    """Fixed standard normals for the outer expectation of eq. 95 (common random numbers)."""
    L = T * (T + 1) // 2
    x = standard_normals(n, 2 * T + L, seed=seed, method=method, purpose="bayes_rank_one")
    return _FtSamples(x[:, :T], x[:, T : 2 * T], x[:, 2 * T :])


def _channel_draw(q: float, V: float, T: int, smp: _FtSamples, q0: float = Q_FINETUNE0):
    """(omega, chi*, Y) at overlap q: omega ~ N(0, q), chi* = omega + sqrt(q0 - q) xi (eq. 93), Y = chi* chi*^T + h."""
    omega = math.sqrt(q) * smp.zeta_omega
    chi_star = omega + math.sqrt(q0 - q) * smp.zeta_chi
    h = to_sym(np.sqrt(s_ab(T) * V) * smp.zeta_h, T)
    Y = chi_star[:, :, None] * chi_star[:, None, :] + h
    return omega, chi_star, Y


def finetune_qhat(
    q: float, *, alpha_ft: float, V: float, activation: str, samples: _FtSamples, n_nodes: int = 16
) -> tuple[float, dict[str, float]]:
    """qhat = alpha' E||g_out'||^2 (eq. 95) at overlap q; also returns diagnostics.

    Diagnostics: ``qhat_se`` (Monte-Carlo standard error), ``logZ`` (E log Z_out',
    for the free entropy) and the two sides of the Nishimori identity
    E<chi~>.chi* = E|<chi~>|^2 (``nishimori_cross``, ``nishimori_self``).
    """
    T = samples.zeta_omega.shape[1]
    omega, chi_star, Y = _channel_draw(q, V, T, samples)
    v = Q_FINETUNE0 - q
    g, logZ = finetune_output_channel(Y, omega, v=v, V=V, activation=activation, n_nodes=n_nodes)
    per = alpha_ft * np.sum(g * g, axis=1)
    post = omega + v * g
    n = per.size
    return float(per.mean()), {
        "qhat_se": float(per.std(ddof=1) / math.sqrt(n)),
        "logZ": float(logZ.mean()),
        "nishimori_cross": float(np.mean(np.sum(post * chi_star, axis=1))),
        "nishimori_self": float(np.mean(np.sum(post * post, axis=1))),
    }


def finetune_free_entropy(q: float, qhat: float, logZ_mean: float, alpha_ft: float) -> float:
    """phi = -q qhat/2 + I_in(qhat) + alpha' E log Z_out',  I_in = qhat/2 - log(1 + qhat)/2 (Gaussian prior)."""
    return -q * qhat / 2.0 + qhat / 2.0 - 0.5 * math.log1p(qhat) + alpha_ft * logZ_mean


def finetune_bo_test_error(
    q_BO: float,
    *,
    Q_BO: float,
    T: int,
    Q0: float,
    noise: float,
    activation: str,
    n_mc: int = 20000,
    seed: int = 0,
    shift: str = "q",
) -> tuple[float, float]:
    """E'_BO = E||sigma(z + chi chi^T - c I) - sigma(z* + chi* chi*^T - q0 I)||_F^2   (eq. 97).

    ``shift='q'``: c = q_BO (the BO posterior estimator, see module docstring);
    ``shift='q0'``: c = q0 as printed in eq. 97.  (z*, z) from eq. 90, (chi*, chi) from eq. 93.
    Linear sigma: closed form (T^2+T)(V + q0^2 - q^2)/T^2 [+ T (q0 - q)^2/T^2 for 'q0'].
    Returns (value, standard error).
    """
    if shift not in ("q", "q0"):
        raise ValueError(f"shift must be 'q' or 'q0', got {shift!r}")
    q0 = Q_FINETUNE0
    A0 = _A0(Q0, noise)
    V = A0 - Q_BO
    if activation == "linear":
        val = (T * T + T) * (V + q0**2 - q_BO**2) / T**2
        if shift == "q0":
            val += T * (q0 - q_BO) ** 2 / T**2
        return float(val), 0.0
    f = frozen_fields(n_mc, T, A0, Q_BO, Q_BO, seed=seed, purpose="test")
    x = standard_normals(n_mc, 2 * T, seed=seed, purpose="test_rank_one")
    chi = math.sqrt(q_BO) * x[:, :T]
    chi_star = chi + math.sqrt(q0 - q_BO) * x[:, T:]
    eye = np.eye(T)
    c = q_BO if shift == "q" else q0
    pre = to_sym(f["z"], T) + chi[:, :, None] * chi[:, None, :] - c * eye
    pre_star = to_sym(f["z_star"], T) + chi_star[:, :, None] * chi_star[:, None, :] - q0 * eye
    sig = get_activation(activation, "numpy")
    err = np.sum((sig(pre) - sig(pre_star)) ** 2, axis=(-1, -2))
    return float(err.mean()), float(err.std(ddof=1) / math.sqrt(n_mc))


@dataclass(frozen=True)
class FinetuneBO:
    """BO fine-tuning benchmark (B.2)."""

    q_BO: float
    qhat_BO: float
    bo_overlap: float  # o_BO = sqrt(q_BO / q0)  (eq. 98)
    bo_finetune_test_error: float  # eq. 97 with the -q_BO I shift (see module docstring)
    bo_finetune_test_error_se: float
    bo_finetune_test_error_eq97_printed: float  # eq. 97 with -q0 I as printed
    converged: bool
    residual: float
    iterations: int
    start: str  # 'informed' | 'uninformed' | 'exact' (e = 1)
    free_entropy: float  # nan for e = 1
    other_start_q: float  # q of the discarded start (nan if none)


def solve_finetune_bo(
    *,
    alpha_ft: float,
    tokens: int,
    Q_BO: float,
    kappa0: float,
    noise: float,
    activation: str,
    reuse: bool = False,
    n_mc: int = 4000,
    n_nodes: int = 16,
    n_mc_error: int = 20000,
    seed: int = 0,
    tol: float = 1e-9,
    max_iter: int = 1000,
    mixing: float = 1.0,
    starts: tuple[str, ...] = ("informed", "uninformed"),
) -> FinetuneBO:
    """Solve eqs. 92 + 95 for q_BO (e = 0) or apply the e = 1 result; then eqs. 97-98.

    Args:
        n_mc: outer samples of eq. 95; n_nodes: Gauss-Hermite nodes per axis (n_nodes^T points).
        n_mc_error: samples for the test error (eq. 97).
        starts: which initial points to run ('informed': q = 0.9 q0; 'uninformed': q = 0.02 q0);
            the fixed point of larger free entropy is kept.
    """
    _check_tokens(tokens)
    _check_activation(activation)
    if not (alpha_ft > 0 and math.isfinite(alpha_ft)):
        raise ParamError(f"alpha_ft (alpha') must be finite and > 0, got {alpha_ft}")
    q0 = Q_FINETUNE0
    Q0 = 1.0 + kappa0
    V = _A0(Q0, noise) - Q_BO
    common: dict[str, Any] = dict(
        Q_BO=Q_BO, T=tokens, Q0=Q0, noise=noise, activation=activation, n_mc=n_mc_error, seed=seed
    )
    if reuse:
        if alpha_ft < 1.0 / (tokens - 1):
            raise ParamError(
                f"Bayes-optimal fine-tuning with reuse (e = 1) is derived for alpha_ft >= 1/(T-1) = "
                f"{1.0 / (tokens - 1):.4g} only (exact recovery, q_BO = q0); got alpha_ft = {alpha_ft}"
            )
        err, se = finetune_bo_test_error(q0, **common)
        return FinetuneBO(
            q_BO=q0,
            qhat_BO=math.inf,
            bo_overlap=1.0,
            bo_finetune_test_error=err,
            bo_finetune_test_error_se=se,
            bo_finetune_test_error_eq97_printed=err,
            converged=True,
            residual=0.0,
            iterations=0,
            start="exact",
            free_entropy=math.nan,
            other_start_q=math.nan,
        )
    if V <= 0:
        raise ValueError(f"V_BO = Q0 + Delta/2 - Q_BO must be > 0, got {V}")
    smp = finetune_channel_samples(n_mc, tokens, seed=seed)

    lo, hi = 1e-12, q0 * (1 - 1e-9)

    def update(x: np.ndarray, carry: Any):
        qhat, diag = finetune_qhat(
            float(x[0]), alpha_ft=alpha_ft, V=V, activation=activation, samples=smp, n_nodes=n_nodes
        )
        return np.clip([qhat / (1.0 + qhat)], lo, hi), carry, dict(diag, qhat=qhat)

    def objective(x: np.ndarray, carry: Any):
        """minus the free entropy (eq. 92) at q: the engine keeps the lowest, i.e. the largest free entropy."""
        q = float(x[0])
        qhat, diag = finetune_qhat(q, alpha_ft=alpha_ft, V=V, activation=activation, samples=smp, n_nodes=n_nodes)
        return -finetune_free_entropy(q, qhat, diag["logZ"], alpha_ft), None

    init = {"informed": 0.9 * q0, "uninformed": 0.02 * q0}
    for s in starts:
        if s not in init:
            raise ValueError(f"unknown start {s!r}; use 'informed' or 'uninformed'")
    stage = _engine.Stage(
        init=lambda _p, _s: None,
        update=update,
        objective=objective,
        domain=lambda x: bool(np.all(np.isfinite(x)) and lo <= x[0] <= hi),
        names=("q",),
        name="Bayes-optimal fine-tuning (eqs. 92, 95)",
    )
    sol = _engine.solve_stage(
        stage,
        {s: np.array([init[s]]) for s in starts},
        tol=tol,
        max_iter=max_iter,
        mixing=mixing,
        anderson=3,
        min_mixing=min(0.02, mixing),
        samples_key=("bo-finetune", n_mc, seed),
    )
    start, r = sol.chosen, sol.branch
    phi = -r.objective
    qhat = float(r.aux["qhat"])
    others = [b for name, b in sol.branches.items() if name != start]
    q = float(r.x[0])
    err, se = finetune_bo_test_error(q, **common)
    err_printed, _ = finetune_bo_test_error(q, shift="q0", **common)
    return FinetuneBO(
        q_BO=q,
        qhat_BO=qhat,
        bo_overlap=math.sqrt(q / q0),
        bo_finetune_test_error=err,
        bo_finetune_test_error_se=se,
        bo_finetune_test_error_eq97_printed=err_printed,
        converged=sol.converged,
        residual=r.residual,
        iterations=r.iterations,
        start=start,
        free_entropy=phi,
        other_start_q=float(others[0].x[0]) if others else math.nan,
    )


# ---------------------------------------------------------------------------
# public entry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BayesResult:
    """Both BO benchmarks for a :class:`Params` (Result 6)."""

    pretrain: PretrainBO
    finetune: FinetuneBO
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.pretrain.converged and self.finetune.converged

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict; keys: bo_pretrain_test_error, bo_finetune_test_error, bo_overlap,
        Q_BO, q_BO, ..., with the convergence records of both solves."""
        p, f = self.pretrain, self.finetune
        out = {
            "bo_pretrain_test_error": p.bo_pretrain_test_error,
            "bo_finetune_test_error": f.bo_finetune_test_error,
            "bo_overlap": f.bo_overlap,
            "Q_BO": p.Q_BO,
            "q_BO": f.q_BO,
            "Qhat_BO": p.Qhat_BO,
            "qhat_BO": f.qhat_BO if math.isfinite(f.qhat_BO) else None,
            "bo_pretrain_test_error_se": p.bo_pretrain_test_error_se,
            "bo_finetune_test_error_se": f.bo_finetune_test_error_se,
            "bo_finetune_test_error_eq97_printed": f.bo_finetune_test_error_eq97_printed,
            "bo_converged": self.converged,
            "bo_pretrain_converged": p.converged,
            "bo_pretrain_residual": p.residual,
            "bo_pretrain_iterations": p.iterations,
            "bo_finetune_converged": f.converged,
            "bo_finetune_residual": f.residual,
            "bo_finetune_iterations": f.iterations,
            "bo_finetune_start": f.start,
        }
        out.update({f"bo_{k}": v for k, v in self.settings.items()})
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def bayes_optimal(
    params: Params, *, n_mc: int = 4000, n_nodes: int = 12, n_mc_error: int = 20000, seed: int = 0, tol: float = 1e-9
) -> BayesResult:
    """BO benchmarks (Result 6, Appendix B) at the data parameters of ``params``.

    Uses alpha, alpha_ft, tokens, kappa0, noise, reuse and activation; the
    regularisations (lam, lam_ft), kappa, beta and active_pool do not enter.
    """
    if not isinstance(params, Params):
        raise ParamError(f"params must be a hdlora.Params, got {type(params).__name__}")
    # the data parameters both stages take
    data: dict[str, Any] = {k: getattr(params, k) for k in ("tokens", "kappa0", "noise", "activation")}
    # the fine-tuning's sample settings, as passed and as recorded in the result
    settings: dict[str, Any] = {"n_mc": n_mc, "n_nodes": n_nodes, "n_mc_error": n_mc_error, "seed": seed}
    pre = solve_pretrain_bo(alpha=params.alpha, n_mc=n_mc_error, seed=seed, tol=tol, **data)
    ft = solve_finetune_bo(alpha_ft=params.alpha_ft, Q_BO=pre.Q_BO, reuse=params.reuse, tol=tol, **settings, **data)
    return BayesResult(pretrain=pre, finetune=ft, settings=settings)
