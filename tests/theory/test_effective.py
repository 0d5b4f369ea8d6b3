"""Effective noises (eqs. 25-28, App. C): identities and Monte-Carlo checks."""

import math

import numpy as np
import pytest

from hdlora import ParamError
from hdlora.theory import effective as eff
from hdlora.theory.sampling import frozen_fields

T = 3
POINTS = [(2.0, 2.0, 1.0, 0.5), (2.0, 0.7, 1.1, 0.0), (1.5, 3.0, 0.2, 2.0), (4.0, 4.0, 1.0, 0.0)]


@pytest.mark.parametrize("Q0,Q,M,noise", POINTS)
def test_delta_eff_family_identities(Q0, Q, M, noise):
    d = eff.delta_eff(Q0, Q, M, noise)
    assert d == pytest.approx(noise / 2 + Q0 - 2 * M + Q)
    assert eff.delta_eff_beta(Q0, Q, M, noise, 1.0) == pytest.approx(d)
    # Delta_eff - Delta_eff,ActFT = (M / sqrt(Q) - sqrt(Q))^2 >= 0   (App. C)
    gap = d - eff.delta_eff_actft(Q0, Q, M, noise)
    assert gap == pytest.approx((M / math.sqrt(Q) - math.sqrt(Q)) ** 2) and gap >= 0
    # beta_min = M / Q minimises Delta_eff(beta) (eq. 26) and gives Delta_eff_min = ActFT value
    bmin = eff.beta_min(Q, M)
    grid = np.linspace(0.05, 3.0, 2000) * max(bmin, 0.05)
    vals = np.array([eff.delta_eff_beta(Q0, Q, M, noise, b) for b in grid])
    assert eff.delta_eff_beta(Q0, Q, M, noise, bmin) <= vals.min() + 1e-12
    assert eff.delta_eff_beta(Q0, Q, M, noise, bmin) == pytest.approx(eff.delta_eff_min(Q0, Q, M, noise))


@pytest.mark.parametrize("Q0,Q,M,noise", POINTS)
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_delta_eff_is_the_variance_of_beta_z_minus_z_star(Q0, Q, M, noise, beta):
    f = frozen_fields(200_000, T, Q0 + noise / 2, Q, M, seed=3)
    mean, se = eff.delta_eff_from_fields(f["z_star"], f["z"], beta)
    assert abs(mean - eff.delta_eff_beta(Q0, Q, M, noise, beta)) < 4 * se


@pytest.mark.parametrize("Q0,Q,M,noise", POINTS)
def test_actft_is_the_conditional_variance_at_z_zero(Q0, Q, M, noise):
    """Eq. 28: Var(z - z* | z = 0) per entry, measured on an off-diagonal entry with |z| < 0.01."""
    f = frozen_fields(2_000_000, 2, Q0 + noise / 2, Q, M, seed=5)
    z, zs = f["z"][:, 1], f["z_star"][:, 1]  # the off-diagonal entry (0, 1) of T = 2
    sel = np.abs(z) < 0.01 * math.sqrt(Q)
    h = (z - zs)[sel]
    var, n = h.var(ddof=1), h.size
    se = var * math.sqrt(2.0 / (n - 1))  # standard error of a Gaussian variance
    assert abs(var - eff.delta_eff_actft(Q0, Q, M, noise)) < 4 * se + 1e-4 * var  # 1e-4: |z| < 0.01 sqrt(Q) window


@pytest.mark.parametrize("V", [0.0, 0.3, 2.0, 50.0])
@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_reuse_linear_effective_noise(V, beta):
    """Eq. 27 / 108: for linear sigma the train-law field is z = (c z* + z~)/(1 + c), c = 4V/T^2."""
    Q0, Q, M, noise = 2.0, 1.5, 1.0, 0.5
    f = frozen_fields(200_000, T, Q0 + noise / 2, Q, M, seed=7)
    zs, zt = f["z_star"], f["z"]
    c = 4 * V / T**2
    z = (c * zs + zt) / (1 + c)
    # z is the maximiser of Psi (eq. 106): d Psi / d z_ab = 0 on and off the diagonal
    a, b = np.triu_indices(T)
    s = 1.0 + (a == b)
    grad = -(2.0 / T**2) * (2 / s) * (z - zs) + (zt - z) / (V * s) if V > 0 else zt - z
    assert np.max(np.abs(grad)) < 1e-10
    mean, se = eff.delta_eff_from_fields(zs, z, beta)
    assert abs(mean - eff.delta_eff_reuse_linear(Q0, Q, M, noise, V, T, beta)) < 4 * se
    if beta == 1.0:
        assert eff.delta_eff_reuse_linear(Q0, Q, M, noise, V, T) == pytest.approx(
            eff.delta_eff(Q0, Q, M, noise) / (1 + 4 * V / T**2) ** 2
        )
    assert eff.delta_eff_reuse_linear(Q0, Q, M, noise, V, T) <= eff.delta_eff(Q0, Q, M, noise) + 1e-15


def test_bad_input():
    with pytest.raises(ParamError, match="Q0"):
        eff.delta_eff(0.0, 1.0, 0.5, 0.5)
    with pytest.raises(ParamError, match="beta"):
        eff.delta_eff_beta(2.0, 1.0, 0.5, 0.5, -1.0)
    with pytest.raises(ParamError, match="Q"):
        eff.beta_min(0.0, 1.0)
    with pytest.raises(ParamError, match="V"):
        eff.delta_eff_reuse_linear(2.0, 1.0, 0.5, 0.5, -1.0, T)
    with pytest.raises(ParamError, match="tokens"):
        eff.delta_eff_reuse_linear(2.0, 1.0, 0.5, 0.5, 1.0, 1)
    with pytest.raises(ParamError, match="shape"):
        eff.delta_eff_from_fields(np.zeros((5, 6)), np.zeros((5, 3)))
