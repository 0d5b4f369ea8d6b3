"""Effective noises of the frozen pre-trained map seen by the fine-tuning (Sections 4.1-4.2, App. C).

For the linear activation the frozen fields enter the fine-tuning only through
h = z - z*, whose entries are independent with Var h_ab = (1 + delta_ab) Delta_eff:

- Delta_eff (eq. 25 / 99-101), e = 0, fields from Q (eq. 13):
  Delta_eff = Delta/2 + Q0 - 2 M + Q.
- Recalibration W_hat -> sqrt(beta) W_hat (eq. 26 / 102-103): Q -> beta^2 Q, M -> beta M,
  Delta_eff(beta) = Delta/2 + Q0 + beta^2 Q - 2 beta M, minimised at beta_min = M / Q with
  Delta_eff(beta_min) = Delta/2 + Q0 - M^2 / Q.
- Reused sequences, e = 1, linear sigma (eq. 27 / 106-108): z = Prox(z*, z~) is the weighted
  mean z = (c z* + z~)/(1 + c), c = 4 V / T^2, hence z - z* = (z~ - z*)/(1 + c) and
  Delta_eff(e = 1) = Delta_eff(e = 0) / (1 + 4 V / T^2)^2.  (The text of App. C writes the
  power -2 on z - z* itself; the variance, eq. 108, carries it correctly.)  With the
  recalibration the general form is Var(beta z - z*)/(1 + delta_ab)
  = (beta w1 - 1)^2 A0 + beta^2 w2^2 Q + 2 (beta w1 - 1) beta w2 M, w1 = c/(1+c), w2 = 1/(1+c),
  A0 = Q0 + Delta/2.
- Active fine-tuning (eq. 28 / 104-105): conditioning on z = 0 leaves
  Delta_eff,ActFT = Delta/2 + Q0 - M^2/Q, and
  Delta_eff - Delta_eff,ActFT = (M/sqrt(Q) - sqrt(Q))^2 >= 0.
"""

from __future__ import annotations

import math

import numpy as np

from ..params import A0, ParamError

__all__ = [
    "delta_eff",
    "delta_eff_beta",
    "beta_min",
    "delta_eff_min",
    "delta_eff_reuse_linear",
    "delta_eff_actft",
    "delta_eff_from_fields",
    "delta_eff_of_A0",
    "delta_eff_beta_of_A0",
    "delta_eff_min_of_A0",
]


# ----- the formulas, in A0 = Q0 + Delta/2 (no checks: also used on measured order parameters) -----
def delta_eff_of_A0(A0: float, Q: float, M: float) -> float:
    """Delta_eff = A0 - 2 M + Q (eq. 25 / 101), A0 = Q0 + Delta/2."""
    return A0 - 2 * M + Q


def delta_eff_beta_of_A0(A0: float, Q: float, M: float, beta: float) -> float:
    """Delta_eff(beta) = A0 + beta^2 Q - 2 beta M (eq. 26 / 102)."""
    return A0 + beta * beta * Q - 2 * beta * M


def delta_eff_min_of_A0(A0: float, Q: float, M: float) -> float:
    """Delta_eff(beta_min) = Delta_eff,ActFT = A0 - M^2 / Q (eqs. 26 / 103 and 28 / 105)."""
    return A0 - M * M / Q


def _check(Q0: float, Q: float, noise: float) -> None:
    if not Q0 > 0:
        raise ParamError(f"Q0 must be > 0, got {Q0}")
    if not Q >= 0:
        raise ParamError(f"Q must be >= 0, got {Q}")
    if not noise >= 0:
        raise ParamError(f"noise (Delta) must be >= 0, got {noise}")


def delta_eff(Q0: float, Q: float, M: float, noise: float) -> float:
    """Delta_eff = Delta/2 + Q0 - 2 M + Q (eq. 25)."""
    _check(Q0, Q, noise)
    return delta_eff_of_A0(A0(Q0, noise), Q, M)


def delta_eff_beta(Q0: float, Q: float, M: float, noise: float, beta: float) -> float:
    """Delta_eff(beta) = Delta/2 + Q0 + beta^2 Q - 2 beta M (eq. 26 / 102)."""
    _check(Q0, Q, noise)
    if not beta > 0:
        raise ParamError(f"beta must be > 0, got {beta}")
    return delta_eff_beta_of_A0(A0(Q0, noise), Q, M, beta)


def beta_min(Q: float, M: float) -> float:
    """beta_min = M / Q, the minimiser of Delta_eff(beta) (eq. 26 / 103)."""
    if not Q > 0:
        raise ParamError(f"beta_min = M/Q needs Q > 0, got {Q}")
    return M / Q


def delta_eff_min(Q0: float, Q: float, M: float, noise: float) -> float:
    """Delta_eff(beta_min) = Delta/2 + Q0 - M^2 / Q (eq. 26 / 103)."""
    _check(Q0, Q, noise)
    if not Q > 0:
        raise ParamError(f"Delta_eff(beta_min) needs Q > 0, got {Q}")
    return delta_eff_min_of_A0(A0(Q0, noise), Q, M)


def delta_eff_actft(Q0: float, Q: float, M: float, noise: float) -> float:
    """Delta_eff,ActFT = Delta/2 + Q0 - M^2 / Q (eq. 28 / 105): Var(z - z* | z = 0) per entry."""
    return delta_eff_min(Q0, Q, M, noise)


def delta_eff_reuse_linear(Q0: float, Q: float, M: float, noise: float, V: float, T: int, beta: float = 1.0) -> float:
    """Delta_eff(e = 1) for linear sigma (eq. 27 / 108), optionally with the recalibration beta.

    beta = 1 gives Delta_eff(e = 0) / (1 + 4 V / T^2)^2; general beta: see the module docstring.
    """
    _check(Q0, Q, noise)
    if not V >= 0:
        raise ParamError(f"V must be >= 0, got {V}")
    if isinstance(T, bool) or int(T) != T or T < 2:
        raise ParamError(f"tokens (T) must be an integer >= 2, got {T!r}")
    if not beta > 0:
        raise ParamError(f"beta must be > 0, got {beta}")
    c = 4.0 * V / T**2
    if math.isinf(c):
        w1, w2 = 1.0, 0.0
    else:
        w1, w2 = c / (1 + c), 1 / (1 + c)
    a = beta * w1 - 1.0
    return a * a * A0(Q0, noise) + beta * beta * w2 * w2 * Q + 2 * a * beta * w2 * M


def delta_eff_from_fields(z_star: np.ndarray, z: np.ndarray, beta: float = 1.0) -> tuple[float, float]:
    """Per-entry variance of beta z - z*, Var/(1 + delta_ab) averaged over entries: (value, MC se).

    The Monte-Carlo version of eqs. 25-27 for any law of the fields (e.g. R for softmax).
    Fields on the upper triangle, shape (n, L).
    """
    z_star = np.asarray(z_star, dtype=float)
    z = np.asarray(z, dtype=float)
    if z_star.ndim != 2 or z.shape != z_star.shape:
        raise ParamError(f"z_star and z must both have shape (n, L), got {z_star.shape} and {z.shape}")
    L = z.shape[1]
    T = int(round((math.sqrt(8 * L + 1) - 1) / 2))
    if T * (T + 1) // 2 != L:
        raise ParamError(f"fields of width {L} are not the upper triangle of a T x T matrix")
    a, b = np.triu_indices(T)
    s = 1.0 + (a == b)
    # per sample: mean over the T^2 entries of (beta z - z*)^2 / s_ab (off-diagonal counted twice)
    w = np.where(a == b, 1.0, 2.0) / T**2
    per = ((beta * z - z_star) ** 2 / s * w).sum(axis=1)
    n = per.size
    return float(per.mean()), float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
