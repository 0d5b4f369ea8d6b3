"""Rank-r LoRA on a rank-r* task: the fine-tuning state evolution (PROTOTYPE, beyond the paper).

Derivation: ``docs/theory/rank_r.md`` (the matrix generalisation of App. A.5, eqs. 61-72, and of the
replicon, eq. 78).  Student w in R^{D x r}, teacher w* in R^{D x r*}; order parameters
q = w^T w / D (r x r), m = w^T w* / D (r x r*), v (r x r), q0 = w*^T w* / D (r* x r*), conjugates
m_hat (r x r*), q_hat, v_hat (r x r).  Per sample, the output channel is the prox over chi in R^{T x r} of

    psi(chi) = -|| sigma(z - tr(q) I + chi chi^T) - sigma(z* + chi* chi*^T - tr(q0) I) ||_F^2
               - 1/2 tr[(chi - chi_tilde) v^{-1} (chi - chi_tilde)^T],
    chi_tilde = chi* q0^{-1} m^T + zeta S^{1/2},   S = q - m q0^{-1} m^T   (symmetric square root),

with the rows of chi* ~ N(0, q0), of zeta ~ N(0, I_r), independent.  The loss depends on chi only
through chi chi^T, so in the eigenbasis of v = U diag(d) U^T (xi = chi U) the prox is a prox with a
*diagonal* metric (weight d_k on column k): the form of the generic kernel,
min_x loss(x) + sum_i (x_i - a_i)^2 / (2 w_i), x = vec(xi) in R^{T r}.

Status of the prox solver: the compiled kernel (:mod:`hdlora.theory.newton`) has no rank-r potential
yet (its potentials are fixed ids inside the compiled dispatch, which this file may not edit).  This
prototype supplies the rank-r loss, gradient and Hessian (:func:`loss_derivatives`, batched NumPy) and
runs them through :func:`newton_prox`, a NumPy transcription of the kernel's Newton loop with the
fine-tuning rule (:meth:`hdlora.theory.newton.NewtonRule.finetune`: step stop, Cholesky /
saddle-free direction, Armijo, derivatives of the last evaluation before the final step returned).
At r = 1 :func:`loss_derivatives` is the kernel's FINETUNE potential.  Wiring: a kernel kind
FINETUNE_RANK_R with row = [z - tr(q) I (T*T), Y (T*T)], r = k // T; the per-sample function in the
kernel's potential signature is :func:`compiled_potential` (hand-over form, tested equal).

The update (direct form, the default of the rank-one code): with g = (chi_prox - chi_tilde) v^{-1},
F = E[zeta^T g], Y_S the solution of S^{1/2} Y_S + Y_S S^{1/2} = sym(F) (Frechet derivative of the
square root),

    m_hat = alpha' (E[g^T chi*] - 2 Y_S m) q0^{-1},
    v_hat = -2 alpha' (Y_S + E[d psi / d tr q] I_r),
    q_hat = alpha' E[g^T g],
    v = (2 lam' I + v_hat)^{-1},  m = v m_hat q0,  q = v (m_hat q0 m_hat^T + q_hat) v.

('stein' form: m_hat = alpha' (v^{-1} E[chi^T chi*] - v^{-1} E[C_T] v^{-1} m) q0^{-1},
v_hat = -alpha' E[Gamma_T] - 2 alpha' E[d psi/d tr q] I, Gamma_T = v^{-1} C_T v^{-1} - T v^{-1},
C_T the token partial trace of C = -(Hess psi)^{-1}.)  At r = r* = 1, q0 = 1 these are exactly
the rank-one eqs. 67-72 of :func:`hdlora.theory.finetune._state_update`.

Gauge: the model is invariant under w -> w O.  The sampled update map is not exactly covariant
(zeta is a fixed sample), so iterating on raw matrices drifts slowly along the orbit.  Every output of
the update map is rotated to a canonical gauge (:func:`canonical_gauge`: the leading block of m
symmetric positive semidefinite, q diagonal on the complement of the range of m), and the damped
iteration (:func:`hdlora.theory.fixed_point.iterate`) runs on the entries of the gauge-fixed matrices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..activations import get as get_activation
from ..params import ParamError, Params
from .fixed_point import iterate
from .sampling import standard_normals, to_sym

__all__ = [
    "sqrtm_psd",
    "sqrtm_frechet",
    "ridge_channel",
    "canonical_gauge",
    "loss_derivatives",
    "compiled_potential",
    "newton_prox",
    "prox_rank_r",
    "output_channel",
    "replicon_map",
    "linear_test_error",
    "RankRResult",
    "solve_finetune_rank_r",
]


# ----------------------------------------------------------------------------------------
# matrix functions
# ----------------------------------------------------------------------------------------
def sqrtm_psd(S: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues, round-off, clipped to 0)."""
    S = 0.5 * (S + S.T)
    lam, U = np.linalg.eigh(S)
    return (U * np.sqrt(np.maximum(lam, 0.0))) @ U.T


def sqrtm_frechet(S: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Frechet derivative of S -> S^{1/2} in the direction E: the solution X of the Sylvester equation
    S^{1/2} X + X S^{1/2} = E (in the eigenbasis of S: X_ij = E_ij / (s_i + s_j), s = sqrt(eig S)).
    Also the adjoint of that derivative (the Sylvester operator is self-adjoint)."""
    lam, U = np.linalg.eigh(0.5 * (S + S.T))
    s = np.sqrt(np.maximum(lam, 0.0))
    denom = np.maximum(s[:, None] + s[None, :], 1e-300)
    return U @ ((U.T @ E @ U) / denom) @ U.T


def ridge_channel(
    mhat: np.ndarray, qhat: np.ndarray, vhat: np.ndarray, lam_ft: float, q0: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The input channel of the ridge penalty lam' ||w||_F^2 in closed form (docs/theory/rank_r.md, sec. 5):
    v = (2 lam' I + v_hat)^{-1}, m = v m_hat q0, q = v (m_hat q0 m_hat^T + q_hat) v.

    Returns (m, q, v); v = None when 2 lam' I + v_hat is not positive definite (no fixed point there)."""
    r = vhat.shape[0]
    A = 2.0 * lam_ft * np.eye(r) + 0.5 * (vhat + vhat.T)
    if np.linalg.eigvalsh(A).min() <= 0:
        return None, None, None
    v = np.linalg.inv(A)
    v = 0.5 * (v + v.T)
    m = v @ mhat @ q0
    q = v @ (mhat @ q0 @ mhat.T + qhat) @ v
    return m, 0.5 * (q + q.T), v


def canonical_gauge(
    m: np.ndarray, q: np.ndarray, v: np.ndarray, rel_tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rotate (m, q, v) -> (O^T m, O^T q O, O^T v O), O orthogonal r x r, into the canonical gauge:
    A = m E^T (E = the r x r* matrix with ones on the diagonal: the first min(r, r*) columns of m) has
    O^T A symmetric positive semidefinite on its range; on the complement (dimension r - rank A: r > r*
    or a rank-deficient m) q is diagonal with decreasing entries, each basis vector signed so that its
    largest coupling q_{i j} (else v_{i j}) to the range directions i is positive (largest component
    positive when there is no range).  Degenerate eigenvalues of q on the complement leave the gauge
    there undetermined (a limitation of this prototype).
    Returns (m, q, v, O).  At r = 1: O = sign(m) (1 when m = 0)."""
    r, rs = m.shape
    A = np.zeros((r, r))
    k0 = min(r, rs)
    A[:, :k0] = m[:, :k0]
    U, s, Vt = np.linalg.svd(A)
    V = Vt.T
    smax = s.max() if s.size else 0.0
    k = int(np.sum(s > rel_tol * max(smax, 1e-300))) if smax > 0 else 0
    if k < r:
        # complement in the student space: N0 = U[:, k:], ordered by the eigenvalues of q there
        N0 = U[:, k:]
        lam, Z = np.linalg.eigh(N0.T @ q @ N0)
        Z = Z[:, ::-1]
        N = N0 @ Z
        Rk = U[:, :k] @ V[:, :k].T  # the range part of O (invariant under the SVD's sign choices)
        for j in range(N.shape[1]):  # sign: the largest coupling to the range, in canonical coordinates
            for c in (Rk.T @ q @ N[:, j], Rk.T @ v @ N[:, j], N[:, j]):
                if c.size and np.abs(c).max() > 1e-12 * (1.0 + np.abs(q).max()):
                    if c[np.argmax(np.abs(c))] < 0:
                        N[:, j] = -N[:, j]
                    break
        # complement in the canonical coordinates: standard basis vectors least in span(V_k), Gram-Schmidt
        Vk = V[:, :k]
        P = np.eye(r) - Vk @ Vk.T
        order = np.argsort(-np.linalg.norm(P, axis=0), kind="stable")[: r - k]
        Vc, _ = np.linalg.qr(P[:, np.sort(order)])
        for j in range(Vc.shape[1]):  # keep e_j -> e_j where the complement is a standard basis vector
            if Vc[np.argmax(np.abs(Vc[:, j])), j] < 0:
                Vc[:, j] = -Vc[:, j]
        Uf = np.concatenate([U[:, :k], N], axis=1)
        Vf = np.concatenate([Vk, Vc], axis=1)
    else:
        Uf, Vf = U, V
    O = Uf @ Vf.T
    mq = O.T @ m
    qq = O.T @ q @ O
    vv = O.T @ v @ O
    return mq, 0.5 * (qq + qq.T), 0.5 * (vv + vv.T), O


# ----------------------------------------------------------------------------------------
# the rank-r potential (loss part of psi), batched, samples first
# ----------------------------------------------------------------------------------------
def _row_terms(X: np.ndarray, Y: np.ndarray, T: int, activation: str, order: int):
    """sigma(X) rows, residual R, G = dl/dX and the row Hessians h (n, T, T, T) (h[:, a] = d2 l / dX_a dX_a)."""
    if activation == "linear":
        P = X / T
    else:
        P = np.exp(X - X.max(axis=2, keepdims=True))
        P /= P.sum(axis=2, keepdims=True)
    R = P - Y
    if order == 0:
        return R, None, None
    if activation == "linear":
        G = (2.0 / T) * R
    else:
        Uu = P * (R - (P * R).sum(axis=2, keepdims=True))
        G = 2.0 * Uu
    if order < 2:
        return R, G, None
    n = X.shape[0]
    if activation == "linear":
        h = np.zeros((n, T, T, T))
        d = np.arange(T)
        h[:, :, d, d] = 2.0 / T**2
    else:
        W = P * P + 0.5 * G  # w = p o p + u
        pp = (P * P).sum(axis=2)  # |p_a|^2
        h = 2.0 * (
            W[:, :, :, None] * np.eye(T)[None, None]
            - W[:, :, :, None] * P[:, :, None, :]
            - P[:, :, :, None] * W[:, :, None, :]
            + pp[:, :, None, None] * P[:, :, :, None] * P[:, :, None, :]
        )
    return R, G, h


def loss_derivatives(
    xi: np.ndarray, Zq: np.ndarray, Y: np.ndarray, activation: str, order: int = 2
) -> np.ndarray | tuple[np.ndarray, ...]:
    """l(xi) = ||sigma(Zq + xi xi^T) - Y||_F^2 and its derivatives in vec(xi) (row-major, index a r + k).

    Args:
        xi: (n, T, r).  Zq: (n, T, T) the frozen argument z - tr(q) I.  Y: (n, T, T) the target.
        order: 0 (value), 1 (+ gradient (n, T, r)), 2 (+ Hessian (n, T r, T r) and Tr G = d psi / d tr q).

    Gradient (G + G^T) xi; Hessian (docs/theory/rank_r.md, sec. 8, R.11)
        H[(a,k),(b,j)] = (G + G^T)_ab delta_kj + delta_ab (xi^T h_a xi)_kj
                         + (h_a xi)_bk xi_aj + (h_b xi)_aj xi_bk + sum_c (h_c)_ab xi_ck xi_cj.
    At r = 1 this is the kernel's FINETUNE potential.
    """
    n, T, r = xi.shape
    X = Zq + xi @ np.swapaxes(xi, 1, 2)
    R, G, h = _row_terms(X, Y, T, activation, order)
    loss = (R * R).sum(axis=(1, 2))
    if order == 0:
        return loss
    Gs = G + np.swapaxes(G, 1, 2)
    grad = Gs @ xi
    if order == 1:
        return loss, grad
    hx = np.einsum("naec,nck->naek", h, xi)  # (h_a xi)_e, (n, a, e, r)
    H = np.einsum("nab,kj->nakbj", Gs, np.eye(r))
    quad = np.einsum("nck,nacj->nakj", xi, hx)  # xi^T h_a xi
    d = np.arange(T)
    H[:, d, :, d, :] += np.moveaxis(quad, 1, 0)
    cross = np.einsum("nabk,naj->nakbj", hx, xi)  # (h_a xi)_bk xi_aj
    H += cross + np.transpose(cross, (0, 3, 4, 1, 2))
    H += np.einsum("ncab,nckj->nakbj", h, xi[:, :, :, None] * xi[:, :, None, :])
    dq = np.trace(G, axis1=1, axis2=2)
    return loss, grad, H.reshape(n, T * r, T * r), dq


# ----------------------------------------------------------------------------------------
# the same potential per sample, compiled, in the kernel's potential signature (for wiring)
# ----------------------------------------------------------------------------------------
_COMPILED: Any = None


def compiled_potential() -> tuple[Any, Any]:
    """(loss, evaluate): the rank-r loss as a Numba function with the signature of the kernel's
    potentials, ``loss(x, row, T, softmax, order, g, H, aux, X, P, R, G)`` (x = vec(xi), k = T r, r = k // T;
    row = [Zq (T*T), Y (T*T)]; aux[0] = Tr G; X is reused as the row-Hessian scratch), ready to be added to
    :func:`hdlora.theory._newton_numba.loss_derivatives` as a kind FINETUNE_RANK_R; and ``evaluate(xs,
    data, T, softmax, order, out_g, out_H, out_aux)`` over rows (tests).  Compiled on first call (numba
    imported lazily, not cached on disk: this is the hand-over form, the kernel will own the cached one).
    """
    global _COMPILED
    if _COMPILED is not None:
        return _COMPILED
    from numba import njit

    from ._newton_numba import _softmax_rows

    @njit(cache=False)
    def loss(x, row, T, softmax, order, g, H, aux, X, P, R, G):
        k = x.shape[0]
        r = k // T
        TT = T * T
        for a in range(T):
            for b in range(T):
                acc = row[a * T + b]
                for c in range(r):
                    acc += x[a * r + c] * x[b * r + c]
                X[a, b] = acc
        if softmax:
            _softmax_rows(X, P, T)
        else:
            for a in range(T):
                for b in range(T):
                    P[a, b] = X[a, b] / T
        val = 0.0
        for a in range(T):
            for b in range(T):
                rr = P[a, b] - row[TT + a * T + b]
                R[a, b] = rr
                val += rr * rr
        if order == 0:
            return val
        if softmax:
            for a in range(T):
                s = 0.0
                for b in range(T):
                    s += P[a, b] * R[a, b]
                for b in range(T):
                    G[a, b] = 2.0 * (P[a, b] * (R[a, b] - s))
        else:
            for a in range(T):
                for b in range(T):
                    G[a, b] = (2.0 / T) * R[a, b]
        dq = 0.0
        for a in range(T):
            dq += G[a, a]
        aux[0] = dq
        for a in range(T):
            for c in range(r):
                acc = 0.0
                for b in range(T):
                    acc += (G[a, b] + G[b, a]) * x[b * r + c]
                g[a * r + c] = acc
        if order < 2:
            return val
        for i in range(k):
            for j in range(k):
                H[i, j] = 0.0
        for a in range(T):
            for b in range(T):
                gs = G[a, b] + G[b, a]
                for c in range(r):
                    H[a * r + c, b * r + c] += gs
        for a in range(T):
            # row Hessian h_a into X (X is no longer needed)
            if softmax:
                pp = 0.0
                for b in range(T):
                    pp += P[a, b] * P[a, b]
                for b in range(T):
                    wb = P[a, b] * P[a, b] + 0.5 * G[a, b]
                    for e in range(T):
                        we = P[a, e] * P[a, e] + 0.5 * G[a, e]
                        hv = pp * P[a, b] * P[a, e] - wb * P[a, e] - P[a, b] * we
                        if b == e:
                            hv += wb
                        X[b, e] = 2.0 * hv
            else:
                for b in range(T):
                    for e in range(T):
                        X[b, e] = 2.0 / (T * T) if b == e else 0.0
            for b in range(T):
                for kk in range(r):
                    hx = 0.0  # (h_a xi)_{b kk}
                    for e in range(T):
                        hx += X[b, e] * x[e * r + kk]
                    for j in range(r):
                        val2 = hx * x[a * r + j]
                        H[a * r + kk, b * r + j] += val2  # (h_a xi)_bk xi_aj
                        H[b * r + j, a * r + kk] += val2  # and its transpose
                        # delta_ab (xi^T h_a xi)_{kk j}: sum over b of xi_{b kk} (h_a xi)_{b j} -- below
            for kk in range(r):
                for j in range(r):
                    qd = 0.0
                    for b in range(T):
                        for e in range(T):
                            qd += x[b * r + kk] * X[b, e] * x[e * r + j]
                    H[a * r + kk, a * r + j] += qd
            # sum_c (h_c)_{b e} xi_ck xi_cj with c = a
            for b in range(T):
                for e in range(T):
                    hbe = X[b, e]
                    if hbe == 0.0:
                        continue
                    for kk in range(r):
                        for j in range(r):
                            H[b * r + kk, e * r + j] += hbe * x[a * r + kk] * x[a * r + j]
        return val

    @njit(cache=False)
    def evaluate(xs, data, T, softmax, order, out_g, out_H, out_aux):
        n, k = xs.shape
        X = np.empty((T, T))
        P = np.empty((T, T))
        R = np.empty((T, T))
        G = np.empty((T, T))
        g = np.empty(k)
        H = np.empty((k, k))
        aux = np.zeros(1)
        out = np.empty(n)
        for s_ in range(n):
            out[s_] = loss(xs[s_], data[s_], T, softmax, order, g, H, aux, X, P, R, G)
            for i in range(k):
                out_g[s_, i] = g[i]
                for j in range(k):
                    out_H[s_, i, j] = H[i, j]
            out_aux[s_, 0] = aux[0]
        return out

    _COMPILED = (loss, evaluate)
    return _COMPILED


# ----------------------------------------------------------------------------------------
# Newton prox (NumPy transcription of the kernel's loop, NewtonRule.finetune)
# ----------------------------------------------------------------------------------------
@dataclass
class _NewtonOut:
    x: np.ndarray  # (n, T, r)
    f: np.ndarray  # (n,) loss + prior (minimised)
    hess: np.ndarray  # (n, k, k) loss Hessian at the returned derivatives' point
    dq: np.ndarray  # (n,) Tr G there
    residual: np.ndarray  # (n,) last step norm
    converged: np.ndarray  # (n,)


def _chol_step(A: np.ndarray, b: np.ndarray):
    """-A^{-1} b by a batched Cholesky (loops over the k x k entries, vectorised over samples);
    pd[i] False where a pivot is not > 1e-300 (the kernel's pd_min); the step there is garbage."""
    n, k, _ = A.shape
    Lc = np.zeros_like(A)
    pd = np.ones(n, dtype=bool)
    for j in range(k):
        dj = A[:, j, j] - (Lc[:, j, :j] ** 2).sum(axis=1)
        good = dj > 1e-300
        pd &= good
        ljj = np.sqrt(np.where(good, dj, 1.0))
        Lc[:, j, j] = ljj
        for i in range(j + 1, k):
            Lc[:, i, j] = (A[:, i, j] - (Lc[:, i, :j] * Lc[:, j, :j]).sum(axis=1)) / ljj
    y = np.empty_like(b)
    for i in range(k):
        y[:, i] = (b[:, i] - (Lc[:, i, :i] * y[:, :i]).sum(axis=1)) / Lc[:, i, i]
    x = np.empty_like(b)
    for i in reversed(range(k)):
        x[:, i] = (y[:, i] - (Lc[:, i + 1 :, i] * x[:, i + 1 :]).sum(axis=1)) / Lc[:, i, i]
    return -x, pd


def newton_prox(
    x0: np.ndarray,
    Zq: np.ndarray,
    Y: np.ndarray,
    anchor: np.ndarray,
    w: np.ndarray,
    activation: str,
    *,
    xtol: float = 1e-9,
    max_steps: int = 60,
) -> _NewtonOut:
    """min_x l(x) + sum_{a,k} (x_ak - anchor_ak)^2 / (2 w_k) for every sample, x (n, T, r), w (r,) > 0.

    The rule of :meth:`hdlora.theory.newton.NewtonRule.finetune`: a sample stops when its Newton step
    is below xtol (1 + |x|) at a positive-definite Hessian of f (the step is taken, the derivatives of
    the point before it are returned, as the kernel does); otherwise the direction is Newton (positive
    definite) or saddle-free (|eigenvalues| floored at 1e-3 / max w), the full step is trusted when
    shorter than 1e-3 (1 + |x|), else Armijo backtracking (40 halvings, slack 1e-14 |f|), and a sample
    with no acceptable step stops unconverged.
    """
    n, T, r = x0.shape
    k = T * r
    wv = np.tile(np.asarray(w, dtype=np.float64), T)  # weight of vec index a r + k
    x = x0.reshape(n, k).copy()
    a = anchor.reshape(n, k)

    def ev(xs, idx, order):
        out = loss_derivatives(xs.reshape(-1, T, r), Zq[idx], Y[idx], activation, order)
        prior = (((xs - a[idx]) ** 2) / (2.0 * wv)).sum(axis=1)
        if order == 0:
            return out + prior
        loss, g, H, dq = out
        return loss + prior, g.reshape(-1, k), H, dq

    all_idx = np.arange(n)
    f, gl, Hl, dq = ev(x, all_idx, 2)
    res = np.full(n, np.inf)
    conv = np.zeros(n, dtype=bool)
    active = np.ones(n, dtype=bool)
    floor = 1e-3 / wv.max()
    for _ in range(max_steps):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xa = x[idx]
        gf = gl[idx] + (xa - a[idx]) / wv
        Hf = Hl[idx] + np.diag(1.0 / wv)
        step, pd = _chol_step(Hf, gf)
        bad = np.flatnonzero(~pd)
        if bad.size:  # saddle-free direction where f is not convex
            lam, V = np.linalg.eigh(Hf[bad])
            lam_eff = np.maximum(np.abs(lam), floor)
            step[bad] = -np.einsum("nij,nj->ni", V, np.einsum("nji,nj->ni", V, gf[bad]) / lam_eff)
        snorm = np.linalg.norm(step, axis=1)
        xnorm = np.linalg.norm(xa, axis=1)
        res[idx] = snorm
        done = pd & (snorm < xtol * (1.0 + xnorm))
        if done.any():
            di = idx[done]
            x[di] += step[done]
            conv[di] = True
            active[di] = False
        go = ~done
        idx, step, xa, gf, pd, snorm, xnorm = idx[go], step[go], xa[go], gf[go], pd[go], snorm[go], xnorm[go]
        if idx.size == 0:
            continue
        trusted = pd & (snorm < 1e-3 * (1.0 + xnorm))
        slope = (gf * step).sum(axis=1)
        f0 = f[idx]
        t = np.ones(idx.size)
        accepted = np.zeros(idx.size, dtype=bool)
        searching = np.ones(idx.size, dtype=bool)
        first = True
        for _try in range(40):
            s_idx = np.flatnonzero(searching)
            if s_idx.size == 0:
                break
            xt = xa[s_idx] + t[s_idx, None] * step[s_idx]
            if first:
                ft, gt, Ht, dqt = ev(xt, idx[s_idx], 2)
            else:
                ft = ev(xt, idx[s_idx], 0)
            ok = (trusted[s_idx] & first) | (
                ft <= f0[s_idx] + 1e-4 * t[s_idx] * slope[s_idx] + 1e-14 * np.abs(f0[s_idx])
            )
            acc = s_idx[ok]
            gi = idx[acc]
            x[gi] = xt[ok]
            if first:
                f[gi], gl[gi], Hl[gi], dq[gi] = ft[ok], gt[ok], Ht[ok], dqt[ok]
            else:
                fa, ga, Ha, dqa = ev(x[gi], gi, 2)
                f[gi], gl[gi], Hl[gi], dq[gi] = fa, ga, Ha, dqa
            accepted[acc] = True
            searching[acc] = False
            t[searching] *= 0.5
            first = False
        stuck = idx[~accepted]
        active[stuck] = False
    return _NewtonOut(x.reshape(n, T, r), f, Hl, dq, res, conv)


# ----------------------------------------------------------------------------------------
# the prox of psi with a global multi-start search
# ----------------------------------------------------------------------------------------
def _polar(A: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor of a batch of square matrices (n, r, r)."""
    U, _s, Vt = np.linalg.svd(A)
    return U @ Vt


def _sign_flips(r: int):
    return [np.array([1.0 if (f >> j) & 1 == 0 else -1.0 for j in range(r)]) for f in range(2**r)]


def _starts(ct: np.ndarray, Zq: np.ndarray, Y_arg: np.ndarray | None, softmax: bool, n_random: int):
    """Starting points (n, T, r) of the global search, for chi_tilde ct (n, T, r):
    ct with every pattern of column signs; the fits xi xi^T ~ K = Y_arg - Zq (top-r eigenpairs of K, and
    of J K J for softmax), rotated onto ct by orthogonal Procrustes, with every pattern of column signs;
    fixed random points of the scale of ct; for softmax, ct with one row scaled by 1.5.
    At r = 1 these include the rank-one search starts (-ct, +-sqrt(lambda_1) u_1 of K and J K J)."""
    n, T, r = ct.shape
    flips = _sign_flips(r)
    out = [ct * s for s in flips[1:]]
    if Y_arg is not None:
        K = Y_arg - Zq
        K = 0.5 * (K + np.swapaxes(K, 1, 2))
        mats = [K]
        if softmax:
            J = np.eye(T) - 1.0 / T
            mats.append(J @ K @ J)
        for A in mats:
            lam, U = np.linalg.eigh(A)
            F = np.zeros((n, T, r))
            kk = min(r, T)
            F[:, :, :kk] = U[:, :, ::-1][:, :, :kk] * np.sqrt(np.maximum(lam[:, ::-1][:, :kk], 0.0))[:, None, :]
            O = _polar(np.swapaxes(F, 1, 2) @ ct)  # argmin_O ||F O - ct||
            FO = F @ O
            out += [FO * s for s in flips]
    rng = np.random.default_rng(12345)
    scale = 1.0 + np.linalg.norm(ct.reshape(n, -1), axis=1)
    for _ in range(n_random):
        out.append(rng.standard_normal((n, T, r)) * scale[:, None, None] * rng.uniform(0.3, 1.5))
    if softmax:
        for a in range(T):
            c = ct.copy()
            c[:, a, :] *= 1.5
            out.append(c)
    return out


def prox_rank_r(
    chi_tilde: np.ndarray,
    Zq: np.ndarray,
    Y: np.ndarray,
    v: np.ndarray,
    activation: str,
    *,
    Y_arg: np.ndarray | None = None,
    warm: np.ndarray | None = None,
    n_random: int = 2,
    xtol: float = 1e-9,
    max_steps: int = 60,
) -> dict[str, Any]:
    """argmax_chi psi(chi) (eq. 64 at rank r) for every sample, by Newton from several starts.

    Args:
        chi_tilde: (n, T, r).  Zq: (n, T, T) z - tr(q) I.  Y: (n, T, T) target sigma(Y_arg).
        v: (r, r) symmetric positive definite.  Y_arg: target argument (adds the global-search starts).
        warm: (n, T, r) an extra start (the previous prox).

    Returns a dict: chi (n, T, r), psi (n,), hess_f (n, Tr, Tr) Hessian of -psi in the rotated
    coordinates xi = chi U (v = U diag(d) U^T), d, U, dq (n,) d psi / d tr q, converged, n_not_max.
    """
    v = 0.5 * (v + v.T)
    d, U = np.linalg.eigh(v)
    if d.min() <= 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"v must be symmetric positive definite, eigenvalues {d}")
    ct = chi_tilde @ U
    starts = [ct]
    if warm is not None:
        starts.insert(0, warm @ U)
    starts += (
        _starts(ct, Zq, Y_arg, activation == "softmax", n_random)
        if Y_arg is not None
        else [ct * s for s in _sign_flips(ct.shape[2])[1:]]
    )
    best = None
    for s in starts:
        out = newton_prox(s, Zq, Y, ct, d, activation, xtol=xtol, max_steps=max_steps)
        if best is None:
            best = out
            continue
        better = out.f < best.f - 1e-12 * np.maximum(1.0, np.abs(best.f))
        for name in ("x", "f", "hess", "dq", "residual", "converged"):
            getattr(best, name)[better] = getattr(out, name)[better]
    assert best is not None  # starts holds at least chi_tilde
    n, T, r = ct.shape
    Hf = best.hess + np.diag(1.0 / np.tile(d, T))
    n_not_max = int(np.sum(np.linalg.eigvalsh(Hf).min(axis=1) <= 0))
    return {
        "chi": best.x @ U.T,
        "xi": best.x,
        "psi": -best.f,
        "hess_f": Hf,
        "d": d,
        "U": U,
        "dq": best.dq,
        "converged": best.converged,
        "n_not_max": n_not_max,
    }


# ----------------------------------------------------------------------------------------
# replicon (docs/theory/rank_r.md, sec. 10)
# ----------------------------------------------------------------------------------------
def _sym_basis(r: int) -> np.ndarray:
    """Orthonormal basis of the symmetric r x r matrices, as columns of an (r^2, r(r+1)/2) array."""
    cols = []
    for i in range(r):
        for j in range(i, r):
            E = np.zeros((r, r))
            if i == j:
                E[i, i] = 1.0
            else:
                E[i, j] = E[j, i] = 1.0 / math.sqrt(2.0)
            cols.append(E.reshape(-1))
    return np.array(cols).T


def replicon_map(hess_f: np.ndarray, d: np.ndarray, alpha_ft: float) -> tuple[float, np.ndarray]:
    """Spectral radius of K -> alpha' v E[tr_T(Gamma (I_T x K) Gamma^T)] v on symmetric r x r K, in the
    eigenbasis of v (v = diag(d); a conjugation leaves the spectrum unchanged).  Gamma = d g_out / d chi_tilde
    = W^{-1} C W^{-1} - W^{-1}, W = I_T x diag(d), C = (Hess of -psi)^{-1}.  At r = 1: alpha' E||C/v - I||_F^2
    = alpha' E||(v Hess psi)^{-1} + I||_F^2 (eq. 78).  Returns (radius, the r(r+1)/2 square matrix of the map)."""
    n, k, _ = hess_f.shape
    r = d.size
    T = k // r
    wi = 1.0 / np.tile(d, T)
    C = np.linalg.inv(hess_f)
    Gam = wi[None, :, None] * C * wi[None, None, :] - np.diag(wi)[None]
    Gb = Gam.reshape(n, T, r, T, r)
    # sum_{a,b} Gamma_ab (x) Gamma_ab, averaged: (r^2, r^2) acting on row-major vec K
    Mk = np.einsum("nakbj,nalbi->klji", Gb, Gb).reshape(r * r, r * r) / n
    # K -> Gamma K Gamma^T : (Gamma K Gamma^T)_{kl} = sum_{j,i} G_kj K_ji G_li -> index (k,l),(j,i)
    Dd = np.kron(np.diag(d), np.diag(d))
    M = alpha_ft * Dd @ Mk
    B = _sym_basis(r)
    Ms = B.T @ M @ B
    return float(np.max(np.abs(np.linalg.eigvals(Ms)))), Ms


def linear_test_error(T: int, delta_eff: float, q: np.ndarray, m: np.ndarray, q0: np.ndarray) -> float:
    """E' for sigma(x) = x / T at rank r (docs/theory/rank_r.md, sec. 9, R.13):
    (T^2 + T)(Delta_eff + ||q0||_F^2 + ||q||_F^2 - 2 ||m||_F^2) / T^2; at r = 1 the rank-one closed form."""
    return (T * T + T) * (delta_eff + np.sum(q0 * q0) + np.sum(q * q) - 2.0 * np.sum(m * m)) / T**2


# ----------------------------------------------------------------------------------------
# output channel: the conjugates from the per-sample prox (docs/theory/rank_r.md, secs. 6-7)
# ----------------------------------------------------------------------------------------
def output_channel(
    m: np.ndarray,
    q: np.ndarray,
    v: np.ndarray,
    chi_star: np.ndarray,
    zeta: np.ndarray,
    Zb: np.ndarray,
    Y: np.ndarray,
    q0: np.ndarray,
    alpha_ft: float,
    activation: str,
    *,
    Y_arg: np.ndarray | None = None,
    warm: np.ndarray | None = None,
    form: str = "direct",
    n_random: int = 2,
    xtol: float = 1e-9,
) -> dict[str, Any]:
    """The conjugates (m_hat, q_hat, v_hat) at (m, q, v) from the prox of every sample.

    chi_star (n, T, r*) rows ~ N(0, q0); zeta (n, T, r) rows ~ N(0, I); Zb (n, T, T) the frozen
    student argument beta z; Y (n, T, T) the target sigma(z* + chi* chi*^T - tr(q0) I).
    Also returns the sampled output free entropy ``phi_out`` = E max psi and its derivatives
    ``dphi_dm`` (r x r*), ``dphi_dq`` (r x r, symmetric: d phi = tr(dphi_dq dq)), ``dphi_dv``, in the
    direct form (the stationarity of the sampled free entropy: m_hat = alpha' dphi_dm,
    v_hat = -2 alpha' dphi_dq, q_hat = 2 alpha' dphi_dv).
    """
    n, T, r = zeta.shape
    q0i = np.linalg.inv(q0)
    S = q - m @ q0i @ m.T
    Sh = sqrtm_psd(S)
    ct = chi_star @ q0i @ m.T + zeta @ Sh  # chi_tilde
    Zq = Zb - np.trace(q) * np.eye(T)
    p = prox_rank_r(ct, Zq, Y, v, activation, Y_arg=Y_arg, warm=warm, n_random=n_random, xtol=xtol)
    chi = p["chi"]
    vi = np.linalg.inv(v)
    g = (chi - ct) @ vi  # g_out
    Egg = np.einsum("nak,naj->kj", g, g) / n
    Edq = float(p["dq"].mean())  # E d psi / d tr q
    F = np.einsum("nak,naj->kj", zeta, g) / n  # E[zeta^T g]
    Ys = sqrtm_frechet(S, 0.5 * (F + F.T))
    dphi_dm = (np.einsum("nak,naj->kj", g, chi_star) / n - 2.0 * Ys @ m) @ q0i
    dphi_dq = Ys + Edq * np.eye(r)
    out = {
        "phi_out": float(p["psi"].mean()),
        "dphi_dm": dphi_dm,
        "dphi_dq": dphi_dq,
        "dphi_dv": 0.5 * Egg,
        "qhat": alpha_ft * Egg,
        "prox": p,
        "chi_tilde": ct,
    }
    if form == "direct":
        out["mhat"] = alpha_ft * dphi_dm
        out["vhat"] = -2.0 * alpha_ft * dphi_dq
    else:  # Stein form: Gaussian integration by parts on zeta and chi*
        U = p["U"]
        Cx = np.linalg.inv(p["hess_f"]).reshape(n, T, r, T, r)
        CT = U @ (np.einsum("nakaj->kj", Cx) / n) @ U.T  # E[C_T]
        out["mhat"] = alpha_ft * (vi @ np.einsum("nak,naj->kj", chi, chi_star) / n - vi @ CT @ vi @ m) @ q0i
        out["vhat"] = -alpha_ft * (vi @ CT @ vi - T * vi) - 2.0 * alpha_ft * Edq * np.eye(r)
    return out


# ----------------------------------------------------------------------------------------
# state evolution
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankRResult:
    """Fixed point of the rank-r fine-tuning state evolution (prototype).

    Matrices as nested lists: q (r x r), m (r x r*), v (r x r), q0 (r* x r*), conjugates.  Invariants:
    tr_q, m_fro (||m||_F), overlap = ||m||_F / sqrt(||q||_F ||q0||_F), eig_q (descending), sv_m.
    """

    r: int
    r_star: int
    q: list
    m: list
    v: list
    q0: list
    qhat: list
    mhat: list
    vhat: list
    tr_q: float
    m_fro: float
    overlap: float
    eig_q: list
    sv_m: list
    finetune_test_error: float
    finetune_test_error_se: float
    replicon_finetune: float
    converged: bool
    residual: float
    iterations: int
    n_mc: int
    prox_failed: int
    prox_not_max: int
    wall_time: float = 0.0
    history: tuple = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


def _pack(m, q, v):
    r, rs = m.shape
    st = {}
    for i in range(r):
        for j in range(rs):
            st[f"m_{i}_{j}"] = float(m[i, j])
    for name, A in (("q", q), ("v", v)):
        for i in range(r):
            for j in range(i, r):
                st[f"{name}_{i}_{j}"] = float(A[i, j])
    return st


def _unpack(st, r, rs):
    m = np.array([[st[f"m_{i}_{j}"] for j in range(rs)] for i in range(r)])
    q, v = np.zeros((r, r)), np.zeros((r, r))
    for name, A in (("q", q), ("v", v)):
        for i in range(r):
            for j in range(i, r):
                A[i, j] = A[j, i] = st[f"{name}_{i}_{j}"]
    return m, q, v


def solve_finetune_rank_r(
    params: Params,
    z_star: np.ndarray,
    z: np.ndarray,
    *,
    r: int = 1,
    r_star: int = 1,
    q0: np.ndarray | None = None,
    seed: int = 0,
    tol: float = 1e-7,
    max_iter: int = 400,
    mixing: float = 0.8,
    init: Mapping[str, np.ndarray] | None = None,
    form: str = "direct",
    n_random: int = 2,
    xtol: float = 1e-9,
    delta_eff: float | None = None,
) -> RankRResult:
    """Rank-r fine-tuning state evolution on given frozen fields (z*, z) (upper triangles (n, L), as
    :func:`hdlora.theory.finetune.solve_finetune` takes them), e = 0.

    Args:
        r: LoRA rank.
        r_star: task (teacher) rank.
        q0: (r*, r*) teacher overlap (default I).
        seed: seed of chi*, zeta (standard_normals(n, T (r* + r), seed): at r = r* = 1 the rank-one draw)
            and of the test samples (seed + 104729, as the rank-one code).
        tol: tolerance of :func:`hdlora.theory.fixed_point.iterate`, on the gauge-fixed entries.
        max_iter: iteration budget of :func:`hdlora.theory.fixed_point.iterate`.
        mixing: damping of :func:`hdlora.theory.fixed_point.iterate`.
        init: {'m', 'q', 'v'} matrices (default m = 0.5 E diag(q0)^{1/2}, q = 0.5 I, v = I / (2 lam' + alpha' T), the
            rank-one cold start at r = r* = 1).
        form: 'direct' (default) or 'stein' (docs/theory/rank_r.md, sec. 4).
        delta_eff: effective noise for the linear closed-form E' (default: E' by Monte Carlo on the fields).
    """
    t0 = time.perf_counter()
    for name, val in (("r", r), ("r_star", r_star)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ParamError(f"{name} must be an integer >= 1, got {val!r}")
    if form not in ("direct", "stein"):
        raise ParamError(f"form must be 'direct' or 'stein', got {form!r}")
    if params.reuse:
        raise ParamError("the rank-r prototype covers e = 0 only (reuse=False)")
    T = params.tokens
    act = params.activation
    sigma = get_activation(act, "numpy")
    q0 = np.eye(r_star) if q0 is None else np.asarray(q0, dtype=np.float64)
    if q0.shape != (r_star, r_star) or np.linalg.eigvalsh(0.5 * (q0 + q0.T)).min() <= 0:
        raise ParamError(f"q0 must be a symmetric positive definite (r*, r*) = ({r_star}, {r_star}) matrix")
    q0i = np.linalg.inv(q0)
    q0h = sqrtm_psd(q0)
    L = T * (T + 1) // 2
    z_star = np.asarray(z_star, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if z_star.ndim != 2 or z_star.shape[1] != L or z.shape != z_star.shape:
        raise ParamError(f"z_star and z must both have shape (n, L = {L})")
    n = z_star.shape[0]
    x = standard_normals(n, T * (r_star + r), seed)
    chi_star = x[:, : T * r_star].reshape(n, r_star, T).transpose(0, 2, 1) @ q0h  # rows ~ N(0, q0)
    zeta = x[:, T * r_star :].reshape(n, r, T).transpose(0, 2, 1)  # rows ~ N(0, I_r)
    Zs = to_sym(z_star, T)
    Zb = params.beta * to_sym(z, T)
    eye = np.eye(T)
    Y_arg = Zs + chi_star @ np.swapaxes(chi_star, 1, 2) - np.trace(q0) * eye
    Y = sigma(Y_arg)
    ap, lam_ft = params.alpha_ft, params.lam_ft
    cache: dict[str, Any] = {"chi": None}

    def update(state):
        m, q, v = _unpack(state, r, r_star)
        out = output_channel(
            m,
            q,
            v,
            chi_star,
            zeta,
            Zb,
            Y,
            q0,
            ap,
            act,
            Y_arg=Y_arg,
            warm=cache["chi"],
            form=form,
            n_random=n_random,
            xtol=xtol,
        )
        m_new, q_new, v_new = ridge_channel(out["mhat"], out["qhat"], out["vhat"], lam_ft, q0)
        if v_new is None:
            raise FloatingPointError("2 lam' I + v_hat is not positive definite")
        m_new, q_new, v_new, O = canonical_gauge(m_new, q_new, v_new)
        cache["chi"] = out["prox"]["chi"] @ O
        return _pack(m_new, q_new, v_new), {
            "mhat": O.T @ out["mhat"],
            "qhat": O.T @ out["qhat"] @ O,
            "vhat": O.T @ out["vhat"] @ O,
            "prox": out["prox"],
        }

    state0: tuple[np.ndarray, ...]
    if init is None:
        vv = 1.0 / (2.0 * lam_ft + ap * T)
        m0 = np.zeros((r, r_star))
        for i in range(min(r, r_star)):
            m0[i, i] = 0.5 * math.sqrt(q0[i, i])  # S = q - m q0^-1 m^T = 0.25 I on the leading block
        state0 = (m0, 0.5 * np.eye(r), vv * np.eye(r))
    else:
        state0 = tuple(np.asarray(init[k], dtype=np.float64) for k in ("m", "q", "v"))
    state0 = canonical_gauge(*state0)[:3]
    bounds = {}
    for i in range(r):
        bounds[f"q_{i}_{i}"] = (1e-12, 1e6)
        bounds[f"v_{i}_{i}"] = (1e-12, 1e6)
        for j in range(r_star):
            bounds[f"m_{i}_{j}"] = (-1e3, 1e3)
    fp = iterate(
        update,
        _pack(*state0),
        mixing=mixing,
        tol=tol,
        max_iter=max_iter,
        bounds=bounds,
        name="rank-r fine-tuning state evolution",
        warn=False,
    )
    m, q, v = _unpack(fp.state, r, r_star)
    aux = fp.aux
    p = aux["prox"]
    rep, _ = replicon_map(p["hess_f"], p["d"], ap)
    # E' (eq. 73 at rank r): rows (chi*_a, chi_a) ~ N(0, [[q0, m^T], [m, q]]), fresh samples
    if act == "linear" and delta_eff is not None:
        E_test, E_se = linear_test_error(T, delta_eff, q, m, q0), 0.0
    else:
        xt = standard_normals(n, T * (r_star + r), seed + 104729)
        gs = xt[:, : T * r_star].reshape(n, r_star, T).transpose(0, 2, 1)
        u = xt[:, T * r_star :].reshape(n, r, T).transpose(0, 2, 1)
        cs = gs @ q0h
        ch = cs @ q0i @ m.T + u @ sqrtm_psd(q - m @ q0i @ m.T)
        pred = sigma(Zb + ch @ np.swapaxes(ch, 1, 2) - np.trace(q) * eye)
        target = sigma(Zs + cs @ np.swapaxes(cs, 1, 2) - np.trace(q0) * eye)
        losses = np.sum((pred - target) ** 2, axis=(1, 2))
        E_test, E_se = float(losses.mean()), float(losses.std(ddof=1) / math.sqrt(n))
    mf = float(np.linalg.norm(m))
    qf = float(np.linalg.norm(q))
    return RankRResult(
        r=r,
        r_star=r_star,
        q=q.tolist(),
        m=m.tolist(),
        v=v.tolist(),
        q0=q0.tolist(),
        qhat=np.asarray(aux["qhat"]).tolist(),
        mhat=np.asarray(aux["mhat"]).tolist(),
        vhat=np.asarray(aux["vhat"]).tolist(),
        tr_q=float(np.trace(q)),
        m_fro=mf,
        overlap=mf / math.sqrt(qf * float(np.linalg.norm(q0))) if qf > 0 else 0.0,
        eig_q=np.sort(np.linalg.eigvalsh(q))[::-1].tolist(),
        sv_m=np.linalg.svd(m, compute_uv=False).tolist(),
        finetune_test_error=E_test,
        finetune_test_error_se=E_se,
        replicon_finetune=rep,
        converged=bool(fp.converged),
        residual=float(fp.residual),
        iterations=fp.iterations,
        n_mc=n,
        prox_failed=int((~p["converged"]).sum()),
        prox_not_max=p["n_not_max"],
        wall_time=time.perf_counter() - t0,
        history=fp.history,
    )
