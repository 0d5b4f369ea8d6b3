"""Active fine-tuning in the theory (Section 4.3, Algorithm 1, Appendix D).

Algorithm 1 labels the N' = rho N_bar' candidate sequences whose frozen
pre-activations z are closest to zero in the sense of
||sigma(z) - sigma(0)||_F^2.  In the state evolution this conditions the law Q
of the frozen fields (z*, z): as in Appendix D we draw n_mc / rho samples of
(z*, z) ~ Q (eq. 13) and keep the n_mc with the lowest score.  The rank-one
fields (chi*, chi) are independent of (z*, z) (App. A.4) and are not affected.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np

from ..activations import get as get_activation
from ..params import A0, ParamError, Params
from .sampling import frozen_fields, to_sym


def selection_score(z: np.ndarray, T: int, activation: str) -> np.ndarray:
    """||sigma(z) - sigma(0)||_F^2 per sample (Algorithm 1, step 2); z on the upper triangle (n, L)."""
    sigma = get_activation(activation, "numpy")
    Z = to_sym(np.asarray(z, dtype=np.float64), T)
    return np.sum((sigma(Z) - sigma(np.zeros((1, T, T)))) ** 2, axis=(-2, -1))


def select(z_star: np.ndarray, z: np.ndarray, n_keep: int, T: int, activation: str) -> tuple[np.ndarray, np.ndarray]:
    """Keep the n_keep samples with the lowest selection score (ties broken by index, stable)."""
    if not (1 <= n_keep <= z.shape[0]):
        raise ParamError(f"n_keep must be in [1, {z.shape[0]}], got {n_keep}")
    order = np.argsort(selection_score(z, T, activation), kind="stable")[:n_keep]
    return z_star[order], z[order]


def active_fields(
    params: Params,
    Q0: float,
    Q: float,
    M: float,
    n_mc: int,
    seed: int = 0,
    method: str = "mc",
    purpose: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(z*, z) of the fine-tuning set chosen by Algorithm 1 from a pool of n_mc / rho draws of Q.

    The score uses the frozen map actually used for fine-tuning: with the
    recalibration of eq. 26 (W_hat -> sqrt(beta) W_hat) the pre-activation is beta z.
    Returned z is *before* recalibration (the fine-tuning solver applies beta).
    """
    if params.active_pool is None:
        raise ParamError("active_fields needs params.active_pool (alpha_bar') to be set")
    rho = cast(float, params.rho)  # active_pool is set (checked above), so rho is a float
    n_pool = int(math.ceil(n_mc / rho))
    f = frozen_fields(n_pool, params.tokens, A0(Q0, params.noise), Q, M, seed, method, purpose)
    keep_zs, keep_z = select(f["z_star"], params.beta * f["z"], n_mc, params.tokens, params.activation)
    return keep_zs, keep_z / params.beta
