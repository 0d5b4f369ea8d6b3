"""Tests of the spectral input channel (theory/spectral.py): mu_eta = mu0 ⊞ semicircle, J, J1, J2
(eqs. 44, 48), the replicon double integral (eq. 75) and the Bayes-optimal cubic integral (eq. 87).

Identities are checked against independent computations (moments, the subordination cubic,
finite differences, the 2-D heat-flow integral, Marchenko-Pastur at eta -> 0, eigenvalues of
sampled matrices Y = S*/sqrt(D) + eta Z).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from hdlora.params import ParamError
from hdlora.theory import spectral as sp

pytestmark = pytest.mark.filterwarnings("error::hdlora.theory.spectral.AccuracyWarning")

KAPPA0S = (0.5, 1.0, 2.0)


# ----------------------------------------------------------------------------- helpers
def sample_eigenvalues(D: int, kappa0: float, eta: float, seed: int) -> np.ndarray:
    """Eigenvalues of Y = S*/sqrt(D) + eta Z: S* = W* W*^T/sqrt(P0), P0 = kappa0 D, W* Gaussian,
    Z GOE with semicircle on [-2, 2] (off-diagonal variance 1/D, diagonal 2/D)."""
    rng = np.random.default_rng(seed)
    P0 = int(round(kappa0 * D))
    W = rng.standard_normal((D, P0))
    S = W @ W.T / math.sqrt(P0) / math.sqrt(D)
    G = rng.standard_normal((D, D))
    Z = (G + G.T) / math.sqrt(2 * D)
    return np.linalg.eigvalsh(S + eta * Z)


def mp_J(eps: float, kappa0: float) -> float:
    """J at eta = 0, i.e. E_{mu0}[(x - eps)_+^2] with mu0 = sqrt(kappa0) MP(c = 1/kappa0),
    from the closed-form Marchenko-Pastur density (+ atom 1 - kappa0 at 0), by scipy.quad."""
    c, s = 1.0 / kappa0, math.sqrt(kappa0)
    a, b = s * (1 - math.sqrt(c)) ** 2, s * (1 + math.sqrt(c)) ** 2

    def rho(x):
        y = x / s
        return math.sqrt(max((b / s - y) * (y - a / s), 0.0)) / (2 * math.pi * c * y) / s

    lo = max(a, eps)
    val = 0.0
    if lo < b:
        val = integrate.quad(lambda x: rho(x) * (x - eps) ** 2, lo, b, limit=200, epsabs=1e-13, epsrel=1e-12)[0]
    if kappa0 < 1 and eps < 0:
        val += (1 - kappa0) * eps**2
    return val


# ----------------------------------------------------------------------------- the law mu_eta
@pytest.mark.parametrize("kappa0", KAPPA0S)
@pytest.mark.parametrize("eta", (0.05, 0.3, 1.0, 3.0))
def test_moments(kappa0, eta):
    """mass 1, mean sqrt(kappa0), second moment Q0 + eta^2 = 1 + kappa0 + eta^2."""
    m0 = sp.expectation(np.ones_like, eta, kappa0)
    m1 = sp.expectation(lambda x: x, eta, kappa0)
    m2 = sp.expectation(lambda x: x * x, eta, kappa0)
    assert m0.converged and m1.converged and m2.converged
    assert m0.value == pytest.approx(1.0, abs=1e-12)
    assert m1.value == pytest.approx(math.sqrt(kappa0), abs=1e-12)
    assert m2.value == pytest.approx(1.0 + kappa0 + eta**2, abs=1e-11)


@pytest.mark.parametrize("kappa0,eta", [(0.5, 0.1), (0.5, 1.0), (1.0, 0.05), (2.0, 0.5)])
def test_density_solves_subordination_cubic(kappa0, eta):
    """The Stieltjes transform of the computed density, G(z) = ∫ rho(y)/(z - y) dy at complex z,
    is a root of the subordination cubic t G^3 - (z + r t) G^2 + (r z - k + 1) G - r = 0."""
    t, r, k = eta**2, math.sqrt(kappa0), kappa0
    for z in (0.3 + 0.5j, 2.0 + 0.2j, -1.0 + 1.0j, 5.0 + 0.1j):
        re = sp.expectation(lambda y: (1 / (z - y)).real, eta, kappa0).value
        im = sp.expectation(lambda y: (1 / (z - y)).imag, eta, kappa0).value
        g = re + 1j * im
        resid = t * g**3 - (z + r * t) * g**2 + (r * z - k + 1) * g - r
        assert abs(resid) < 1e-10, (z, g, resid)


def test_support_components_and_smoothed_atom():
    # kappa0 < 1, small eta: the atom 1 - kappa0 at 0 becomes a separate bump of that mass
    iv = sp.support(0.05, 0.5)
    assert len(iv) == 2
    (a0, b0), (a1, b1) = iv
    assert a0 < 0 < b0 < a1 < b1
    mass = sp.expectation(np.ones_like, 0.05, 0.5, upper=0.5 * (b0 + a1)).value
    assert mass == pytest.approx(0.5, abs=1e-12)
    # the bump is a semicircle of variance eta^2 (1 - kappa0) to leading order: radius ~ 2 eta sqrt(1/2)
    assert (b0 - a0) / 2 == pytest.approx(2 * 0.05 * math.sqrt(0.5), rel=0.05)
    # large eta: the gap is closed
    assert len(sp.support(1.0, 0.5)) == 1
    # kappa0 >= 1: one interval; for kappa0 > 1 and small eta it stays away from 0
    assert len(sp.support(0.05, 1.0)) == 1
    ((a, b),) = sp.support(0.05, 2.0)
    assert a > 0.1
    # density: zero outside, positive inside, mass by trapezoid on a fine grid
    for kappa0, eta in [(0.5, 0.05), (1.0, 0.3), (2.0, 0.5)]:
        iv = sp.support(eta, kappa0)
        x = np.linspace(iv[0][0] - 1, iv[-1][1] + 1, 4001)
        rho = sp.density(x, eta, kappa0)
        inside = np.zeros_like(x, bool)
        for lo, hi in iv:
            inside |= (x > lo) & (x < hi)
        assert np.all(rho[~inside] == 0) and np.all(rho[inside] > 0)


@pytest.mark.parametrize("kappa0,eta", [(0.5, 0.05), (1.0, 0.3), (2.0, 0.5)])
def test_square_root_edges(kappa0, eta):
    """rho(edge ± d) / sqrt(d) converges as d -> 0 (square-root edges, accurate near the edge)."""
    for lo, hi in sp.support(eta, kappa0):
        for edge, sgn in ((lo, 1), (hi, -1)):
            d = np.array([1e-6, 1e-8, 1e-10]) * (hi - lo)
            ratio = sp.density(edge + sgn * d, eta, kappa0) / np.sqrt(d)
            assert ratio[1] == pytest.approx(ratio[2], rel=1e-3)
            assert ratio[0] == pytest.approx(ratio[2], rel=1e-2)


# ----------------------------------------------------------------------------- J, J1, J2
def eps_grid(eta, kappa0):
    iv = sp.support(eta, kappa0)
    lo, hi = iv[0][0], iv[-1][1]
    return [lo - 0.3, lo + 0.01, 0.0, 0.1, 0.5 * (lo + hi), 3.0, hi - 0.02]


@pytest.mark.parametrize("kappa0", KAPPA0S)
@pytest.mark.parametrize("eta", (0.05, 0.3, 1.0))
def test_J_derivatives_against_finite_differences(kappa0, eta):
    # central differences, h = 1e-5: truncation h^2 J'''/6 ~ 1e-10 and round-off ~1e-16/h ~ 1e-11
    h = 1e-5
    for eps in eps_grid(eta, kappa0):
        r = sp.J(eta, eps, kappa0)
        assert r.converged
        fd1 = (sp.J(eta + h, eps, kappa0).J - sp.J(eta - h, eps, kappa0).J) / (2 * h)
        fd2 = (sp.J(eta, eps + h, kappa0).J - sp.J(eta, eps - h, kappa0).J) / (2 * h)
        assert r.J1 == pytest.approx(fd1, abs=1e-8), eps
        assert r.J2 == pytest.approx(fd2, abs=1e-8), eps
        assert r.J1 == pytest.approx(2 * eta * r.dJ_dt, rel=1e-14)


@pytest.mark.parametrize("kappa0", KAPPA0S)
@pytest.mark.parametrize("eta", (0.05, 0.3, 1.0))
def test_J1_free_heat_flow_double_integral(kappa0, eta):
    """J1 (1-D form 4 eta ∫ zeta rho Re G) = 2 eta ∫∫ (zeta(x)-zeta(y))/(x-y) (2-D quadrature)."""
    for eps in eps_grid(eta, kappa0):
        hf = sp.heat_flow_integral(eta, eps, kappa0)
        assert hf.converged
        assert sp.J(eta, eps, kappa0).J1 == pytest.approx(2 * eta * hf.value, abs=1e-9), eps


@pytest.mark.parametrize("kappa0", KAPPA0S)
def test_J_regions(kappa0):
    eta = 0.3
    iv = sp.support(eta, kappa0)
    lo, hi = iv[0][0], iv[-1][1]
    # beyond the right edge: exactly zero
    for eps in (hi, hi + 1e-9, hi + 5.0, math.inf):
        r = sp.J(eta, eps, kappa0)
        assert (r.J, r.J1, r.J2) == (0.0, 0.0, 0.0)
    # just inside the right edge: tiny, positive, continuous (J ~ (hi - eps)^{7/2})
    r1, r2 = sp.J(eta, hi - 1e-2, kappa0), sp.J(eta, hi - 2e-2, kappa0)
    assert 0 < r1.J < r2.J and r2.J / r1.J == pytest.approx(2**3.5, rel=0.05)
    # left of the support and inside: J = E[(x-eps)^2] - E[(x-eps)^2 ; x < eps]
    for eps in (lo - 2.0, lo - 1e-3, 0.05, 0.5 * (lo + hi), 2.5):
        full = sp.expectation(lambda x: (x - eps) ** 2, eta, kappa0).value
        left = sp.expectation(lambda x: (x - eps) ** 2, eta, kappa0, upper=eps).value
        tail1 = sp.expectation(lambda x: x - eps, eta, kappa0, lower=eps).value
        r = sp.J(eta, eps, kappa0)
        assert r.J == pytest.approx(full - left, abs=1e-11)
        assert r.J2 == pytest.approx(-2 * tail1, abs=1e-11)
    # negative eps left of the support: closed form Var + eta^2 + (mean - eps)^2
    r = sp.J(eta, lo - 1.0, kappa0)
    assert r.J == pytest.approx(1 + eta**2 + (math.sqrt(kappa0) - lo + 1.0) ** 2, rel=1e-14)
    assert r.J1 == pytest.approx(2 * eta) and r.dJ_dt == 1.0


@pytest.mark.parametrize("kappa0", (0.5, 1.0, 2.0))
def test_small_eta_limit_is_marchenko_pastur(kappa0):
    """J(eta -> 0) -> J of mu0 (closed-form MP density + atom); |J(eta) - J(0)| = O(eta^2)."""
    for eps in (-0.3, 0.2, 1.0, 2.5):
        j0 = mp_J(eps, kappa0)
        for eta in (1e-3, sp.ETA_MIN):
            r = sp.J(eta, eps, kappa0)
            assert r.converged
            # d J / d(eta^2) = dJ_dt is bounded by 1 (divided differences of zeta lie in [0, 1])
            assert abs(r.J - j0) <= 1.01 * eta**2 + 1e-9, (eps, eta, r.J, j0)


def test_vectorised_J_matches_scalar():
    etas = np.array([0.1, 0.5, 1.0])
    epss = np.array([[-1.0], [0.3], [10.0]])
    res = sp.J(etas, epss, 0.7)
    assert res.J.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            r = sp.J(etas[j], epss[i, 0], 0.7)
            assert res.J[i, j] == r.J and res.J1[i, j] == r.J1 and res.J2[i, j] == r.J2


# ----------------------------------------------------------------------------- against sampling
SAMPLING_CASES = [(0.5, 0.1), (1.0, 0.3), (2.0, 0.5)]


def _check_against_sampling(D, seeds, kappa0, eta):
    eps_values = (-0.2, 0.5, 1.5, 3.0)
    diffs = []
    for seed in seeds:
        ev = sample_eigenvalues(D, kappa0, eta, seed)
        row = []
        for eps in eps_values:
            r = sp.J(eta, eps, kappa0)
            z = np.maximum(ev - eps, 0.0)
            row += [np.mean(z**2) - r.J, np.mean(z) + r.J2 / 2]
        diffs.append(row)
    diffs = np.array(diffs)
    mean = diffs.mean(0)
    sem = diffs.std(0, ddof=1) / math.sqrt(len(seeds))
    # Linear eigenvalue statistics fluctuate by O(1/D) (not 1/sqrt(D)); measured per-seed standard
    # deviations at D = 800: <= 0.009 for E[(x-eps)_+^2], <= 0.0017 for E[(x-eps)_+]; the finite-D
    # bias is O(1/D) as well.  Tolerance: 4 standard errors + 1/D.
    assert np.all(np.abs(mean) <= 4 * sem + 1.0 / D), (mean, sem)


@pytest.mark.parametrize("kappa0,eta", SAMPLING_CASES)
def test_J_against_sampled_matrices(kappa0, eta):
    _check_against_sampling(800, range(4), kappa0, eta)


@pytest.mark.slow
@pytest.mark.parametrize("kappa0,eta", SAMPLING_CASES + [(0.3, 0.05), (4.0, 1.0)])
def test_J_against_sampled_matrices_large_D(kappa0, eta):
    _check_against_sampling(2000, range(4), kappa0, eta)


@pytest.mark.parametrize("kappa0,eta", [(0.5, 0.1), (0.3, 0.05), (1.0, 0.3), (2.0, 0.5)])
def test_density_against_sampled_spectrum(kappa0, eta):
    D = 800
    ev = np.sort(sample_eigenvalues(D, kappa0, eta, seed=11))
    iv = sp.support(eta, kappa0)
    # Kolmogorov distance: eigenvalue rigidity gives O(log D / D); measured 0.0023-0.0043 at
    # D = 800 over 3 seeds x 4 cases, so 0.01 (= 8/D) leaves room, while a wrong law is off by >> 0.01.
    grid = np.linspace(iv[0][0] - 0.1, iv[-1][1] + 0.1, 120)
    F = sp.cdf(grid, eta, kappa0)
    F_emp = np.searchsorted(ev, grid) / D
    assert np.max(np.abs(F_emp - F)) < 0.01
    # histogram on 20 bins: bin masses from the cdf vs counts (same O(1/D) rigidity argument)
    edges = np.linspace(iv[0][0], iv[-1][1], 21)
    counts = np.histogram(ev, bins=edges)[0] / D
    mass = np.diff(sp.cdf(edges, eta, kappa0))
    assert np.max(np.abs(counts - mass)) < 0.01
    # smoothed atom: exactly D - P0 eigenvalues in the bump when the gap is open
    if len(iv) == 2:
        gap = 0.5 * (iv[0][1] + iv[1][0])
        assert np.sum(ev < gap) == D - int(round(kappa0 * D))


# ----------------------------------------------------------------------------- replicon (eq. 75)
@pytest.mark.parametrize("kappa0,eta", [(0.5, 0.1), (1.0, 0.3), (2.0, 1.0)])
def test_replicon_integral(kappa0, eta):
    iv = sp.support(eta, kappa0)
    lo, hi = iv[0][0], iv[-1][1]
    assert sp.replicon_integral(eta, lo - 0.5, kappa0).value == 1.0
    assert sp.replicon_integral(eta, hi + 0.5, kappa0).value == 0.0
    ev = sample_eigenvalues(800, kappa0, eta, seed=3)
    for eps in (0.05, 0.5 * (lo + hi), 2.5):
        rep = sp.replicon_integral(eta, eps, kappa0)
        hf = sp.heat_flow_integral(eta, eps, kappa0)
        assert rep.converged
        p = sp.expectation(np.ones_like, eta, kappa0, lower=eps).value
        # (zeta(x)-zeta(y))/(x-y) lies in [0, 1] and is 1 when both x, y > eps
        assert p**2 <= rep.value <= hf.value <= p**2 + 2 * p * (1 - p)
        # discrete version on sampled eigenvalues (off-diagonal pairs); O(1/D) finite-size
        # differences, measured below 0.01 here, tolerance 0.02
        zeta = np.maximum(ev - eps, 0.0)
        dx = ev[:, None] - ev[None, :]
        np.fill_diagonal(dx, 1.0)
        ratio = (zeta[:, None] - zeta[None, :]) / dx
        np.fill_diagonal(ratio, 0.0)
        emp = np.sum(ratio**2) / len(ev) ** 2
        assert rep.value == pytest.approx(emp, abs=0.02)


# ----------------------------------------------------------------------------- Bayes-optimal (eq. 87)
@pytest.mark.parametrize("kappa0", (0.5, 1.0, 2.0, 4.0))
def test_cubic_integral_mmse_limits(kappa0):
    """mmse(Q_hat) = 1/Q_hat - 4 pi^2/(3 Q_hat^2) ∫ mu_eta^3, eta = Q_hat^{-1/2} (eq. 87)."""
    q_hats = [1e-4, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e4]
    m = np.array([sp.mmse(q, kappa0) for q in q_hats])
    # Q_hat -> 0: the MMSE tends to Var(mu0) = 1 (scalar-like: 1 - Q_hat + O(Q_hat^2))
    assert m[0] == pytest.approx(1 - 1e-4, abs=1e-7)
    # it decreases with the signal-to-noise ratio, and 0 <= mmse <= min(Var = 1, 1/Q_hat)
    assert np.all(np.diff(m) < 0)
    assert np.all(m >= 0) and np.all(m <= np.minimum(1.0, 1.0 / np.array(q_hats)) + 1e-12)
    # Q_hat -> inf: mmse -> 0 as (degrees of freedom)/Q_hat: 1 for full rank (kappa0 >= 1),
    # 2 kappa0 - kappa0^2 for rank kappa0 D (dimension of the rank-kappa0 D manifold).
    # Measured approach: O(1/Q_hat) except kappa0 = 1 (hard edge of mu0, ∫ mu0^3 diverges):
    # |Q_hat mmse - 1| = 2.7e-3 at 1e4, 1.3e-4 at 1e6.
    dof = 1.0 if kappa0 >= 1 else 2 * kappa0 - kappa0**2
    dev = [abs(sp.mmse(q, kappa0) * q - dof) for q in (1e4, 1e6)]
    assert dev[1] < 2e-4 and dev[1] < dev[0] / 10


def test_cubic_integral_semicircle():
    """For large eta mu_eta is close to a semicircle of variance 1 + eta^2 (around the mean),
    for which ∫ rho^3 = 3 / (4 pi^2 (1 + eta^2)) up to O(1/eta^3) skewness corrections."""
    for kappa0 in (0.5, 2.0):
        eta = 30.0
        c = sp.cubic_integral(eta, kappa0)
        assert c.converged
        assert c.value == pytest.approx(3 / (4 * math.pi**2 * (1 + eta**2)), rel=1e-3)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: sp.J(0.0, 0.1, 1.0), "eta"),
        (lambda: sp.J(-1.0, 0.1, 1.0), "eta"),
        (lambda: sp.J(float("nan"), 0.1, 1.0), "eta"),
        (lambda: sp.J(sp.ETA_MIN / 2, 0.1, 1.0), "eta"),
        (lambda: sp.J(0.3, float("nan"), 1.0), "eps"),
        (lambda: sp.J(0.3, -math.inf, 1.0), "eps"),
        (lambda: sp.J(0.3, 0.1, 0.0), "kappa0"),
        (lambda: sp.J(0.3, 0.1, -2.0), "kappa0"),
        (lambda: sp.J(0.3, 0.1, float("nan")), "kappa0"),
        (lambda: sp.density([0.1], 0.0, 1.0), "eta"),
        (lambda: sp.density([float("nan")], 0.3, 1.0), "x"),
        (lambda: sp.support(0.3, 0.0), "kappa0"),
        (lambda: sp.replicon_integral(0.3, float("nan"), 1.0), "eps"),
        (lambda: sp.cubic_integral(-0.3, 1.0), "eta"),
        (lambda: sp.mmse(0.0, 1.0), "q_hat"),
    ],
)
def test_bad_input(call, name):
    with pytest.raises(ValueError, match=name) as info:
        call()
    assert isinstance(info.value, ParamError)
