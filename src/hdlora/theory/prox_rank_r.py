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

from ..activations import get as get_activation
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
    P = get_activation(activation, "numpy")(X)
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


def search_starts(
    ct: np.ndarray, Zq: np.ndarray, Y_arg: np.ndarray | None, softmax: bool, n_random: int, fits_signs: str = "pm"
) -> list[np.ndarray]:
    """Starting points (n, T, r) of the global search, for chi_tilde ct (n, T, r):
    ct with every pattern of column signs; the fits xi xi^T ~ K = Y_arg - Zq (top-r eigenpairs of K, and
    of J K J for softmax), rotated onto ct by orthogonal Procrustes (the nearest to ct of the family F O, O in O(r)),
    and their negation (at rank r > 1 the other column-sign patterns of the fits are further from ct and were
    measured to add no better maximum: docs/theory/rank_r.md, sec. 8);
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
            out += [FO, -FO] if fits_signs == "pm" else [FO * s for s in flips]
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


def linear_certificate(
    xi: np.ndarray, K: np.ndarray, d: np.ndarray, n_theta: int = 21, rel_tol: float = 1e-9
) -> np.ndarray:
    """Certificate of global optimality of a stationary point xi (n, T, r) of the linear-sigma prox
    (docs/theory/rank_r.md, R.16).  With Z = xi xi^T, G = xi^T xi (||Z||_F = ||G||_F),

        f(xi) = ||Z - K||_F^2 / T^2 + sum_{a,k} (xi_ak - a_ak)^2 / (2 d_k)
              = [theta ||Z - K||^2 + (1 - theta)(||G||^2 - 2 <K, Z> + ||K||^2)] / T^2 + prior,

    and the convex terms ||Z - K||^2, ||G||^2 are bounded below by their tangents at the candidate (Z0 - K, G0).
    For every theta in [0, 1] this gives a quadratic minorant of f, tangent to f at xi_0, with the constant Hessian

        H_theta = (4 / T^2) [theta Z0 (x) I_r - K (x) I_r + (1 - theta) I_T (x) G0] + I_T (x) diag(1/d).

    If H_theta is positive semidefinite for one theta, the stationary xi_0 minimises the minorant, hence f, globally.
    theta = 0 at r = 1 is the trust-region condition (always met by the global minimiser there).  Tried: theta on a
    grid of ``n_theta`` points (the ends first).  Returns (n,) bool: certified (lambda_min(H_theta) >= -rel_tol scale)."""
    n, T, r = xi.shape
    G = np.swapaxes(xi, 1, 2) @ xi
    Z = xi @ np.swapaxes(xi, 1, 2)
    Ks = 0.5 * (K + np.swapaxes(K, 1, 2))
    I_r, I_T = np.eye(r), np.eye(T)
    c = 4.0 / T**2
    base = (-c * np.einsum("nab,ij->naibj", Ks, I_r) + np.einsum("ab,ij->aibj", I_T, np.diag(1.0 / d))[None]).reshape(
        n, T * r, T * r
    )
    Zr = c * np.einsum("nab,ij->naibj", Z, I_r).reshape(n, T * r, T * r)
    Gr = c * np.einsum("ab,nij->naibj", I_T, G).reshape(n, T * r, T * r)
    scale = np.abs(base).max(axis=(1, 2)) + np.abs(Zr).max(axis=(1, 2)) + np.abs(Gr).max(axis=(1, 2))
    ok = np.zeros(n, dtype=bool)
    thetas = np.linspace(0.0, 1.0, max(n_theta, 2))
    for th in np.concatenate([thetas[[0, -1]], thetas[1:-1]]):
        idx = np.flatnonzero(~ok)
        if idx.size == 0:
            break
        H = base[idx] + th * Zr[idx] + (1.0 - th) * Gr[idx]
        ok[idx] = np.linalg.eigvalsh(H)[:, 0] >= -rel_tol * scale[idx]
    return ok


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
    a start other than the first gave the kept maximum), certified (linear sigma after a global search: (n,) bool,
    R.16; else None).
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
    if activation == "linear" and Y_arg is not None and global_search:
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
