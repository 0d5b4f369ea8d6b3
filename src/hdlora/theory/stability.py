"""Replicon (local stability) conditions of the state evolutions (App. A.6, eqs. 74-78).

Each function returns the value of the left-hand side; the replica-symmetric
description is stable when it is < 1 (callers flag values >= 1).

Pre-training (eq. 75).  In the standard form of the de Almeida-Thouless/replicon
condition for an ERM in a GLM-type problem,

    alpha_eff * E[(d g_out / d omega)^2] * E[(d f_in / d b)^2] < 1,

the output factor is d g_out/d omega = -[(V Hess_u)^-1 + I_L] / V, with Hess_u the
Hessian of Psi at the prox in the normalised entries u_ab = h_ab / sqrt(s_ab)
(in which the quadratic term of eq. 42 reads |u~ - u|^2 / (2V)), and the input
factor is the divided difference of the spectral denoiser,
(zeta(x) - zeta(y)) / (V_hat (x - y)).  Hence

    2 alpha E ||(V Hess_u)^-1 + I_L||_F^2 * (1 / (V^2 V_hat^2))
        * ∫∫ (zeta(x) - zeta(y))^2 / (x - y)^2 mu_eta(dx) mu_eta(dy)  < 1.      (eq. 75, corrected)

The paper prints eq. 75 without the factor 1/V^2.  Evidence that it is needed:
(i) the fine-tuning condition eq. 78 has the same output factor and the ridge
input factor v = 1/(2 lam' + v_hat), so that v^2 cancels the 1/v^2 there; (ii) for
the linear activation, lam = 0 and an inactive PSD constraint (zeta(x) = x on the
support), pre-training is ordinary least squares with D^2/2 unknowns and
alpha L D^2 measurements, strictly convex as soon as 2 alpha L > 1; the corrected
expression equals exactly 1 / (2 alpha L) there (stable iff 2 alpha L > 1), while
the printed one equals V^2 / (2 alpha L), which exceeds 1 in part of the convex
region (e.g. T = 2, alpha = 0.2: V = 5, value 21).  The test suite checks (ii).

Fine-tuning (eq. 78): alpha' E ||(v Hess psi)^-1 + I_T||_F^2 < 1, with Hess psi the
Hessian of psi (eq. 63) at the prox chi; the fine-tuning state evolution keeps
C = -(Hess psi)^-1 (eq. 66), so (v Hess psi)^-1 = -C / v and the per-sample term is
alpha' ||I_T - C / v||_F^2 (:func:`replicon_finetune_terms`; its mean is the left-hand side).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["replicon_pretrain", "replicon_finetune_terms", "replicon_tail_share"]


def replicon_pretrain(alpha: float, V: float, V_hat: float, sample_term: float, spectral_integral: float) -> float:
    """Left-hand side of the pre-training replicon condition (eq. 75, with the 1/V^2 factor).

    Args:
        alpha: alpha (N = alpha D^2).
        V: order parameter V at the fixed point (eq. 51).
        V_hat: order parameter V_hat at the fixed point (eq. 53).
        sample_term: E ||(V Hess_u Psi(Prox))^-1 + I_L||_F^2 over (z*, z~) ~ Q (eq. 74),
            e.g. the mean of :attr:`hdlora.theory.prox.ProxResult.replicon`.
        spectral_integral: ∫∫ (zeta(x)-zeta(y))^2/(x-y)^2 mu_eta mu_eta, eta = Q_hat^1/2 / M_hat,
            zeta(x) = (x - 2 sqrt(kappa) lam / M_hat)_+ (eq. 76), from
            :func:`hdlora.theory.spectral.replicon_integral`.

    Returns:
        The value; stability requires it to be < 1.  V = 0 (lam = inf, W_hat = 0) gives 0.
    """
    if V == 0.0 or sample_term == 0.0 or spectral_integral == 0.0:
        return 0.0
    if not (V > 0 and V_hat > 0):
        return math.nan
    return 2.0 * alpha * sample_term * spectral_integral / (V * V * V_hat * V_hat)


def replicon_finetune_terms(alpha_ft: float, C: np.ndarray, v: float) -> np.ndarray:
    """Per-sample terms of the fine-tuning replicon condition (eq. 78): alpha' ||(v Hess psi)^-1 + I_T||_F^2.

    Args:
        alpha_ft: alpha' (N' = alpha' D).
        C: (n, T, T) C = -(Hess psi)^-1 at the prox of each sample (eq. 66), so (v Hess psi)^-1 = -C / v.
        v: the order parameter v at the fixed point (eq. 68), > 0.

    Returns:
        (n,) the terms; their mean is the left-hand side of eq. 78 (stable when < 1), their
        standard error its Monte-Carlo error.
    """
    eye = np.eye(C.shape[-1])
    return alpha_ft * np.sum((eye - C / v) ** 2, axis=(1, 2))


def replicon_tail_share(terms: np.ndarray, k: int = 10) -> float:
    """Share of the k largest (non-negative) per-sample replicon terms in their sum: about k/n for a light tail,
    O(1) for a heavy one (then the mean and its standard error are unreliable: the terms are heavy-tailed where
    prox maxima are near-degenerate)."""
    t = np.asarray(terms, dtype=np.float64).ravel()
    tot = float(t.sum())
    if t.size == 0 or not tot > 0:
        return math.nan
    return float(np.sort(t)[-k:].sum() / tot)
