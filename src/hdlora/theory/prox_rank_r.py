"""The per-sample prox of the rank-r fine-tuning channel (docs/theory/rank_r.md, secs. 3, 8, 8b).

psi(chi) = -||sigma(Zq + chi chi^T) - Y||_F^2 - 1/2 tr[(chi - chi_tilde) v^{-1} (chi - chi_tilde)^T], chi in R^{T x r}
(R.3).  In the eigenbasis of v = U diag(d) U^T (xi = chi U) the prior is diagonal, the form of the compiled
Newton kernel (:func:`hdlora.theory.newton.minimise`, potential FINETUNE_RANK_R): x = vec(xi) (row-major,
index a r + k), weights w = (d_1..d_r) repeated T times.  psi is not concave: the global search runs the kernel
from several starts (:func:`search_starts`) and keeps the largest psi.  For sigma(x) = x/T every kept maximiser
gets a certificate of global optimality or is counted as uncertified (:func:`linear_certificate`, R.16).

:func:`loss_derivatives` is the batched NumPy reference of the kernel's potential (R.11), kept for the tests
(the kernel is checked against it and against finite differences) and the docs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import newton as _newton

__all__ = ["MAX_PROX_DIM", "loss_derivatives", "search_starts", "prox_rank_r", "linear_certificate"]

#: largest per-sample dimension T r of the rank-r prox (the kernel holds (T r)^2 Hessians per sample and
#: diagonalises them by Jacobi rotations, O((T r)^3) per sweep; beyond 64 a state-evolution step would take hours).
MAX_PROX_DIM = 64


# ----------------------------------------------------------------------------------------
# NumPy reference of the rank-r potential (loss part of -psi), batched, samples first
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
# starting points of the global search
# ----------------------------------------------------------------------------------------
def _polar(A: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor of a batch of square matrices (n, r, r)."""
    U, _s, Vt = np.linalg.svd(A)
    return U @ Vt


def _sign_flips(r: int):
    return [np.array([1.0 if (f >> j) & 1 == 0 else -1.0 for j in range(r)]) for f in range(2**r)]


def search_starts(ct: np.ndarray, Zq: np.ndarray, Y_arg: np.ndarray | None, softmax: bool, n_random: int):
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




# ----------------------------------------------------------------------------------------
# the prox: compiled Newton from several starts, largest psi kept
# ----------------------------------------------------------------------------------------
def _kernel_rows(Zq: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """The kernel's per-sample row [Zq (T*T), Y (T*T)] (as FINETUNE)."""
    n = Zq.shape[0]
    return np.ascontiguousarray(np.concatenate([Zq.reshape(n, -1), Y.reshape(n, -1)], axis=1))


def linear_certificate(xi: np.ndarray, K: np.ndarray, d: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
    """Certificate of global optimality of a stationary point xi (n, T, r) of the linear-sigma prox
    (docs/theory/rank_r.md, R.16): f(xi) = ||xi xi^T - K||_F^2 / T^2 + sum (xi - xi~)^2 / (2 d) is bounded below by
    the quadratic g(xi) = f(xi) - ||xi^T xi - G||_F^2 / T^2 (G = xi_0^T xi_0 at the candidate), tangent to f there;
    g is convex iff lambda_min(4 G / T^2 + diag(1/d)) >= 4 lambda_max(K) / T^2, and then the stationary xi_0 is the
    global minimiser of g, hence of f.  Returns (n,) bool: certified (within rel_tol of the scale of the terms)."""
    T = xi.shape[1]
    G = np.swapaxes(xi, 1, 2) @ xi
    A = (4.0 / T**2) * G + np.diag(1.0 / d)
    lhs = np.linalg.eigvalsh(A)[:, 0]
    rhs = (4.0 / T**2) * np.linalg.eigvalsh(0.5 * (K + np.swapaxes(K, 1, 2)))[:, -1]
    return lhs >= rhs - rel_tol * (np.abs(lhs) + np.abs(rhs) + 1.0 / d.max())


def prox_rank_r(
    chi_tilde: np.ndarray,
    Zq: np.ndarray,
    Y: np.ndarray,
    v: np.ndarray,
    activation: str,
    *,
    Y_arg: np.ndarray | None = None,
    warm: np.ndarray | None = None,
    global_search: bool = True,
    n_random: int = 2,
    xtol: float = 1e-9,
    max_steps: int = 60,
) -> dict[str, Any]:
    """argmax_chi psi(chi) (R.3) for every sample, by the compiled Newton kernel from several starts.

    Args:
        chi_tilde: (n, T, r).  Zq: (n, T, T) z - tr(q) I.  Y: (n, T, T) target sigma(Y_arg).
        v: (r, r) symmetric positive definite.
        Y_arg: target argument (needed by the global search's fits and the linear certificate).
        warm: (n, T, r) the previous prox (a start; alone when ``global_search`` is False).
        global_search: run every start of :func:`search_starts` (else only ``warm``, or chi_tilde without one).

    Returns a dict: chi (n, T, r), xi = chi U, psi (n,), hess_f (n, Tr, Tr) the Hessian of -psi in the xi
    coordinates (v = U diag(d) U^T), d, U, dq (n,) d psi / d tr q, converged, n_not_max, n_changed (samples where
    a start other than the first gave the kept maximum), certified (linear sigma: (n,) bool, R.16; else None).
    """
    v = 0.5 * (v + v.T)
    d, U = np.linalg.eigh(v)
    if d.min() <= 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"v must be symmetric positive definite, eigenvalues {d}")
    n, T, r = chi_tilde.shape
    ct = chi_tilde @ U
    starts = [] if warm is None else [warm @ U]
    if global_search or warm is None:
        starts.append(ct)
    if global_search:
        starts += search_starts(ct, Zq, Y_arg, activation == "softmax", n_random)
    k = T * r
    w = np.tile(d, T)
    rows = _kernel_rows(Zq, Y)
    anchor = ct.reshape(n, k)
    rule = _newton.NewtonRule.finetune(xtol, max_steps, float(d.max()))
    best = None
    changed = np.zeros(n, dtype=bool)
    for s in starts:
        out = _newton.minimise(
            _newton.FINETUNE_RANK_R, s.reshape(n, k), anchor, w, rows, T, activation == "softmax", rule, n_aux=1
        )
        if best is None:
            best = {"x": out.x, "f": out.f, "hess": out.hess, "dq": out.aux[:, 0].copy(), "conv": out.converged}
            continue
        better = out.f < best["f"] - 1e-12 * np.maximum(1.0, np.abs(best["f"]))
        changed |= better
        best["x"][better] = out.x[better]
        best["f"][better] = out.f[better]
        best["hess"][better] = out.hess[better]
        best["dq"][better] = out.aux[better, 0]
        best["conv"][better] = out.converged[better]
    assert best is not None  # starts holds at least one point
    Hf = best["hess"] + np.diag(1.0 / w)
    n_not_max = int(np.sum(np.linalg.eigvalsh(Hf)[:, 0] <= 0))
    xi = best["x"].reshape(n, T, r)
    certified = None
    if activation == "linear" and Y_arg is not None:
        certified = linear_certificate(xi, Y_arg - Zq, d)
    return {
        "chi": xi @ U.T,
        "xi": xi,
        "psi": -best["f"],
        "hess_f": Hf,
        "d": d,
        "U": U,
        "dq": best["dq"],
        "converged": best["conv"],
        "n_not_max": n_not_max,
        "n_changed": int(changed.sum()),
        "certified": certified,
    }
