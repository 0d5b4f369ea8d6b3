"""Batched proximal operator of the pre-training output channel (eqs. 15-16, 41-42).

For a symmetric T x T matrix h, stored as its L = T(T+1)/2 upper-triangle entries
(order of :func:`hdlora.theory.sampling.upper_indices`),

    Psi(h; z*, z~) = -||sigma(h) - sigma(z*)||_F^2 - sum_{a<=b} (z~_ab - h_ab)^2 / (2 V s_ab)   (eq. 15/42)

with s_ab = 1 + delta_ab.  The Frobenius norm runs over all T x T entries, so an
off-diagonal entry h_ab = h_ba enters the loss twice; the quadratic term counts
each free entry once.

    Prox(z*, z~) = argmax_h Psi(h; z*, z~)                                          (eq. 16/41)

is computed for all n Monte-Carlo samples by the one compiled Newton prox kernel of
:mod:`hdlora.theory.newton` (analytic gradient and Hessian, Cholesky with a saddle-free
eigenvalue fallback, Armijo backtracking, per sample), warm-startable from a previous
solution.  The NumPy formulas below (sample axis last) are the reference the kernel is tested
against and serve the public value/derivative functions and the post-processing.

Softmax is invariant under h -> h + c 11^T (the only symmetric row-wise shift), so along 11^T only the
quadratic term acts, with curvature 1/(V s) ~ lam when V ~ 1/lam: the maximiser has sum_ab (h - z~)_ab / s_ab
= 0 exactly.  The kernel keeps h on that hyperplane and lifts the Newton matrix along it (shift_invariant
rule), the reported Jacobian uses the exact inverse along 11^T, and the residual is also measured as the
Newton step (the distance to the maximiser), so the prox converges at any V (tested up to 1e12).
At V = inf (lam -> 0+) it is the projection :func:`prox_interpolating`.

For the linear activation sigma(x) = x / T the prox is closed form (App. C, eq. 106):

    Prox = (z~ + (4V/T^2) z*) / (1 + 4V/T^2),   Prox - z* = (z~ - z*) / (1 + 4V/T^2).

(The paper prints the amplitude factor as (1 + 4V T^-2)^-2 in the line above
eq. 107; the exponent is -1 there, -2 only for the variance, eq. 107.)
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ..params import ACTIVATIONS, ParamError
from . import newton as _newton
from .newton import ProxResult
from .sampling import s_ab, upper_indices

__all__ = [
    "ProxResult",
    "tokens_from_L",
    "pretrain_potential",
    "pretrain_potential_derivatives",
    "prox",
    "prox_linear",
    "prox_interpolating",
    "normalized_hessian",
]


def tokens_from_L(L: int) -> int:
    """T such that L = T (T + 1) / 2."""
    T = int(round((np.sqrt(8 * L + 1) - 1) / 2))
    if T < 1 or T * (T + 1) // 2 != L:
        raise ValueError(f"L = {L} is not of the form T(T+1)/2")
    return T


@cache
def _embedding(T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Et (L, T*T): free-entry gradient from a full one; Kt (L*L, T^3) for row Hessians; s (L,)."""
    a, b = upper_indices(T)
    L = len(a)
    E = np.zeros((T, T, L))
    E[a, b, np.arange(L)] = 1.0
    E[b, a, np.arange(L)] = 1.0
    # K[a, b, d, i, j] = E[a, b, i] E[a, d, j]: row-wise T x T Hessians -> L x L
    K = np.einsum("abi,adj->abdij", E, E).reshape(T * T * T, L * L)
    return np.ascontiguousarray(E.reshape(T * T, L).T), np.ascontiguousarray(K.T), s_ab(T).astype(float)


def _full_t(h_t: np.ndarray, T: int) -> np.ndarray:
    """(L, n) free entries -> (T, T, n) symmetric matrices."""
    a, b = upper_indices(T)
    out = np.empty((T, T) + h_t.shape[1:])
    out[a, b] = h_t
    out[b, a] = h_t
    return out


def _softmax_t(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (T, T, n): normalised over axis 1."""
    T = x.shape[1]
    m = x[:, 0]
    for b in range(1, T):
        m = np.maximum(m, x[:, b])
    e = np.exp(x - m[:, None])
    s = e[:, 0].copy()
    for b in range(1, T):
        s += e[:, b]
    return e / s[:, None]


def _sigma_t(x: np.ndarray, activation: str) -> np.ndarray:
    if activation == "softmax":
        return _softmax_t(x)
    return x / x.shape[0]


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ParamError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _loss_t(h_t: np.ndarray, y_t: np.ndarray, T: int, activation: str, order: int = 2):
    """Loss l(h) = ||sigma(h) - y||_F^2, its gradient (L, n) and Hessian (L, L, n) in the free entries.

    y_t = sigma(z*) as (T, T, n).  Row a contributes l_a(x) = ||softmax(x) - y_a||^2 with,
    for p = softmax(x), r = p - y_a, w = r . p, J = diag(p) - p p^T:
        grad l_a = 2 J r,
        Hess l_a = 2 J J + 2 [diag(p (r - w)) - p (p r)^T - (p r) p^T + 2 w p p^T]
                 = 2 [diag(p (p + r - w)) - p q^T - q p^T + c p p^T],  q = p (p + r), c = |p|^2 + 2 w.
    """
    Et, Kt, _ = _embedding(T)
    n = h_t.shape[-1]
    H = _full_t(h_t, T)
    if activation == "linear":
        r = H / T - y_t
        loss = np.sum((r * r).reshape(T * T, n), axis=0)
        if order == 0:
            return loss, None, None
        grad = Et @ ((2.0 / T) * r).reshape(T * T, n)
        hess = None
        if order >= 2:
            row = np.zeros((T, T, T))
            row[:, np.arange(T), np.arange(T)] = 2.0 / T**2
            one = (Kt @ row.reshape(T**3)).reshape(Et.shape[0], Et.shape[0], 1)
            hess = np.repeat(one, n, axis=2)
        return loss, grad, hess
    p = _softmax_t(H)
    r = p - y_t
    loss = np.sum((r * r).reshape(T * T, n), axis=0)
    if order == 0:
        return loss, None, None
    pr = p * r
    w = np.sum(pr, axis=1)  # (T, n): r . p per row
    grad = Et @ (2.0 * (pr - p * w[:, None])).reshape(T * T, n)
    if order < 2:
        return loss, grad, None
    q = p * p + pr
    c = np.sum(p * p, axis=1) + 2.0 * w  # (T, n)
    P1 = p[:, :, None, :]
    P2 = p[:, None, :, :]
    rowH = c[:, None, None, :] * P1 * P2 - P1 * q[:, None, :, :] - q[:, :, None, :] * P2
    dg = p * (p + r - w[:, None])
    idx = np.arange(T)
    rowH[:, idx, idx, :] += dg
    L = Et.shape[0]
    hess = (Kt @ (2.0 * rowH).reshape(T**3, n)).reshape(L, L, n)
    return loss, grad, hess


# ---------------------------------------------------------------- public scalar-potential helpers
def pretrain_potential(
    h: np.ndarray, z_star: np.ndarray, z_tilde: np.ndarray, V: float, activation: str = "softmax"
) -> np.ndarray:
    """Psi(h; z*, z~) of eq. 15/42 for each sample; all arguments (n, L) upper triangles."""
    _check_activation(activation)
    T = tokens_from_L(np.shape(h)[-1])
    s = _embedding(T)[2]
    h_t, zs_t, zt_t = (np.asarray(x, dtype=float).T for x in (h, z_star, z_tilde))
    loss, _, _ = _loss_t(h_t, _sigma_t(_full_t(zs_t, T), activation), T, activation, order=0)
    return -loss - np.sum((zt_t - h_t) ** 2 / (2.0 * V * s[:, None]), axis=0)


def pretrain_potential_derivatives(
    h: np.ndarray, z_star: np.ndarray, z_tilde: np.ndarray, V: float, activation: str = "softmax"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Psi, grad Psi, Hessian of Psi) with respect to the L free entries of h (eq. 42).

    Arguments (n, L); returns arrays of shapes (n,), (n, L), (n, L, L).
    """
    _check_activation(activation)
    T = tokens_from_L(np.shape(h)[-1])
    s = _embedding(T)[2][:, None]
    h_t, zs_t, zt_t = (np.asarray(x, dtype=float).T for x in (h, z_star, z_tilde))
    loss, g, Hl = _loss_t(h_t, _sigma_t(_full_t(zs_t, T), activation), T, activation)
    val = -loss - np.sum((zt_t - h_t) ** 2 / (2.0 * V * s), axis=0)
    grad = -g + (zt_t - h_t) / (V * s)
    hess = -Hl
    idx = np.arange(len(s))
    hess[idx, idx] -= 1.0 / (V * s)
    return val, grad.T, np.moveaxis(hess, -1, 0)


def normalized_hessian(hess: np.ndarray, T: int) -> np.ndarray:
    """Hessian of Psi in the normalised entries u_ab = h_ab / sqrt(s_ab), (..., L, L).

    In these coordinates the quadratic term of eq. 42 is |u~ - u|^2 / (2V), so that
    V * Hessian -> -I_L as V -> 0 (the convention under which eq. 75 is written).
    """
    r = np.sqrt(_embedding(T)[2])
    return hess * r[:, None] * r[None, :]


def prox_linear(z_star: np.ndarray, z_tilde: np.ndarray, V: float) -> np.ndarray:
    """Closed-form prox for sigma(x) = x / T (App. C, eq. 106), arrays (..., L):
    Prox = (z~ + (4V/T^2) z*) / (1 + 4V/T^2)."""
    T = tokens_from_L(np.shape(z_star)[-1])
    k = 4.0 * V / T**2
    return (np.asarray(z_tilde) + k * np.asarray(z_star)) / (1.0 + k)


def prox_interpolating(
    z_star: np.ndarray, z_tilde: np.ndarray, activation: str = "softmax"
) -> tuple[np.ndarray, np.ndarray]:
    """The prox at V = inf (lam -> 0+), arrays (n, L): the projection of z~ onto {h : sigma(h) = sigma(z*)}
    in the metric of eq. 42, and its Jacobian diagonal d Prox_ab / d z~_ab.

    Softmax (row-wise, h symmetric): that set is the line {z* + c 11^T}, and the point nearest z~ in
    sum (.)^2 / s_ab has c = sum_ab (z~ - z*)_ab / s_ab / sum_ab 1 / s_ab, so that
    d Prox_ab / d z~_ab = (1 / s_ab) / sum_cd 1 / s_cd.  Linear: the set is {z*}, the Jacobian 0.
    (The V -> inf limit of :func:`prox`: the quadratic term of Psi vanishes, the loss must be 0.)
    """
    _check_activation(activation)
    z_star = np.asarray(z_star, dtype=float)
    z_tilde = np.asarray(z_tilde, dtype=float)
    T = tokens_from_L(z_star.shape[-1])
    if activation == "linear":
        return z_star.copy(), np.zeros_like(z_star)
    w = 1.0 / _embedding(T)[2]
    c = (z_tilde - z_star) @ w / np.sum(w)
    return z_star + c[:, None], np.broadcast_to(w / np.sum(w), z_star.shape).copy()


def target_rows(z_star: np.ndarray, activation: str) -> np.ndarray:
    """The pre-training prox's target sigma(z*) (eq. 42) of the (n, L) upper triangles z*, as (n, T*T) row-major rows."""
    n, L = z_star.shape
    T = tokens_from_L(L)
    return _sigma_t(_full_t(z_star.T.copy(), T), activation).reshape(T * T, n).T


def _newton_solve(d0, data, V, s, activation, T, tol, max_iter, ref=None):
    """Safeguarded Newton for min_delta f = -Psi(z~ + delta), all samples; arrays sample-first (n, L).

    The unknown is the displacement delta = h - z~ (so that it keeps its relative precision
    when V -> 0).  Runs the one compiled prox kernel (:mod:`hdlora.theory.newton`, potential
    PRETRAIN, rule :meth:`NewtonRule.pretrain`); ``data`` rows are [z~ (L), sigma(z*) (T*T)].
    """
    n, L = d0.shape
    return _newton.minimise(
        _newton.PRETRAIN,
        d0,
        np.zeros((n, L)),
        V * s,
        data,
        T,
        activation == "softmax",
        _newton.NewtonRule.pretrain(tol, max_iter, V, shift_invariant=activation == "softmax"),
        ref=ref,
    )


def prox(
    z_star: np.ndarray,
    z_tilde: np.ndarray,
    V: float,
    activation: str = "softmax",
    *,
    init: np.ndarray | None = None,
    multi_start: bool | None = None,
    tol: float = 1e-10,
    max_iter: int = 100,
    full: bool = True,
    closed_form: bool = True,
    merge_ref: np.ndarray | None = None,
    target: np.ndarray | None = None,
) -> ProxResult:
    """Prox(z*, z~) = argmax_h Psi(h; z*, z~) (eq. 16/41) for all samples at once.

    Args:
        z_star: (n, L) upper triangles of z*.
        z_tilde: (n, L) upper triangles of z~.
        V: the order parameter V > 0 of eq. 15.
        activation: 'softmax' or 'linear' (closed form, App. C).
        init: (n, L) warm start for h (e.g. the prox of the previous state-evolution iteration).
        multi_start: also start from z* (an interpolating point, sigma(z*) fitted) and
            keep the larger Psi per sample.  Default: True without ``init``, False with it.
        tol: tolerance on the stationarity residual (ProxResult.residual)
            max_ab |delta_ab + V s_ab d l/dh_ab| / min(1, V): the residual of the fixed-point form
            h = z~ - V s grad l(h), in units of h for V >= 1 and relative to V (gradient units) for V < 1;
            softmax: or, where smaller, the Newton step that removes it (same units), since the residual
            carries V x the rounding of grad l.
        max_iter: maximum number of Newton iterations per starting point.
        full: also return the Hessian and the replicon sample term (else those fields are None;
            the state-evolution iterations only need h and the Jacobian diagonal).
        closed_form: for the linear activation use the closed form of App. C (False runs the
            generic Newton path, for testing).
        merge_ref: (n, L) a maximiser h already known per sample (a check from another start): a
            sample whose Newton iterate comes close to it stops there (``merged`` in ``extra``, its
            value -inf: it would end at merge_ref; see :func:`hdlora.theory.newton.minimise`).
        target: :func:`target_rows` of ``z_star``, when the caller has them (a state evolution's z* is fixed: its
            target sigma(z*) is computed once per solve instead of once per call).

    Returns:
        ProxResult: x (n, L) the maximiser h (upper triangle), value = max_h Psi, the Hessian of
        Psi there (h coordinates; None unless ``full``), residual (above), converged
        (residual <= tol at a negative-definite Hessian), iterations (summed over the starts), and
        in ``extra``: ``delta`` (n, L) = h - z~ computed directly (accurate also when V -> 0),
        ``jacobian_diag`` (n, L) d Prox_ab / d z~_ab = [(-Hessian)^-1]_{ab,ab} / (V s_ab) (for V_hat,
        eq. 51 via Stein's lemma), ``replicon`` (n,) ||(V Hess_u)^-1 + I_L||_F^2 in the normalised
        entries (:func:`normalized_hessian`), the sample term of eq. 75 (None unless ``full``).
    """
    _check_activation(activation)
    z_star = np.asarray(z_star, dtype=float)
    z_tilde = np.asarray(z_tilde, dtype=float)
    if z_star.shape != z_tilde.shape or z_star.ndim != 2:
        raise ValueError(f"z_star and z_tilde must both be (n, L), got {z_star.shape}, {z_tilde.shape}")
    if not (np.isfinite(V) and V > 0):
        raise ParamError(f"V must be finite and > 0, got {V}")
    T = tokens_from_L(z_star.shape[1])
    n, L = z_star.shape
    s = _embedding(T)[2]
    y = target_rows(z_star, activation) if target is None else target
    data = np.ascontiguousarray(np.concatenate([z_tilde, y], axis=1))
    closed = activation == "linear" and closed_form
    if closed:  # Prox - z~ = c (z* - z~), c = 4V / (T^2 + 4V) (eq. 106): one "start", no Newton
        k = 4.0 * V / T**2
        starts = [(k / (1.0 + k)) * (z_star - z_tilde)]
    else:
        if multi_start is None:
            multi_start = init is None
        if init is not None:
            init = np.asarray(init, dtype=float)
            if init.shape != z_star.shape:
                raise ValueError(f"init must have shape {z_star.shape}, got {init.shape}")
        zero = np.zeros((n, L))
        starts = [init - z_tilde] if init is not None else [zero]
        if multi_start:
            starts += [z_star - z_tilde] + ([zero] if init is not None else [])
    K = _newton.kernel()
    ref = None if merge_ref is None else np.asarray(merge_ref, dtype=float) - z_tilde
    iters = 0
    best = None
    merged = np.zeros(n, dtype=bool)
    for d0 in starts:
        if closed:
            g, H, aux = np.empty((n, L)), np.empty((n, L, L)), np.empty((n, 1))
            loss = K.evaluate_batch(_newton.PRETRAIN, d0, data, np.array([float(T), 0.0]), 2, g, H, aux)
            out = _newton.NewtonOutput(d0, loss, loss, g, H, aux[:, :0], np.zeros(n), np.ones(n, bool), 0, merged)
        else:
            out = _newton_solve(d0, data, V, s, activation, T, tol, max_iter, ref)
        iters += out.iterations
        rep = np.empty(n)
        hess = np.empty((n, L, L)) if full else np.empty((1, 1, 1))
        cur = (out.x, np.empty(n), np.empty(n), np.empty((n, L)), np.empty(n, dtype=np.bool_), rep, hess)
        K.pretrain_post(out.x, out.grad, out.hess, out.loss, float(V), s, full, activation == "softmax", *cur[1:])
        if ref is not None:
            cur[1][out.merged] = -np.inf
            merged |= out.merged
        if best is None:
            best = cur
        else:
            b = cur[1] > best[1] + 1e-13 * np.abs(best[1])
            if np.any(b):
                for arr, new in zip(best, cur):
                    if arr.shape[0] == n:
                        arr[b] = new[b]
    assert best is not None  # at least one start
    d, psi, stat, jac, pd, rep, hess = best
    h = z_tilde + d
    converged = (stat <= tol) & pd & np.all(np.isfinite(h), axis=1)
    return ProxResult(
        x=h,
        value=psi,
        hessian=hess if full else None,
        residual=stat,
        converged=converged,
        iterations=iters,
        n_not_max=int(np.count_nonzero(~pd)),
        extra={"delta": d, "jacobian_diag": jac, "replicon": rep if full else None, "merged": merged},
    )
