"""Fixed Gaussian samples for the Monte-Carlo expectations of the state evolution.

Samples are drawn once per solve (common random numbers), from a seeded
generator or a scrambled Sobol sequence (quasi-Monte Carlo), so that the
update map of the fixed-point iteration is deterministic.

Symmetric T x T fields are stored either as full matrices (..., T, T) or as
their upper triangles (..., L) with L = T (T + 1) / 2 in the order of
:func:`upper_indices`.  The paper's convention (eqs. 13, 47) is that an entry
(a, b) of a field of "variance v" has variance (1 + delta_ab) v: off-diagonal
v, diagonal 2 v.
"""

from __future__ import annotations

import math

import numpy as np

from .streams import stream

METHODS = ("mc", "qmc")


def upper_indices(T: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the L = T(T+1)/2 entries a <= b."""
    return np.triu_indices(T)


def s_ab(T: int) -> np.ndarray:
    """s_ab = 1 + delta_ab on the upper triangle (eq. 46), shape (L,)."""
    a, b = upper_indices(T)
    return 1.0 + (a == b)


def to_sym(v: np.ndarray, T: int) -> np.ndarray:
    """(..., L) upper-triangle entries -> (..., T, T) symmetric matrices."""
    a, b = upper_indices(T)
    out = np.zeros(v.shape[:-1] + (T, T), dtype=v.dtype)
    out[..., a, b] = v
    out[..., b, a] = v
    return out


def from_sym(m: np.ndarray) -> np.ndarray:
    """(..., T, T) symmetric matrices -> (..., L) upper-triangle entries."""
    a, b = upper_indices(m.shape[-1])
    return m[..., a, b]


def standard_normals(n: int, k: int, seed: int = 0, method: str = "mc", purpose: str | None = None) -> np.ndarray:
    """An (n, k) array of standard normals, fixed by ``seed`` and ``purpose``.

    With a ``purpose`` the draws come from the named stream (seed, purpose) of
    :mod:`hdlora.theory.streams` (the theory's solves always name one, so that no two seeds or purposes
    share draws); without one, from ``numpy.random.default_rng(seed)``.

    ``method='qmc'`` uses a scrambled Sobol sequence mapped through the normal
    quantile (lower variance for smooth integrands); ``'mc'`` plain
    pseudo-random numbers.
    """
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 and k >= 1, got n={n}, k={k}")
    rng = np.random.default_rng(seed) if purpose is None else stream(seed, purpose)
    if method == "mc":
        return rng.standard_normal((n, k))
    if method == "qmc":
        from scipy.special import ndtri  # imported here: scipy.stats takes seconds to import
        from scipy.stats import qmc

        u = qmc.Sobol(d=k, scramble=True, seed=seed if purpose is None else rng).random(n)
        return ndtri(np.clip(u, 1e-16, 1 - 1e-16))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def frozen_fields(
    n: int, T: int, A0: float, Q: float, M: float, seed: int = 0, method: str = "mc", purpose: str | None = None
) -> dict[str, np.ndarray]:
    """Draw (z*, z) ~ Q (eq. 13) on the upper triangle, with the latents of eq. 47.

    z*_ab = sqrt(s_ab A0) g_ab,  z_ab = sqrt(s_ab) (M / sqrt(A0) g_ab + sqrt(B) zeta_ab),
    B = Q - M^2 / A0, A0 = Q0 + Delta / 2.  (At the pre-training fixed point z plays
    the role of z_tilde.)

    Returns a dict with arrays of shape (n, L): ``z_star``, ``z``, ``g``, ``zeta``.
    """
    if A0 <= 0:
        raise ValueError(f"A0 = Q0 + Delta/2 must be > 0, got {A0}")
    B = Q - M * M / A0
    if B < -1e-12 * max(1.0, Q):
        raise ValueError(f"(z*, z) covariance not positive: Q - M^2/A0 = {B} < 0 (Q={Q}, M={M}, A0={A0})")
    B = max(B, 0.0)
    L = T * (T + 1) // 2
    x = standard_normals(n, 2 * L, seed, method, purpose)
    g, zeta = x[:, :L], x[:, L:]
    return {"z_star": teacher_fields(g, T, A0), "z": student_fields(g, zeta, T, A0, M, B), "g": g, "zeta": zeta}


def teacher_fields(g: np.ndarray, T: int, A0: float) -> np.ndarray:
    """z*_ab = sqrt(s_ab A0) g_ab (eqs. 13, 47) from the standard normals g (n, L) on the upper triangle."""
    return np.sqrt(s_ab(T)) * math.sqrt(A0) * g


def student_fields(g: np.ndarray, zeta: np.ndarray, T: int, A0: float, M: float, B: float) -> np.ndarray:
    """z_ab = sqrt(s_ab) (M / sqrt(A0) g_ab + sqrt(B) zeta_ab) (eqs. 13, 47; B = Q - M^2 / A0 >= 0), correlated with
    :func:`teacher_fields` of the same g through M."""
    return np.sqrt(s_ab(T)) * (M / math.sqrt(A0) * g + math.sqrt(B) * zeta)
