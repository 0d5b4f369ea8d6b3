"""Errors in terms of the order parameters (Result 3, eqs. 19-20), forgetting (eq. 84), baselines (A.7).

Every error is a sum over all T x T entries of the squared difference of attention
matrices (eq. 29-30: the sequence loss reduces to the attention-matrix loss).

Sample-based functions take frozen fields on the upper triangle, shape (n, L),
L = T(T+1)/2 (order of :func:`hdlora.theory.sampling.upper_indices`), or as full
symmetric matrices (n, T, T), and return per-sample losses (so that the caller can
report Monte-Carlo standard errors).

For the linear activation sigma(x) = x / T every expectation over the test laws is a
Gaussian fourth moment, and closed forms are given (``linear_*``).  With
h = z - z* (entries independent, Var h_ab = (1 + delta_ab) Delta_eff, eq. 99-101) and
F = chi chi^T - chi* chi*^T - (q - q0) I (tokens independent, (chi*_a, chi_a) ~ Q'_a, eq. 14):

    E ||h||_F^2 = (T^2 - T) Delta_eff + T * 2 Delta_eff = (T^2 + T) Delta_eff,
    E F_ab^2 = q^2 - 2 m^2 + q0^2            (a != b: E chi_a^2 chi_b^2 = q^2, E chi_a chi*_a = m)
    E F_aa^2 = Var(chi_a^2 - chi*_a^2) = 2 (q^2 - 2 m^2 + q0^2),
    E ||h + F||^2 = (T^2 + T) (Delta_eff + q0^2 + q^2 - 2 m^2),

so E' = (T^2 + T)(Delta_eff + q0^2 + q^2 - 2 m^2) / T^2.  The frozen baseline (q = m = 0,
eq. 80) is therefore (T^2 + T)(Delta_eff + 1) / T^2: the paper prints (T^2 + T - 2) in front
of Delta_eff; counting entries gives (T^2 + T) (the same count that gives the constant
T^2 + T in eq. 80).  :func:`linear_frozen_test_error` implements the derived form and
:func:`linear_frozen_test_error_printed` the printed one, for the comparison with simulations.
"""

from __future__ import annotations

import math

import numpy as np

from ..activations import get as get_activation
from ..params import A0, DEFAULT_N_MC, ParamError
from .effective import delta_eff_of_A0
from .sampling import frozen_fields, standard_normals, to_sym

__all__ = [
    "mc_mean",
    "pretrain_losses",
    "finetune_loss",
    "finetune_losses",
    "pretrain_test_error",
    "finetune_test_error",
    "forgetting_error",
    "frozen_test_error",
    "lora_only_test_error",
    "linear_pretrain_test_error",
    "linear_finetune_test_error",
    "linear_forgetting_error",
    "linear_frozen_test_error",
    "linear_frozen_test_error_printed",
]


def mc_mean(x: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of per-sample values."""
    x = np.asarray(x, dtype=float)
    se = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def _full(x: np.ndarray, T: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3:
        return x
    if x.ndim != 2:
        raise ParamError(f"fields must have shape (n, L) or (n, T, T), got {x.shape}")
    L = x.shape[1]
    T_ = int(round((math.sqrt(8 * L + 1) - 1) / 2))
    if T_ * (T_ + 1) // 2 != L or (T is not None and T_ != T):
        raise ParamError(f"fields of width {L} are not the upper triangle of a T x T matrix (T={T})")
    return to_sym(x, T_)


# ----------------------------------------------------------------------------------------
# per-sample losses
# ----------------------------------------------------------------------------------------
def pretrain_losses(activation: str, z_star: np.ndarray, z: np.ndarray) -> np.ndarray:
    """||sigma(z) - sigma(z*)||_F^2 per sample: E (eq. 19/55) over Q, L (eq. 20) over R."""
    sigma = get_activation(activation, "numpy")
    Zs, Z = _full(z_star), _full(z)
    return np.sum((sigma(Z) - sigma(Zs)) ** 2, axis=(1, 2))


def finetune_loss(
    activation: str, z_star: np.ndarray, z: np.ndarray, chi_star: np.ndarray, chi: np.ndarray, q: float, q0: float = 1.0
) -> np.ndarray:
    """||sigma(z + chi chi^T - q I) - sigma(z* + chi* chi*^T - q0 I)||_F^2 per sample (eqs. 19-20, 73)."""
    sigma = get_activation(activation, "numpy")
    Zs, Z = _full(z_star), _full(z)
    T = Zs.shape[-1]
    eye = np.eye(T)
    pred = sigma(Z + chi[:, :, None] * chi[:, None, :] - q * eye)
    target = sigma(Zs + chi_star[:, :, None] * chi_star[:, None, :] - q0 * eye)
    return np.sum((pred - target) ** 2, axis=(1, 2))


def _draw_rank_one(n: int, T: int, q: float, m: float, q0: float, seed: int):
    """(chi*, chi) ~ Q' (eq. 14), i.i.d. over tokens."""
    if q < 0 or q0 <= 0 or m * m > q * q0 * (1 + 1e-12) + 1e-15:
        raise ParamError(f"need q >= 0, q0 > 0, m^2 <= q q0 (a covariance), got q={q}, m={m}, q0={q0}")
    x = standard_normals(n, 2 * T, seed, purpose="test_rank_one")
    g, u = x[:, :T], x[:, T:]
    chi_star = math.sqrt(q0) * g
    chi = (m / math.sqrt(q0)) * g + math.sqrt(max(q - m * m / q0, 0.0)) * u
    return chi_star, chi


def finetune_losses(
    activation: str, z_star: np.ndarray, z: np.ndarray, q: float, m: float, *, q0: float = 1.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-sample fine-tuning (eq. 73) and forgetting (eq. 84) losses on test fields (z*, z) ~ Q.

    One independent (chi*, chi) ~ Q' (eq. 14) is drawn per field sample.  Returns
    {'finetune': (n,), 'forgetting': (n,)}.
    """
    sigma = get_activation(activation, "numpy")
    Zs, Z = _full(z_star), _full(z)
    n, T = Zs.shape[0], Zs.shape[-1]
    chi_star, chi = _draw_rank_one(n, T, q, m, q0, seed)
    eye = np.eye(T)
    pred = sigma(Z + chi[:, :, None] * chi[:, None, :] - q * eye)
    target = sigma(Zs + chi_star[:, :, None] * chi_star[:, None, :] - q0 * eye)
    return {
        "finetune": np.sum((pred - target) ** 2, axis=(1, 2)),
        "forgetting": np.sum((pred - sigma(Zs)) ** 2, axis=(1, 2)),
    }


# ----------------------------------------------------------------------------------------
# closed forms, linear sigma(x) = x / T
# ----------------------------------------------------------------------------------------
def linear_pretrain_test_error(T: int, Q0: float, Q: float, M: float, noise: float) -> float:
    """E = (T^2 + T) Delta_eff / T^2 for sigma(x) = x/T (eq. 19 with eq. 25)."""
    return (T * T + T) * delta_eff_of_A0(A0(Q0, noise), Q, M) / T**2


def linear_finetune_test_error(
    T: int, Q0: float, Q: float, M: float, noise: float, q: float, m: float, q0: float = 1.0
) -> float:
    """E' = (T^2 + T)(Delta_eff + q0^2 + q^2 - 2 m^2) / T^2 for sigma(x) = x/T (eq. 73; module docstring)."""
    return (T * T + T) * (delta_eff_of_A0(A0(Q0, noise), Q, M) + q0 * q0 + q * q - 2 * m * m) / T**2


def linear_forgetting_error(T: int, Q0: float, Q: float, M: float, noise: float, q: float) -> float:
    """E'' = (T^2 + T)(Delta_eff + q^2) / T^2 for sigma(x) = x/T (eq. 84: E||chi chi^T - q I||^2 = (T^2+T) q^2)."""
    return (T * T + T) * (delta_eff_of_A0(A0(Q0, noise), Q, M) + q * q) / T**2


def linear_frozen_test_error(T: int, delta_eff: float, q0: float = 1.0) -> float:
    """Frozen baseline (eq. 79) for sigma(x) = x/T, as derived: (T^2 + T)(Delta_eff + q0^2) / T^2.

    The paper's eq. 80 prints ((T^2 + T - 2) Delta_eff + T^2 + T) / T^2; see the module docstring.
    """
    return (T * T + T) * (delta_eff + q0 * q0) / T**2


def linear_frozen_test_error_printed(T: int, delta_eff: float) -> float:
    """Eq. 80 exactly as printed in the paper: ((T^2 + T - 2) Delta_eff + T^2 + T) / T^2 (for comparison)."""
    return ((T * T + T - 2) * delta_eff + T * T + T) / T**2


# ----------------------------------------------------------------------------------------
# errors from the order parameters (closed form for linear, Monte Carlo for softmax)
# ----------------------------------------------------------------------------------------
def _check_T(T: float):
    if isinstance(T, bool) or int(T) != T or T < 2:
        raise ParamError(f"tokens (T) must be an integer >= 2, got {T!r}")
    return int(T)


def _test_fields(T: int, Q0: float, Q: float, M: float, noise: float, n_mc: int, seed: int):
    if n_mc < 2:
        raise ParamError(f"n_mc must be >= 2, got {n_mc}")
    f = frozen_fields(n_mc, T, A0(Q0, noise), Q, M, seed=seed, purpose="test")
    return f["z_star"], f["z"]


def pretrain_test_error(
    activation: str, T: int, Q0: float, Q: float, M: float, noise: float, *, n_mc: int = DEFAULT_N_MC, seed: int = 0
) -> tuple[float, float]:
    """E (eq. 19 / 55): (value, Monte-Carlo standard error; 0 for the linear closed form)."""
    T = _check_T(T)
    if activation == "linear":
        return linear_pretrain_test_error(T, Q0, Q, M, noise), 0.0
    zs, z = _test_fields(T, Q0, Q, M, noise, n_mc, seed)
    return mc_mean(pretrain_losses(activation, zs, z))


def finetune_test_error(
    activation: str,
    T: int,
    Q0: float,
    Q: float,
    M: float,
    noise: float,
    q: float,
    m: float,
    *,
    q0: float = 1.0,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
) -> tuple[float, float]:
    """E' (eqs. 19, 73) from the order parameters: (value, Monte-Carlo standard error)."""
    return _fine_tuned_error("finetune", activation, T, (Q0, Q, M, noise, q, m), q0, n_mc, seed)


def forgetting_error(
    activation: str,
    T: int,
    Q0: float,
    Q: float,
    M: float,
    noise: float,
    q: float,
    m: float,
    *,
    q0: float = 1.0,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
) -> tuple[float, float]:
    """E'' (eq. 84): the fine-tuned model on the pre-training task: (value, MC standard error)."""
    return _fine_tuned_error("forgetting", activation, T, (Q0, Q, M, noise, q, m), q0, n_mc, seed)


def _fine_tuned_error(
    which: str, activation: str, T: int, p: tuple[float, ...], q0: float, n_mc: int, seed: int
) -> tuple[float, float]:
    """E' (``which`` = 'finetune') or E'' ('forgetting') of the fine-tuned model at p = (Q0, Q, M, Delta, q, m):
    closed form for the linear activation (error 0), else the Monte-Carlo mean over the test fields with its
    standard error."""
    Q0, Q, M, noise, q, m = p
    T = _check_T(T)
    if activation == "linear":
        if which == "finetune":
            return linear_finetune_test_error(T, Q0, Q, M, noise, q, m, q0), 0.0
        return linear_forgetting_error(T, Q0, Q, M, noise, q), 0.0
    zs, z = _test_fields(T, Q0, Q, M, noise, n_mc, seed)
    return mc_mean(finetune_losses(activation, zs, z, q, m, q0=q0, seed=seed)[which])


def frozen_test_error(
    activation: str, T: int, Q0: float, Q: float, M: float, noise: float, *, n_mc: int = DEFAULT_N_MC, seed: int = 0
) -> tuple[float, float]:
    """Frozen pre-training baseline E'_frozen (eq. 79; eq. 80 as derived for linear sigma)."""
    return finetune_test_error(activation, T, Q0, Q, M, noise, 0.0, 0.0, n_mc=n_mc, seed=seed)


def lora_only_test_error(
    activation: str, T: int, Q0: float, noise: float, q: float, m: float, *, n_mc: int = DEFAULT_N_MC, seed: int = 0
) -> tuple[float, float]:
    """LoRA-only E' (eq. 82): W_hat = 0, so z = 0 and z* ~ eq. 81 (Q = M = 0 in Q)."""
    return finetune_test_error(activation, T, Q0, 0.0, 0.0, noise, q, m, n_mc=n_mc, seed=seed)
