"""Exact global prox of the fine-tuning potential (eq. 64) for the linear activation.

For sigma(x) = x / T the potential of eq. 63 is, with B = (z - q I) - (z* + chi* chi*^T - q0 I)
(symmetric T x T),

    psi(chi) = -||B + chi chi^T||_F^2 / T^2 - ||chi_tilde - chi||^2 / (2 v)
             = -(||B||_F^2 + 2 chi^T B chi + |chi|^4) / T^2 - ||chi_tilde - chi||^2 / (2 v).

It is quartic and not concave, but its *global* maximiser is characterised exactly, as for a
trust-region subproblem.  In the eigenbasis B = U diag(b) U^T, y = U^T chi, y~ = U^T chi_tilde,
r = |chi|^2 and c = 4 v / T^2, stationarity reads

    (1 + c (b_i + r)) y_i = y~_i,                                                   (S)

and a stationary point is the global maximiser iff d_i = 1 + c (b_i + r) >= 0 for all i
(-Hessian = (D + 2 c y y^T) / v with D = diag(d); the standard argument for a quadratic plus
(1/T^2)|chi|^4 gives global optimality exactly when D >= 0).  With r = sum_i y~_i^2 / d_i^2 the
secular equation phi(r) = sum_i y~_i^2 / (1 + c (b_i + r))^2 = r has exactly one root on
r > r_lo = max(0, -(1/c + b_min)) (phi decreases from phi(r_lo) to 0, r increases), found here
by safeguarded Newton for all samples at once.  In the "hard case" y~_min = 0 (probability zero,
handled for its numerical neighbourhood) the root sits at r_lo and y_min follows from |y|^2 = r.

The eigendecomposition of B depends on q only through the shift -q I, so it is done once per
solve (:class:`LinearRankOneProx`); every iteration of the state evolution is then O(n T).
This replaces the multi-start Newton search of :func:`hdlora.theory.finetune.prox_psi` (which
is kept for softmax and as an independent check of this module in the tests).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["LinearRankOneProx", "solve_secular"]


def solve_secular(
    b: np.ndarray,
    yt: np.ndarray,
    c: float,
    *,
    r0: np.ndarray | None = None,
    max_iter: int = 100,
    step_tol: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Global maximiser of psi in the eigenbasis: returns (y, r, d, iterations).

    Args:
        b: (n, T) eigenvalues of B.   yt: (n, T) chi_tilde in the eigenbasis.   c: 4 v / T^2 > 0.
        r0: (n,) optional starting guess of r = |chi_prox|^2 (e.g. the previous iteration's); the
            bracket safeguard makes any guess safe.

    Returns:
        (tuple): y (n, T), r = |y|^2 (n,), d = 1 + c (b + r) >= 0 (n, T), and the Newton iteration
            count. Newton is applied to G(s) = r_lo + s - phi when r_lo = 0 and to
            H(s) = phi^{-1/2} - (r_lo + s)^{-1/2} (nearly linear at the pole) when r_lo > 0, with
            s = r - r_lo, both increasing in s; a step leaving the bracket is replaced by bisection.
    """
    bt, yt_t = np.ascontiguousarray(b.T), np.ascontiguousarray(yt.T)  # token-first (T, n): fast sums
    y, d, it = _solve_secular_t(bt, yt_t, c, r0, max_iter, step_tol)
    y, d = y.T.copy(), d.T.copy()
    return y, (y * y).sum(axis=1), d, it


def _solve_secular_t(
    b: np.ndarray, yt: np.ndarray, c: float, r0: np.ndarray | None = None, max_iter: int = 100, step_tol: float = 1e-9
):
    """:func:`solve_secular` in the token-first layout b, yt (T, n); returns y, d (T, n), iterations."""
    T, n = b.shape
    bmin = b.min(axis=0)
    r_lo = np.maximum(0.0, -(1.0 / c + bmin))
    e = np.maximum(1.0 + c * (b + r_lo), 0.0)  # d at s = 0: >= 0, = 0 at the minimum where r_lo > 0
    a2 = yt * yt
    pole = r_lo > 0
    ynorm = np.sqrt(a2.sum(axis=0))
    hi = (ynorm / c) ** (2.0 / 3.0) * (1.0 + 1e-12) + 1e-300  # F(hi) >= 0 (phi(hi) <= |y~|^2/(c hi)^2 <= hi)
    s = np.where(pole, np.minimum(1e-12 * (1.0 + r_lo), hi), 0.0)
    if r0 is not None:
        s = np.where(np.isfinite(r0), np.clip(np.asarray(r0, dtype=np.float64) - r_lo, s, hi), s)

    # the unfinished samples are kept compacted (their s, bracket and data), written back when done
    idx = np.arange(n)
    it = 0
    si, loi, hii, ei, a2i, rli, pi = s, np.zeros(n), hi, e, a2, r_lo, pole
    s = s.copy()
    while idx.size and it < max_iter:
        it += 1
        h, dh = _secular_function(si, ei, a2i, c, rli, pi)
        neg = h < 0
        loi = np.where(neg, np.maximum(loi, si), loi)
        hii = np.where(neg, hii, np.minimum(hii, si))
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = si - h / dh
        bad = ~np.isfinite(cand) | (cand < loi) | (cand > hii)
        new = np.where(h == 0, si, np.where(bad, 0.5 * (loi + hii), cand))
        # a Newton step below step_tol is taken and ends the iteration (quadratic convergence:
        # the error left is ~ step^2); bisection steps end it only when the bracket is exhausted
        done = (
            (~bad & (np.abs(cand - si) <= step_tol * (rli + si + 1e-300)))
            | (h == 0)
            | (hii - loi <= 1e-15 * (rli + hii))
        )
        if done.all():
            s[idx] = new
            break
        if done.any():
            s[idx[done]] = new[done]
            keep = ~done
            idx, si, loi, hii = idx[keep], new[keep], loi[keep], hii[keep]
            ei, a2i, rli, pi = ei[:, keep], a2i[:, keep], rli[keep], pi[keep]
        else:
            si = new
    else:
        s[idx] = si
    r = r_lo + s
    d = e + c * s
    with np.errstate(divide="ignore", invalid="ignore"):
        y = yt / d
    # hard case neighbourhood: the smallest d ~ 0; take y_min from |y|^2 = r (exact at the root)
    k = np.argmin(d, axis=0)
    cols = np.arange(n)
    dmin = d[k, cols]
    hard = np.flatnonzero(~(dmin > 1e-7 * (1.0 + np.abs(d).max(axis=0))))
    if hard.size:
        kh = k[hard]
        yh = y[:, hard].copy()
        yh[kh, np.arange(hard.size)] = 0.0
        rest = (yh * yh).sum(axis=0)
        sign = np.where(yt[kh, hard] < 0, -1.0, 1.0)
        yh[kh, np.arange(hard.size)] = sign * np.sqrt(np.maximum(r[hard] - rest, 0.0))
        y[:, hard] = yh
    return y, d, it


def _secular_function(s: np.ndarray, e: np.ndarray, a2: np.ndarray, c: float, r_lo: np.ndarray, pole: np.ndarray):
    """G (r_lo = 0) or H (r_lo > 0), see :func:`solve_secular`, and its derivative; token-first."""
    d = e + c * s
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        w = a2 * inv * inv
        phi = w.sum(axis=0)
        dphi = -2.0 * c * (w * inv).sum(axis=0)
        r = r_lo + s
        h = r - phi
        dh = 1.0 - dphi
        if pole.any():
            ip = 1.0 / np.sqrt(phi[pole])
            ir = 1.0 / np.sqrt(r[pole])
            h[pole] = ip - ir
            dh[pole] = -0.5 * ip**3 * dphi[pole] + 0.5 * ir**3
    return h, dh


class LinearRankOneProx:
    """The exact prox of eq. 64 for sigma(x) = x / T over a fixed set of samples.

    Args:
        B0: (n, T, T) z_beta - z* - chi* chi*^T (symmetric), so that B = B0 - (q - q0) I, q0 = 1.
        chi_star: (n, T) the fixed normals chi* of eq. 62.
        zeta: (n, T) the fixed normals zeta of eq. 62.

    :meth:`__call__` (m, q, v) returns the quantities the state evolution (eqs. 67-72) needs.
    Everything except chi and C is computed in the eigenbasis of B0 (the sums are
    rotation invariant).
    """

    def __init__(self, B0: np.ndarray, chi_star: np.ndarray, zeta: np.ndarray) -> None:
        self.T = B0.shape[-1]
        b0, self.U = np.linalg.eigh(B0)
        # token-first (T, n) copies: sums over the T tokens are then fast elementwise adds
        self.b0 = np.ascontiguousarray(b0.T)
        self.a_star = np.ascontiguousarray(np.einsum("nij,ni->jn", self.U, chi_star))
        self.a_zeta = np.ascontiguousarray(np.einsum("nij,ni->jn", self.U, zeta))
        self.newton_iterations = 0
        self._r_last = None  # warm start of the secular root (the previous call's r)

    def __call__(self, m: float, q: float, v: float) -> dict:
        """prox at (m, q, v): chi_tilde = m chi* + sqrt(q - m^2) zeta (eq. 62).

        Returns a dict with, in the eigenbasis and the token-first layout (T, n): ``y`` and ``yt``
        (chi_prox and chi_tilde), ``b`` (eigenvalues of B), ``d`` (1 + c (b + r)); and per sample (n,):
        ``r`` = |chi_prox|^2, ``psi``, ``dpsi_dq`` (explicit d psi / d q, eq. 72:
        Tr g = 2 (Tr B + r) / T^2) and ``grad_norm`` (|grad psi|, a check that the secular root is a
        stationary point).
        """
        T = self.T
        c = 4.0 * v / T**2
        s = math.sqrt(max(q - m * m, 0.0))
        yt = m * self.a_star + s * self.a_zeta
        b = self.b0 - (q - 1.0)
        y, d, it = _solve_secular_t(b, yt, c, self._r_last)
        r = (y * y).sum(axis=0)
        self._r_last = r
        self.newton_iterations = it
        diff = y - yt
        psi = -((b * b).sum(axis=0) + 2.0 * (b * y * y).sum(axis=0) + r * r) / T**2 - (diff * diff).sum(axis=0) / (
            2.0 * v
        )
        grad = -4.0 * (b + r) * y / T**2 - diff / v
        dq = 2.0 * (b.sum(axis=0) + r) / T**2
        return {
            "y": y,
            "yt": yt,
            "b": b,
            "d": d,
            "r": r,
            "psi": psi,
            "dpsi_dq": dq,
            "grad_norm": np.sqrt((grad * grad).sum(axis=0)),
            "c": c,
        }

    def curvature(self, out: dict) -> np.ndarray:
        """C / v = (D + 2 c y y^T)^{-1} in the eigenbasis (C of eq. 66), shape (n, T, T)."""
        y, d, c = out["y"].T, out["d"].T, out["c"]
        Mx = 2.0 * c * y[:, :, None] * y[:, None, :]
        i = np.arange(self.T)
        Mx[:, i, i] += d
        return np.linalg.inv(Mx)

    def to_original(self, x: np.ndarray) -> np.ndarray:
        """Eigenbasis vectors, token-first (T, n) -> original token basis, (n, T)."""
        return np.einsum("nij,jn->ni", self.U, x)

    def matrix_to_original(self, A: np.ndarray) -> np.ndarray:
        """Eigenbasis matrices (n, T, T) -> original token basis (U A U^T)."""
        return np.einsum("nij,njk,nlk->nil", self.U, A, self.U)
