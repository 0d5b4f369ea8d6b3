"""Spectral input channel of the pre-training state evolution (Result 4, App. A.3, A.6, B.1).

Objects (paper's eqs. 44, 48, 52-54, 75-76, 87-88; scales of THEORY-NOTES):

* ``mu0``: law of the eigenvalues of ``S*/sqrt(D)``, ``S* = W* W*^T / sqrt(P0)``, ``P0 = kappa0 D``:
  ``sqrt(kappa0)`` times a Marchenko-Pastur law of ratio ``c = 1/kappa0`` (mean 1), i.e. mean
  ``sqrt(kappa0)``, variance 1, second moment ``Q0 = 1 + kappa0``, atom ``1 - kappa0`` at 0 if
  ``kappa0 < 1``.
* ``mu_eta = mu0 ⊞ mu_sc,eta`` (eq. 44), semicircle of radius ``2 eta`` (variance ``t = eta^2``).

Stieltjes transform, convention ``G(z) = ∫ mu(dx) / (z - x)`` (so ``Im G < 0`` for ``Im z > 0``
and the density is ``-Im G(x + i0) / pi``).  With ``r = sqrt(kappa0)``, ``k = kappa0``, the
Marchenko-Pastur transform solves ``z G0^2 - (r z - k + 1) G0 + r = 0`` and the subordination
``G(z) = G0(z - t G(z))`` gives the cubic

    t G^3 - (z + r t) G^2 + (r z - k + 1) G - r = 0.

It is solved for ``H = 1/G`` (leading coefficient ``r``, well conditioned as ``t -> 0``):

    H^3 + c2 H^2 + c1 H + c0 = 0,  c2 = -(z - (k - 1)/r),  c1 = z/r + t,  c0 = -t/r.

On the real axis the support of ``mu_eta`` is where this cubic has a complex-conjugate pair of
roots (cubic discriminant < 0, a quartic in x whose real roots are the edges); the density there
is ``Im H / (pi |H|^2)`` by Cardano's formula in a cancellation-free form.

Integrals use the substitution ``x = m - h cos(theta)`` on each support interval ``[m-h, m+h]``,
which turns the square-root edges into smooth integrands, and composite Gauss-Legendre in
``theta`` on panels graded geometrically toward both edges (and toward a near-cusp where a gap
has just closed), with the number of nodes per panel doubled until two levels agree (that
difference is the reported error estimate).  Measured: moments of mu_eta exact to ~1e-13 over
kappa0 in [0.05, 50], eta in [1e-4, 10]; J1, J2 equal to central finite differences to ~1e-11;
~1 ms per J call.  Exactly at the eta where a gap closes (kappa0 < 1) the density has a cusp
and the accuracy drops to ~1e-10.

``J(eta, eps) = ∫_{eps}^{inf} mu_eta(dx) (x - eps)^2`` (eq. 44), ``J1 = dJ/deta``,
``J2 = dJ/deps = -2 E[(x - eps)_+]`` (eq. 48).  ``J1`` is computed from the free heat flow
(``t = eta^2``, ``d rho/dt = -d/dx (rho Re G)``):

    dJ/dt = 2 ∫ zeta(x) rho(x) Re G(x) dx = ∫∫ (zeta(x) - zeta(y)) / (x - y) mu(dx) mu(dy),
    J1 = 2 eta dJ/dt,  zeta(x) = (x - eps)_+   (eq. 76 with eps = 2 sqrt(kappa) lam / M_hat),

a single smooth integral; the double-integral form is computed independently by
:func:`heat_flow_integral` (2-D graded quadrature) and checked in the tests.

Limits: ``eta`` must be >= ``ETA_MIN = 1e-6`` (measured: moments to ~4e-12 and J within eta^2 of
its Marchenko-Pastur limit down to 1e-7; at 1e-8 the smoothed atom of width ~eta for
kappa0 = 0.1 is no longer resolved to 1e-11; ``eta -> 0`` is ``mu0`` itself, J(eta) - J(0) =
O(eta^2) since dJ/d(eta^2) lies in [0, 1]).
For ``V`` (eq. 53) use ``dJ_dt = J1 / (2 eta)`` which stays finite as ``eta -> 0``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hdlora.params import ParamError, real_number

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "ETA_MIN",
    "SpectralJ",
    "QuadratureResult",
    "AccuracyWarning",
    "density",
    "support",
    "cdf",
    "expectation",
    "J",
    "heat_flow_integral",
    "replicon_integral",
    "cubic_integral",
    "mmse",
]

#: Smallest semicircle scale accepted (documented limit, see module docstring).
ETA_MIN = 1e-6

# Gauss-Legendre rules on [-1, 1] used by the adaptive doubling (constants, read-only).
_LEVELS = (6, 12, 24, 48, 96, 192)  # Gauss nodes per panel, doubled until two levels agree
# panel breakpoints in theta (x = m - h cos(theta)), graded geometrically (ratio 1/4) toward the
# two edges of an interval, where mu_eta has its sharpest features (hard edge of mu0 at
# kappa0 = 1, smoothed atom, nearly closed gap with |x|^(1/3) behaviour above the gap scale)
_GRADING = 0.25 ** np.arange(1, 13)
_EDGE_BREAKS = np.pi * np.concatenate([0.5 * _GRADING[::-1], [0.5], 1 - 0.5 * _GRADING])
_EDGE_BREAKS.setflags(write=False)
_GRADE_LEVELS = 24  # panels halving toward the corner of the 2-D divided-difference integrals
_GL = {}
for _n in _LEVELS + (8, 12):
    _xg, _wg = np.polynomial.legendre.leggauss(_n)
    _xg.setflags(write=False)
    _wg.setflags(write=False)
    _GL[_n] = (_xg, _wg)
del _n, _xg, _wg


class AccuracyWarning(RuntimeWarning):
    """A quadrature did not reach its tolerance; the result carries converged=False."""


@dataclass(frozen=True)
class SpectralJ:
    """J and its derivatives at one (eta, eps) (eqs. 44, 48).

    Attributes:
        J: J(eta, eps) = E_{mu_eta}[(x - eps)_+^2] (eq. 44).
        J1: dJ/deta (eq. 48), = 2 eta dJ_dt.
        J2: dJ/deps = -2 E[(x - eps)_+] (eq. 48).
        dJ_dt: dJ/d(eta^2) = ∫∫ (zeta(x)-zeta(y))/(x-y) mu_eta mu_eta; V = dJ_dt / V_hat (eq. 53).
        abserr: estimated absolute error (max over the four quantities).
        nodes: quadrature nodes per support interval at the last level.
        converged: abserr <= atol + rtol * scale was reached.
    """

    J: float
    J1: float
    J2: float
    dJ_dt: float
    abserr: float
    nodes: int
    converged: bool


@dataclass(frozen=True)
class QuadratureResult:
    """A scalar spectral integral with its error estimate; ``float(result)`` gives the value."""

    value: float
    abserr: float
    nodes: int
    converged: bool

    def __float__(self) -> float:
        return float(self.value)


# ----------------------------------------------------------------------------- validation
def _number(name: str, value: object, *, allow_pos_inf: bool = False) -> float:
    x = real_number(name, value)
    if math.isinf(x) and not (allow_pos_inf and x > 0):
        raise ParamError(f"{name} must be finite{' or +inf' if allow_pos_inf else ''}, got {x}")
    return x


def _check_eta_kappa0(eta: object, kappa0: object) -> tuple[float, float]:
    eta = _number("eta", eta)
    kappa0 = _number("kappa0", kappa0)
    if not eta >= ETA_MIN:
        raise ParamError(f"eta must be >= ETA_MIN = {ETA_MIN:g} (semicircle radius 2 eta > 0), got {eta}")
    if not kappa0 > 0:
        raise ParamError(f"kappa0 must be > 0 (P0 = kappa0 D), got {kappa0}")
    return eta, kappa0


# ----------------------------------------------------------------------------- the cubic
def _coeffs(x: np.ndarray, t: float, k: float):
    """Monic cubic in H = 1/G: H^3 + c2 H^2 + c1 H + c0 (see module docstring)."""
    r = math.sqrt(k)
    c2 = -(x - (k - 1.0) / r)
    c1 = x / r + t
    c0 = -t / r
    return c2, c1, c0


def _discriminant(t: float, k: float) -> np.ndarray:
    """Discriminant of the cubic in H as a quartic in x (coefficients, highest degree first).

    Disc = 18 c2 c1 c0 - 4 c2^3 c0 + c2^2 c1^2 - 4 c1^3 - 27 c0^2; the support is where it is < 0.
    """
    r = math.sqrt(k)
    c2 = np.array([(k - 1.0) / r, -1.0])  # lowest degree first
    c1 = np.array([t, 1.0 / r])
    c0 = -t / r
    conv = np.convolve
    c2c1 = conv(c2, c1)
    out = np.zeros(5)
    out[:3] += 18 * c0 * c2c1
    out[:4] += -4 * c0 * conv(conv(c2, c2), c2)
    out[:5] += conv(c2c1, c2c1)
    out[:4] += -4 * conv(conv(c1, c1), c1)
    out[0] += -27 * c0 * c0
    return out[::-1].copy()


def _polyval(coef: np.ndarray, z: np.ndarray):
    """Horner evaluation, coefficients highest degree first."""
    acc = coef[0] * np.ones_like(z)
    for c in coef[1:]:
        acc = acc * z + c
    return acc


def _polish(coef: np.ndarray, z: np.ndarray, steps: int = 4) -> np.ndarray:
    dcoef = coef[:-1] * np.arange(len(coef) - 1, 0, -1)
    for _ in range(steps):
        d = _polyval(dcoef, z)
        ok = d != 0
        z = np.where(ok, z - _polyval(coef, z) / np.where(ok, d, 1.0), z)
    return z


def _edges(t: float, k: float):
    """(intervals, quartic roots, leading coefficient, near-cusps) of the support of mu_eta, t = eta^2."""
    disc = _discriminant(t, k)
    roots = _polish(disc, np.roots(disc).astype(complex))
    scale = 1.0 + np.abs(roots)
    real = np.sort(roots[np.abs(roots.imag) <= 1e-9 * scale].real)
    # intervals between consecutive real roots where the discriminant is negative
    intervals: list[tuple[float, float]] = []
    for a, b in zip(real[:-1], real[1:]):
        if b > a and _polyval(disc, 0.5 * (a + b)) < 0:
            if intervals and abs(intervals[-1][1] - a) <= 1e-12 * (1 + abs(a)):
                intervals[-1] = (intervals[-1][0], float(b))  # double root inside the support
            else:
                intervals.append((float(a), float(b)))
    # near-cusps: a complex pair of edges close to the real axis inside an interval (a gap that
    # has just closed): the density has a sharp minimum there, |x - c|^(1/3) above scale |Im|
    cusps = []
    for z in roots:
        for a, b in intervals:
            if z.imag > 0 and a < z.real < b and z.imag < 0.05 * (b - a):
                cusps.append(float(z.real))
    return intervals, roots, disc[0], tuple(cusps)


def _roots_on_support(x: np.ndarray, t: float, k: float, roots: np.ndarray, lead: float):
    """(Re G, rho) at real x inside the support, from the complex root pair of the cubic.

    Cardano with y = H + c2/3: y^3 + p y + q = 0, Dc = (q/2)^2 + (p/3)^3 > 0 on the support
    (Disc = -108 Dc).  Dc is taken from the factored quartic (relative accuracy near the edges).
    Complex pair: y = -(u + v)/2 ± i sqrt(3) sqrt(Dc) / (u^2 + u v + v^2), u v = -p/3.
    """
    c2, c1, c0 = _coeffs(x, t, k)
    p = c1 - c2 * c2 / 3.0
    q = 2.0 * c2**3 / 27.0 - c2 * c1 / 3.0 + c0
    dc = -(lead / 108.0) * np.prod(x[..., None] - roots, axis=-1).real
    dc = np.maximum(dc, 0.0)
    sq = np.sqrt(dc)
    sgn = np.where(q >= 0, 1.0, -1.0)
    u = np.cbrt(-0.5 * q - sgn * sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(u != 0, -p / (3.0 * np.where(u != 0, u, 1.0)), 0.0)
    den = u * u + u * v + v * v
    with np.errstate(divide="ignore", invalid="ignore"):
        im_y = np.where(den > 0, math.sqrt(3.0) * sq / np.where(den > 0, den, 1.0), 0.0)
    re_h = -0.5 * (u + v) - c2 / 3.0
    mod2 = re_h * re_h + im_y * im_y
    re_g = re_h / mod2
    rho = im_y / (math.pi * mod2)
    return re_g, rho


# ----------------------------------------------------------------------------- quadrature
def _theta(m: float, h: float, x: float) -> float:
    """theta in [0, pi] with m - h cos(theta) = x (clipped)."""
    return math.acos(min(1.0, max(-1.0, (m - x) / h)))


def _rule(
    intervals: list[tuple[float, float]],
    lower: float,
    upper: float,
    n: int,
    grade: str = "",
    panel: int = 0,
    panels: int = 16,
    cusps: tuple[float, ...] = (),
):
    """Nodes x, weights w (Jacobian h sin(theta) included) and distances on support ∩ (lower, upper).

    Plain Gauss-Legendre with n nodes in theta on each interval.  With grade="lower" (or
    "upper"): composite Gauss (``panel`` nodes per panel) on panels halving geometrically toward
    the lower (upper) end, for integrands with a corner singularity there; the third output is
    then the distance x - lower (upper - x), computed without cancellation.
    """
    xs, ws, ds = [], [], []
    for a, b in intervals:
        lo, hi = max(a, lower), min(b, upper)
        if not hi > lo:
            continue
        m, h = 0.5 * (a + b), 0.5 * (b - a)
        th0, th1 = _theta(m, h, lo), _theta(m, h, hi)
        if not th1 > th0:
            continue
        if grade:
            # `panels` equal panels, the one at the corner end refined geometrically
            frac = np.concatenate([0.5 ** np.arange(_GRADE_LEVELS, 0, -1), np.arange(1, panels + 1)]) / panels
            if grade == "lower":
                br = np.concatenate([[th0], th0 + (th1 - th0) * frac])
            else:
                br = np.concatenate([[th1], th1 - (th1 - th0) * frac])
            g, gw = _GL[panel]
            mid = 0.5 * (br[1:] + br[:-1])[:, None]
            half_w = 0.5 * np.abs(br[1:] - br[:-1])[:, None]
            th = (mid + half_w * g).ravel()
            wt = (half_w * gw).ravel()
        else:
            # composite Gauss, n nodes per panel, panels graded toward both edges of the interval
            br = _EDGE_BREAKS
            for c in cusps:
                if a < c < b:
                    thc = _theta(m, h, c)
                    gap = min(thc, np.pi - thc)
                    br = np.concatenate([br, [thc], thc - gap * _GRADING, thc + gap * _GRADING])
            br = np.sort(br)
            br = br[(br > th0) & (br < th1)]
            br = np.concatenate([[th0], br, [th1]])
            g, gw = _GL[n]
            mid = 0.5 * (br[1:] + br[:-1])[:, None]
            half_w = 0.5 * (br[1:] - br[:-1])[:, None]
            th = (mid + half_w * g).ravel()
            wt = (half_w * gw).ravel()
        xs.append(m - h * np.cos(th))
        ws.append(wt * h * np.sin(th))
        if grade == "lower":  # x - lower = (lo - lower) + h (cos th0 - cos th)
            ds.append((lo - lower) + 2 * h * np.sin(0.5 * (th + th0)) * np.sin(0.5 * (th - th0)))
        elif grade == "upper":  # upper - x = (upper - hi) + h (cos th - cos th1)
            ds.append((upper - hi) + 2 * h * np.sin(0.5 * (th1 + th)) * np.sin(0.5 * (th1 - th)))
    if not xs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ws), (np.concatenate(ds) if ds else None)


def _measure(
    intervals: list[tuple[float, float]],
    lower: float,
    upper: float,
    n: int,
    t: float,
    k: float,
    roots: np.ndarray,
    lead: float,
    cusps: tuple[float, ...] = (),
    **grading: Any,
):
    """Nodes x, weights w*rho(x) (so sum(f(x) w) = ∫ f dmu), and Re G(x)."""
    x, w, d = _rule(intervals, lower, upper, n, cusps=cusps, **grading)
    if x.size == 0:
        return x, w, w, d
    re_g, rho = _roots_on_support(x, t, k, roots, lead)
    return x, w * rho, re_g, d


def _adaptive(compute: Callable[[int], np.ndarray], rtol: float, atol: float, scale: float | None = None):
    """Doubling of the node count until two consecutive levels agree."""
    prev = compute(_LEVELS[0])
    for n in _LEVELS[1:]:
        cur = compute(n)
        err = float(np.max(np.abs(cur - prev)))
        s = float(np.max(np.abs(cur))) if scale is None else scale
        if err <= atol + rtol * s:
            return cur, err, n, True
        prev = cur
    return cur, err, n, False


# ----------------------------------------------------------------------------- public API
def support(eta: float, kappa0: float) -> list[tuple[float, float]]:
    """Support of mu_eta = mu0 ⊞ mu_sc,eta as a sorted list of intervals (lo, hi).

    One interval, or two for kappa0 < 1 and eta small (smoothed atom at 0 + bulk).
    """
    eta, kappa0 = _check_eta_kappa0(eta, kappa0)
    return _edges(eta * eta, kappa0)[0]


def _x_array(x: ArrayLike) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if np.isnan(arr).any():
        raise ParamError("x must not contain NaN")
    return arr


def density(x: ArrayLike, eta: float, kappa0: float) -> np.ndarray:
    """Density of mu_eta = mu0 ⊞ mu_sc,eta at real x (eq. 44); 0 outside the support."""
    eta, kappa0 = _check_eta_kappa0(eta, kappa0)
    xa = _x_array(x)
    t = eta * eta
    intervals, roots, lead, cusps = _edges(t, kappa0)
    flat = xa.ravel()
    rho = np.zeros(flat.shape)
    inside = np.zeros(flat.shape, bool)
    for a, b in intervals:
        inside |= (flat > a) & (flat < b)
    if inside.any():
        rho[inside] = _roots_on_support(flat[inside], t, kappa0, roots, lead)[1]
    return rho.reshape(xa.shape)


def expectation(
    f: Callable[[np.ndarray], np.ndarray],
    eta: float,
    kappa0: float,
    lower: float = -math.inf,
    upper: float = math.inf,
    *,
    rtol: float = 1e-12,
    atol: float = 1e-14,
) -> QuadratureResult:
    """E_{mu_eta}[f(x) 1{lower < x < upper}] for f smooth on (lower, upper) (vectorised f)."""
    eta, kappa0 = _check_eta_kappa0(eta, kappa0)
    t = eta * eta
    intervals, roots, lead, cusps = _edges(t, kappa0)

    def compute(n: int):
        x, w, _, _ = _measure(intervals, float(lower), float(upper), n, t, kappa0, roots, lead, cusps)
        return np.array([np.sum(w * f(x)) if x.size else 0.0])

    val, err, n, ok = _adaptive(compute, rtol, atol)
    return QuadratureResult(float(val[0]), err, n, ok)


def cdf(x: ArrayLike, eta: float, kappa0: float) -> np.ndarray:
    """mu_eta((-inf, x]) for real x (array)."""
    xa = _x_array(x)
    out = np.array([expectation(np.ones_like, eta, kappa0, upper=float(v)).value for v in xa.ravel()])
    return out.reshape(xa.shape)


def _J_scalar(eta: float, eps: float, kappa0: float, rtol: float, atol: float) -> SpectralJ:
    t = eta * eta
    r = math.sqrt(kappa0)
    intervals, roots, lead, cusps = _edges(t, kappa0)
    if eps >= intervals[-1][1]:
        return SpectralJ(0.0, 0.0, 0.0, 0.0, 0.0, 0, True)
    if eps <= intervals[0][0]:
        # whole support: E[(x - eps)^2] = Var + (mean - eps)^2 = 1 + t + (r - eps)^2; dJ/dt = 1
        return SpectralJ(1.0 + t + (r - eps) ** 2, 2.0 * eta, -2.0 * (r - eps), 1.0, 0.0, 0, True)

    def compute(n: int):
        x, w, re_g, _ = _measure(intervals, eps, math.inf, n, t, kappa0, roots, lead, cusps)
        z = x - eps
        wz = w * z
        return np.array([np.sum(wz * z), np.sum(wz), np.sum(wz * re_g)])

    scale = 1.0 + t + (r - eps) ** 2  # J over the whole support: natural scale of J, J1
    (j, e1, hz), err, n, ok = _adaptive(compute, rtol, atol, scale=scale)
    dj_dt = 2.0 * hz
    err = max(err, 2.0 * err)
    if not ok:
        warnings.warn(
            f"spectral J(eta={eta}, eps={eps}, kappa0={kappa0}) did not reach rtol={rtol} (abserr {err:.2e})",
            AccuracyWarning,
            stacklevel=3,
        )
    return SpectralJ(float(j), float(2.0 * eta * dj_dt), float(-2.0 * e1), float(dj_dt), err, n, ok)


def J(eta: ArrayLike, eps: ArrayLike, kappa0: ArrayLike, *, rtol: float = 1e-11, atol: float = 1e-15) -> SpectralJ:
    """J(eta, eps) (eq. 44) with J1 = dJ/deta and J2 = dJ/deps (eq. 48).

    eta = sqrt(Q_hat)/M_hat >= ETA_MIN, eps = 2 sqrt(kappa) lam / M_hat (any real, or +inf),
    kappa0 > 0.  Scalars give a SpectralJ of floats; arrays (broadcast) give arrays in each field.
    Beyond the right edge J = J1 = J2 = 0; left of the support the closed form
    J = 1 + eta^2 + (sqrt(kappa0) - eps)^2 is used.  With eps = 2 sqrt(kappa) lam/M_hat and
    eta = sqrt(Q_hat)/M_hat the state evolution reads (eqs. 52-54)
    Q = (M_hat/V_hat)^2 J, V = J1 / (2 V_hat eta) = dJ_dt / V_hat,
    M = M_hat/(2 V_hat) (2 J - eta J1 - eps J2).
    """
    if np.ndim(eta) == 0 and np.ndim(eps) == 0 and np.ndim(kappa0) == 0:
        eta_, kappa0_ = _check_eta_kappa0(eta, kappa0)
        eps_ = _number("eps", eps, allow_pos_inf=True)
        return _J_scalar(eta_, eps_, kappa0_, rtol, atol)
    b = np.broadcast_arrays(np.asarray(eta, float), np.asarray(eps, float), np.asarray(kappa0, float))
    res = [
        J(float(a), float(e), float(k), rtol=rtol, atol=atol)
        for a, e, k in zip(b[0].ravel(), b[1].ravel(), b[2].ravel())
    ]
    shape = b[0].shape

    def field(name: str, dtype: type = float):
        return np.array([getattr(s, name) for s in res], dtype=dtype).reshape(shape)

    return SpectralJ(
        field("J"),
        field("J1"),
        field("J2"),
        field("dJ_dt"),
        field("abserr"),
        field("nodes", int),
        field("converged", bool),
    )


def _divided_difference_integral(eta: float, eps: float, kappa0: float, power: int, panel: int, panels: int):
    """∫∫ ((zeta(x) - zeta(y)) / (x - y))^power mu_eta(dx) mu_eta(dy), zeta = (x - eps)_+.

    = P(x > eps)^2 + 2 ∫_{x>eps} ∫_{y<eps} ((x - eps)/(x - y))^power: the mixed block has a
    bounded corner singularity at x = y = eps, handled by panels graded toward eps.
    """
    t = eta * eta
    intervals, roots, lead, cusps = _edges(t, kappa0)
    if eps >= intervals[-1][1]:
        return 0.0
    if eps <= intervals[0][0]:
        return 1.0
    _, wr, _, sr = _measure(
        intervals, eps, math.inf, 0, t, kappa0, roots, lead, grade="lower", panel=panel, panels=panels
    )
    _, wl, _, ul = _measure(
        intervals, -math.inf, eps, 0, t, kappa0, roots, lead, grade="upper", panel=panel, panels=panels
    )
    p_right = float(np.sum(wr))
    if wl.size == 0:
        return p_right**2
    s = sr[:, None]
    ratio = s / (s + ul[None, :])  # (x - eps)/(x - y) in [0, 1], x > eps > y
    mixed = float(wr @ (ratio**power) @ wl)
    return p_right**2 + 2.0 * mixed


def _dd_result(eta: float, eps: float, kappa0: float, power: int, rtol: float = 1e-9) -> QuadratureResult:
    eta, kappa0 = _check_eta_kappa0(eta, kappa0)
    eps = _number("eps", eps, allow_pos_inf=True)
    for panels in (16, 64):
        a = _divided_difference_integral(eta, eps, kappa0, power, 8, panels)
        b = _divided_difference_integral(eta, eps, kappa0, power, 12, panels)
        err = abs(a - b)
        ok = err <= rtol * max(abs(b), 1e-3)
        if ok:
            break
    if not ok:
        warnings.warn(
            f"divided-difference integral (eta={eta}, eps={eps}, kappa0={kappa0}) abserr {err:.2e}",
            AccuracyWarning,
            stacklevel=3,
        )
    return QuadratureResult(b, err, 12 * panels, ok)


def heat_flow_integral(eta: float, eps: float, kappa0: float) -> QuadratureResult:
    """∫∫ (zeta(x) - zeta(y))/(x - y) mu_eta(dx) mu_eta(dy) = dJ/d(eta^2), by 2-D quadrature.

    Independent of :func:`J` (which uses the 1-D heat-flow form); J1 = 2 eta * this.
    """
    return _dd_result(eta, eps, kappa0, 1)


def replicon_integral(eta: float, eps: float, kappa0: float) -> QuadratureResult:
    """∫∫ (zeta(x) - zeta(y))^2 / (x - y)^2 mu_eta(dx) mu_eta(dy), zeta(x) = (x - eps)_+.

    The spectral factor of the pre-training replicon condition (eq. 75, without 1/V_hat^2;
    eq. 76: eta = Q_hat^{1/2}/M_hat, eps = 2 sqrt(kappa) lam / M_hat).
    """
    return _dd_result(eta, eps, kappa0, 2)


def cubic_integral(eta: float, kappa0: float, *, rtol: float = 1e-10, atol: float = 1e-15) -> QuadratureResult:
    """∫ mu_eta(x)^3 dx, for the Bayes-optimal input channel (eq. 87, eta = Q_hat_BO^{-1/2}).

    mu_eta is the limiting spectral density of Y = S*/sqrt(D) + eta Z/sqrt(D) (eq. 88).
    """
    eta, kappa0 = _check_eta_kappa0(eta, kappa0)
    t = eta * eta
    intervals, roots, lead, cusps = _edges(t, kappa0)

    def compute(n: int):
        x, w, _, _ = _measure(intervals, -math.inf, math.inf, n, t, kappa0, roots, lead, cusps)
        rho = _roots_on_support(x, t, kappa0, roots, lead)[1]
        return np.array([np.sum(w * rho * rho)])

    val, err, n, ok = _adaptive(compute, rtol, atol)
    if not ok:
        warnings.warn(f"cubic_integral(eta={eta}, kappa0={kappa0}) abserr {err:.2e}", AccuracyWarning, stacklevel=2)
    return QuadratureResult(float(val[0]), err, n, ok)


def mmse(q_hat: float, kappa0: float) -> float:
    """Matrix-denoising MMSE 1/Q_hat - 4 pi^2/(3 Q_hat^2) ∫ mu_{eta}^3, eta = Q_hat^{-1/2}.

    Q_BO = Q0 - mmse (eq. 87).  Tends to Var(mu0) = 1 as Q_hat -> 0 and to 0 as Q_hat -> inf.
    The formula has one home, :func:`hdlora.theory.bayes.matrix_denoising_mmse`; this entry
    point checks q_hat > 0.
    """
    from .bayes import matrix_denoising_mmse

    q_hat = _number("q_hat", q_hat)
    if not q_hat > 0:
        raise ParamError(f"q_hat must be > 0, got {q_hat}")
    return matrix_denoising_mmse(q_hat, kappa0)
