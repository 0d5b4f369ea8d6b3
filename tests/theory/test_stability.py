"""Replicon conditions (hdlora.theory.stability, eqs. 75 and 78)."""

import numpy as np
import pytest

from hdlora.theory.stability import replicon_finetune_terms, replicon_pretrain


@pytest.mark.parametrize("T", [2, 3, 5])
def test_finetune_terms_are_alpha_ft_times_the_norm_of_the_inverse_scaled_hessian_plus_identity(T):
    """Eq. 78 from an explicit Hessian: alpha' ||(v Hess psi)^-1 + I||_F^2 with C = -(Hess psi)^-1 (eq. 66)."""
    rng = np.random.default_rng(T)
    n, v, alpha_ft = 50, 0.7, 3.0
    A = rng.normal(size=(n, T, T))
    hess = -(A @ np.swapaxes(A, 1, 2) + 0.3 * np.eye(T))  # a local maximum: negative definite
    C = -np.linalg.inv(hess)
    direct = alpha_ft * np.sum((np.linalg.inv(v * hess) + np.eye(T)) ** 2, axis=(1, 2))
    terms = replicon_finetune_terms(alpha_ft, C, v)
    assert terms.shape == (n,)
    np.testing.assert_allclose(terms, direct, rtol=1e-10)


def test_finetune_terms_vanish_for_a_flat_prox_and_scale_with_alpha_ft():
    T, v = 3, 0.4
    C = np.broadcast_to(v * np.eye(T), (4, T, T))  # C = v I: (v Hess)^-1 = -I, the identity cancels
    assert np.all(replicon_finetune_terms(2.0, C, v) == 0.0)
    C2 = np.broadcast_to(0.5 * v * np.eye(T), (4, T, T))
    np.testing.assert_allclose(replicon_finetune_terms(2.0, C2, v), 2 * replicon_finetune_terms(1.0, C2, v))
    np.testing.assert_allclose(replicon_finetune_terms(1.0, C2, v), T * 0.25)


def test_pretrain_replicon_edge_cases():
    assert replicon_pretrain(0.1, 0.0, 1.0, 1.0, 1.0) == 0.0  # lam = inf: W_hat = 0
    assert np.isnan(replicon_pretrain(0.1, 1.0, -1.0, 1.0, 1.0))
    assert replicon_pretrain(0.2, 2.0, 0.5, 3.0, 0.25) == pytest.approx(2 * 0.2 * 3.0 * 0.25 / (4.0 * 0.25))
