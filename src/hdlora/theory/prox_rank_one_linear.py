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
solve (:class:`LinearRankOneProx`, by the batched Jacobi rotations of :mod:`hdlora.theory.jacobi`,
5x faster than LAPACK's per-matrix calls at T = 3); every iteration of the state evolution is then
O(n T), and the curvature C (eq. 66) and the train loss (eq. 20) are evaluated in the eigenbasis
(rotation invariant sums: nothing is rotated back).
This replaces the multi-start Newton search of :func:`hdlora.theory.finetune.prox_psi` (which
is kept for softmax and as an independent check of this module in the tests).
"""

from __future__ import annotations

import math

import numpy as np

from .jacobi import eigh_token_first

__all__ = ["LinearRankOneProx", "solve_secular"]

#: :meth:`LinearRankOneProx.curvature` inverts by Sherman-Morrison where min d >= this, by LAPACK elsewhere
CURVATURE_SM_MIN_D = 1e-3


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

    # the unfinished samples iterate together; a finished one keeps the s of its last step.  The working arrays
    # are compacted (fancy indexing, which costs more than an elementwise pass) only once half of them finished
    idx = np.arange(n)
    si, loi, hii, ei, a2i, rli, pi = s, np.zeros(n), hi, e, a2, r_lo, pole
    fin = np.zeros(n, dtype=bool)
    s = s.copy()
    it = 0
    while it < max_iter:
        it += 1
        h, dh = _secular_function(si, ei, a2i, c, rli, pi)
        neg = h < 0
        loi = np.where(neg, np.maximum(loi, si), loi)
        hii = np.where(neg, hii, np.minimum(hii, si))
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = si - h / dh
        bad = ~np.isfinite(cand) | (cand < loi) | (cand > hii)
        zero = h == 0
        new = np.where(zero, si, np.where(bad, 0.5 * (loi + hii), cand))
        # a Newton step below step_tol is taken and ends the iteration (quadratic convergence:
        # the error left is ~ step^2); bisection steps end it only when the bracket is exhausted
        done = (
            (~bad & (np.abs(cand - si) <= step_tol * (rli + si + 1e-300))) | zero | (hii - loi <= 1e-15 * (rli + hii))
        )
        si = np.where(fin, si, new)
        fin |= done
        n_fin = np.count_nonzero(fin)
        if n_fin == fin.size:
            break
        if 2 * n_fin >= fin.size:
            s[idx[fin]] = si[fin]
            keep = ~fin
            idx, si, loi, hii, rli, pi = idx[keep], si[keep], loi[keep], hii[keep], rli[keep], pi[keep]
            ei, a2i, fin = ei[:, keep], a2i[:, keep], fin[keep]
    s[idx] = si
    r = r_lo + s
    d = e + c * s
    with np.errstate(divide="ignore", invalid="ignore"):
        y = yt / d
    # hard case neighbourhood: the smallest d ~ 0; take y_min from |y|^2 = r (exact at the root)
    hard = np.flatnonzero(~(d.min(axis=0) > 1e-7 * (1.0 + np.abs(d).max(axis=0))))
    if hard.size:
        kh = np.argmin(d[:, hard], axis=0)
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
            ip = 1.0 / np.sqrt(phi)
            ir = 1.0 / np.sqrt(r)
            h = np.where(pole, ip - ir, h)
            dh = np.where(pole, -0.5 * ip**3 * dphi + 0.5 * ir**3, dh)
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
        # token-first (T, n) arrays throughout: sums over the T tokens are then fast elementwise adds
        eig = eigh_token_first(
            np.moveaxis(B0, 0, -1)
        )  # (copies the rows it reads); LAPACK where Jacobi did not converge
        self.b0, self.V = eig.w, eig.V
        self.a_star = self.to_eigenbasis(np.ascontiguousarray(chi_star.T))
        self.a_zeta = self.to_eigenbasis(np.ascontiguousarray(zeta.T))
        self.newton_iterations = 0
        self._r_last = None  # warm start of the secular root (the previous call's r)

    def __call__(self, m: float, q: float, v: float) -> dict:
        """prox at (m, q, v): chi_tilde = m chi* + sqrt(q - m^2) zeta (eq. 62).

        Returns a dict with, in the eigenbasis and the token-first layout (T, n): ``y`` and ``yt``
        (chi_prox and chi_tilde), ``b`` (eigenvalues of B), ``d`` (1 + c (b + r)); and per sample (n,):
        ``r`` = |chi_prox|^2, ``psi``, ``loss`` (its fitting term ||B + chi chi^T||_F^2 / T^2, the sample's
        train loss, eq. 20), ``dpsi_dq`` (explicit d psi / d q, eq. 72:
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
        loss = ((b * b).sum(axis=0) + 2.0 * (b * y * y).sum(axis=0) + r * r) / T**2  # ||B + chi chi^T||_F^2 / T^2
        psi = -loss - (diff * diff).sum(axis=0) / (2.0 * v)
        grad = -4.0 * (b + r) * y / T**2 - diff / v
        dq = 2.0 * (b.sum(axis=0) + r) / T**2
        return {
            "y": y,
            "yt": yt,
            "b": b,
            "d": d,
            "r": r,
            "psi": psi,
            "loss": loss,
            "dpsi_dq": dq,
            "grad_norm": np.sqrt((grad * grad).sum(axis=0)),
            "c": c,
        }

    def curvature(self, out: dict) -> np.ndarray:
        """C / v = (D + 2 c y y^T)^{-1} in the eigenbasis (C of eq. 66), shape (n, T, T).

        Sherman-Morrison, D^{-1} - kappa u u^T with u = D^{-1} y and kappa = 2 c / (1 + 2 c y^T D^{-1} y), for the
        samples whose smallest d is >= CURVATURE_SM_MIN_D (its rounding error is then below ~1e3 eps); LAPACK's
        inverse of D + 2 c y y^T for the others (the neighbourhood of the hard case, where D^{-1} blows up)."""
        y, d, c, T = out["y"], out["d"], out["c"], self.T
        rho = 2.0 * c
        with np.errstate(divide="ignore", invalid="ignore"):
            u = y / d
            kappa = rho / (1.0 + rho * (y * u).sum(axis=0))
            Ct = np.empty((T, T, y.shape[1]))
            for i in range(T):
                for j in range(i, T):
                    Ct[i, j] = -kappa * u[i] * u[j]
                    if j == i:
                        Ct[i, i] += 1.0 / d[i]
                    else:
                        Ct[j, i] = Ct[i, j]
        hard = np.flatnonzero(~(d.min(axis=0) >= CURVATURE_SM_MIN_D))
        if hard.size:
            yh, dh = y[:, hard].T, d[:, hard].T
            Mx = rho * yh[:, :, None] * yh[:, None, :]
            diag = np.arange(T)
            Mx[:, diag, diag] += dh
            Ct[:, :, hard] = np.moveaxis(np.linalg.inv(Mx), 0, -1)
        return np.moveaxis(Ct, -1, 0)

    def to_eigenbasis(self, x: np.ndarray) -> np.ndarray:
        """Token-basis vectors -> eigenbasis (U^T x), both token-first (T, n)."""
        V, T = self.V, self.T
        return np.array([sum((V[i, j] * x[i] for i in range(1, T)), V[0, j] * x[0]) for j in range(T)])

    def to_original(self, x: np.ndarray) -> np.ndarray:
        """Eigenbasis vectors, token-first (T, n) -> original token basis (U x), (n, T)."""
        V, T = self.V, self.T
        return np.array([sum((V[i, j] * x[j] for j in range(1, T)), V[i, 0] * x[0]) for i in range(T)]).T.copy()

    def matrix_to_original(self, A: np.ndarray) -> np.ndarray:
        """Eigenbasis matrices (n, T, T) -> original token basis (U A U^T)."""
        U = np.moveaxis(self.V, -1, 0)
        return np.einsum("nij,njk,nlk->nil", U, A, U)
