"""Pre-training state evolution (Result 4; App. A.3, eqs. 41-55).

State (Q, M, V), conjugates (M_hat, Q_hat, V_hat).  One update of the map is

1. output channel (eqs. 46-51): with A0 = Q0 + Delta/2, B = Q - M^2/A0, s_ab = 1 + delta_ab,
   z*_ab = sqrt(s_ab A0) g_ab, z~_ab = sqrt(s_ab) (M/sqrt(A0) g_ab + sqrt(B) zeta_ab) (eq. 47),
   h = Prox(z*, z~) (eq. 41) and f_ab = (h_ab - z~_ab)/sqrt(s_ab):

       M_hat = (2 alpha / V) E sum_ab f_ab (g_ab/sqrt(A0) - M zeta_ab/(A0 sqrt(B)))    (49)
       Q_hat = (2 alpha / V^2) E sum_ab f_ab^2                                          (50)
       V_hat = -(2 alpha / (V sqrt(B))) E sum_ab f_ab zeta_ab                           (51)

   The zeta-weighted averages are evaluated with Stein's lemma,
   E[f_ab zeta_ab] / sqrt(B) = E[d Prox_ab / d z~_ab - 1], which is exact in expectation,
   has a lower Monte-Carlo variance and stays finite as B -> 0 (the paper's "limit B -> 0").
   The literal estimators of (49), (51) are available (``stein=False``) and tested equal
   within sampling error.

2. spectral input channel (eqs. 48, 52-54): eta = sqrt(Q_hat)/M_hat, eps = 2 sqrt(kappa) lam / M_hat,

       Q = (M_hat/V_hat)^2 J,   V = J1 / (2 V_hat eta),   M = M_hat/(2 V_hat) (2J - eta J1 - eps J2).

These are the stationarity conditions of the free entropy eq. 21/45 (re-derived by
differentiation: d/dV_hat, d/dQ_hat, d/dM_hat give 52-54; d/dQ, d/dM, d/dV of the
output term with the parametrisation (47) give 51, 49, 50).

Expectations use fixed samples (common random numbers / QMC) drawn once per solve,
so the map is deterministic; the iteration is run by the one engine
:func:`hdlora.theory.fixed_point.iterate`.  For the linear activation every
expectation of the output channel and of the errors is Gaussian and is evaluated
in closed form (``method='exact'``): with c = 4V/(T^2 + 4V), L = T(T+1)/2 and
Delta_eff = A0 - 2M + Q (eq. 25),

    M_hat = V_hat = 2 alpha L c / V,   Q_hat = 2 alpha L c^2 Delta_eff / V^2,
    E (test, eq. 55) = (T+1)/T Delta_eff,   L (train, eq. 20) = (T+1)/T Delta_eff (1 - c)^2.

lam = inf gives W_hat = 0: Q = M = V = 0 (App. A.7).

Small lam.  Below the interpolation threshold V grows like 1/lam (V_hat ~ M_hat ~ lam, Q_hat ~ lam^2;
eta and eps stay finite).  V is iterated in units of LAM_V_SCALE / lam, the softmax prox removes its
shift along 11^T analytically (:mod:`hdlora.theory.prox`), and a cold solve at lam < LAM_V_SCALE starts
from the lam = 0+ fixed point when there is one.  lam = 0 means lam -> 0+: while the data are
interpolated, the min-norm interpolator (:func:`output_channel_interpolating`: the prox is the projection
of z~ onto {sigma(h) = sigma(z*)}, the conjugates rescaled, V = inf, lam V finite); beyond the threshold
(lam V -> 0) V stays finite and lam = 0 is solved as it stands.

Basins.  Between verifications each sample follows its prox maximum (warm start: a continuous map);
at a fixed point a global search (from z*; for T = 2 at V > 1 also from the entrywise mixes of z~ and
z*) moves samples that have a better maximum, and the map is solved again (at most MAX_BASIN_ROUNDS
times).  Samples that then prefer their old maximum again
have two near-equal maxima: the sampled map jumps between them and has no exact fixed point; the result
is "converged to Monte-Carlo resolution" when moving them changes every conjugate by less than its
Monte-Carlo standard error (``mc_jump`` < 1), else not converged.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..activations import get as get_activation
from ..params import DEFAULT_N_MC, ParamError, Params, check_tol
from . import engine as _engine
from . import spectral
from .effective import delta_eff_of_A0
from .engine import CONVERGED, CONVERGED_MC, NOT_CONVERGED
from .fixed_point import NonConvergenceWarning, iterate
from .order_parameters import PretrainOrderParameters
from .prox import ProxResult, pretrain_potential, prox, prox_interpolating, prox_linear, target_rows
from .sampling import METHODS, frozen_fields, s_ab, student_fields, teacher_fields, to_sym
from .stability import replicon_pretrain, replicon_tail_share

__all__ = [
    "PretrainResult",
    "solve_pretrain",
    "train_fields",
    "fields_test_law",
    "output_channel",
    "output_channel_exact",
    "output_channel_interpolating",
    "input_channel",
    "errors_exact",
    "A0_of",
]

#: methods for the Gaussian expectations: Monte Carlo, quasi-Monte Carlo, closed form (linear only)
PRETRAIN_METHODS = METHODS + ("exact",)
#: below this lam, V is iterated in units of LAM_V_SCALE / lam (V ~ 1/lam when the data are interpolated),
#: so that Q, M and the iterated V stay O(1) for the fixed-point engine; above it, V itself
LAM_V_SCALE = 1e-2
#: lam = 0+: a fixed point with lam V below this is the face v = 0 (no interpolation), refused
LAMV_MIN = 1e-6
#: a final global search that finds better maxima moves those samples and re-solves, at most this often
MAX_BASIN_ROUNDS = 4
#: candidates whose tight evaluation misses tol (the iteration's prox is looser) sent back to the iteration, at most
MAX_TIGHT_ROUNDS = 3


def _residual_of(spec: Mapping[str, float], Q: float, M: float, V: float) -> float:
    """The reported residual of the pre-training map at (Q, M, V) (V unscaled): the engine's relative residual."""
    return _engine.residual(np.array([spec["Q"], spec["M"], spec["V"]]), np.array([Q, M, V]))


def _measured_residual(params: Params, hats: Mapping[str, float], x: np.ndarray, v_scale: float) -> float:
    """:func:`_residual_of` at the iterate x = (Q, M, V / v_scale) from the conjugates ``hats`` (nan off the domain)."""
    try:
        spec, _ = input_channel(params.kappa0, params.kappa, params.lam, hats["Mhat"], hats["Qhat"], hats["Vhat"])
    except FloatingPointError:
        return math.nan
    return _residual_of(spec, float(x[0]), float(x[1]), float(x[2]) * v_scale)


def _v_scale(lam: float) -> float:
    """The unit in which V is iterated: max(1, LAM_V_SCALE / lam) (1 at lam = 0: V finite there)."""
    return max(1.0, LAM_V_SCALE / lam) if lam > 0 else 1.0


def _global_search(
    z_star: np.ndarray,
    z_tilde: np.ndarray,
    V: float,
    activation: str,
    *,
    ref: np.ndarray | None,
    target: np.ndarray | None,
) -> ProxResult:
    """The verification's prox: the maximum reached from z* (an interpolating point) and, for T = 2 (L = 3)
    at V > 1, the best over every entrywise mix of z~ and z* (2^L starts; h = z~, the start of the first
    iteration, found nothing beyond the followed maxima at lam = 1e-3).  Measured (3e4 samples, T = 2): at
    alpha = 0.301575, V = 14 (lam = 1e-3) and 17.5 (lam = 1e-5) the mixes find a better maximum than z~
    and z* on 1 and 2 samples, and 40 random starts none beyond them (lam = 1e-3); at V = 0.28 (Fig. 3,
    alpha = 0.2, lam = 0.3) the z~ and z* starts agree on every sample and the mixes find nothing (there
    they would cost half of the pre-training solve).  For T = 3 the 64 mixes cost ~7 s and found nothing at
    the Fig. 1 point (V = 1.7): z~ and z* only.

    ``target``: :func:`hdlora.theory.prox.target_rows` of z*, when the caller has them (else None).

    ``ref`` (n, L): the maxima h already found (the tight evaluation), or None (no merging).  Where the mixes are not
    tried, the start from z* stops (merged, its value -inf: not better) once it is on its way to ``ref``
    (:func:`hdlora.theory.newton.minimise`, radius 1e-2 as the fine-tuning's search): at the Fig. 1 point
    1.44e5 -> 1.06e5 Newton steps (3e4 samples), the samples with a better maximum and the numbers unchanged bit for bit
    (benchmarks/compare_theory.py, docs/benchmarks/compare_theory_speed2.json).
    """
    L = z_star.shape[1]
    mixes = activation == "softmax" and L <= 3 and V > 1.0

    def from_start(init: np.ndarray, merge_ref: np.ndarray | None = None) -> ProxResult:
        """The prox from the start ``init`` (h, (n, L)), tight (no second start: ``init`` is given)."""
        return prox(
            z_star, z_tilde, V, activation, init=init, tol=1e-11, full=False, merge_ref=merge_ref, target=target
        )

    best = from_start(z_star, None if mixes else ref)
    if not mixes:
        return best
    for k in range(0, 2**L - 1):  # 2^L - 1 (z*) is done
        mask = np.array([(k >> i) & 1 for i in range(L)], dtype=bool)
        r = from_start(np.where(mask, z_star, z_tilde))
        b = r.converged & (r.value > best.value + 1e-13 * np.abs(best.value))
        for arr, new in (
            (best.x, r.x),
            (best.value, r.value),
            (best.residual, r.residual),
            (best.converged, r.converged),
            (best.delta, r.delta),
            (best.jacobian_diag, r.jacobian_diag),
        ):
            arr[b] = new[b]
    return best


def _switch_jump(
    px: ProxResult, alt: ProxResult, which: np.ndarray, g: np.ndarray, A0: float, M: float, T: int
) -> float:
    """Largest change of M_hat, Q_hat, V_hat (eqs. 49-51) when the samples ``which`` take the maximum of
    ``alt`` instead of that of ``px``, in units of each conjugate's Monte-Carlo standard error."""
    rs = np.sqrt(s_ab(T).astype(float))

    def terms(delta: np.ndarray, jac: np.ndarray) -> np.ndarray:
        f = delta / rs
        z = np.sum(jac - 1.0, axis=1)
        return np.stack([np.sum(f * g, axis=1) / math.sqrt(A0) - M / A0 * z, np.sum(f * f, axis=1), z])

    a = terms(px.delta, px.jacobian_diag)
    b = terms(alt.delta, alt.jacobian_diag)
    n = a.shape[1]
    jump = np.abs(np.sum((b - a)[:, which], axis=1)) / n
    se = np.std(a, axis=1) / math.sqrt(n)
    return float(np.max(jump / np.maximum(se, 1e-300)))


def A0_of(params: Params) -> float:
    """A0 = Q0 + Delta/2 (eq. 46), the per-entry variance scale of z*."""
    return params.A0


@dataclass(frozen=True)
class PretrainResult(PretrainOrderParameters):
    """Fixed point of the pre-training state evolution (Result 4) and Result 3 errors.

    Attributes:
        Q, M, V: order parameters (eq. 8; V the inverse curvature).
        Mhat, Qhat, Vhat: conjugate parameters (eqs. 49-51).
        eta, eps: spectral-channel arguments sqrt(Q_hat)/M_hat, 2 sqrt(kappa) lam / M_hat (eq. 48).
        pretrain_train_error: E_R ||sigma(z) - sigma(z*)||_F^2 (eq. 20), noise included.
        pretrain_test_error: E_Q ||sigma(z) - sigma(z*)||_F^2 (eqs. 19, 55), noise included.
        replicon_pretrain: left-hand side of eq. 75 (with the 1/V^2 factor, see
            :mod:`hdlora.theory.stability`); replicon_stable = value < 1.
        converged, residual, iterations: from the fixed-point engine (and the prox:
            converged is False when prox samples failed at the fixed point).
        prox_failures: number of Monte-Carlo samples whose prox did not converge at the end.
        status: ``'converged'``, ``'converged to Monte-Carlo resolution'`` (n_not_global samples are
            left at a maximum that is not their global one, because they have two near-equal maxima and
            the sampled map jumps between them; moving them changes each conjugate by mc_jump < 1 of its
            Monte-Carlo standard error) or ``'not converged'`` (see :mod:`hdlora.theory.engine`).
            converged is True for the first two.  Replica stability is ``replicon_stable``.
        n_not_global: samples whose prox is not the best maximum the final global search found.
        mc_jump: the largest change of M_hat, Q_hat, V_hat when those samples are moved, in units of
            the Monte-Carlo standard error of that conjugate (0 when n_not_global = 0).
        lamV: lam V, finite as lam -> 0+ in the interpolation regime (V ~ 1/lam); at lam = 0 (the
            lam -> 0+ limit, the min-norm interpolator) V = inf, the conjugates are 0 and lamV is the limit.
        scaled_hats: (M_hat / lam, Q_hat / lam^2, V_hat / lam), the conjugates in the units in which they stay
            finite as lam -> 0+ (at lam = 0 their limits).
        replicon_upper: replicon_pretrain with its sample term at mean + 2 s.e. (eq. 75 is linear in it).
        replicon_tail: share of the ten largest per-sample replicon terms in their sum
            (:func:`hdlora.theory.stability.replicon_tail_share`).
        n_mc, method, seed: the expectation rule (n_mc = 0 for method 'exact').
        wall_time: seconds.
    """

    eta: float
    eps: float
    pretrain_train_error: float
    pretrain_test_error: float
    replicon_pretrain: float
    replicon_stable: bool
    converged: bool
    residual: float
    iterations: int
    prox_failures: int
    n_mc: int
    method: str
    seed: int
    wall_time: float
    status: str = CONVERGED
    n_not_global: int = 0
    mc_jump: float = 0.0
    lamV: float = math.nan
    scaled_hats: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    replicon_upper: float = math.nan
    replicon_tail: float = math.nan

    @property
    def state(self) -> dict[str, float]:
        return {"Q": self.Q, "M": self.M, "V": self.V}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------- channels
def output_channel(
    alpha: float,
    A0: float,
    Q: float,
    M: float,
    V: float,
    g: np.ndarray,
    zeta: np.ndarray,
    activation: str,
    *,
    prox_init: np.ndarray | None = None,
    prox_tol: float = 1e-10,
    stein: bool = True,
    full: bool = True,
    multi_start: bool | None = None,
    target: np.ndarray | None = None,
) -> tuple[dict[str, float], ProxResult, np.ndarray, np.ndarray]:
    """Monte-Carlo output channel, eqs. 47 and 49-51, on fixed standard normals g, zeta (n, L).

    ``target``: :func:`hdlora.theory.prox.target_rows` of z* = :func:`hdlora.theory.sampling.teacher_fields` (g, T,
    A0), when the caller has them (they depend on A0 and g only, fixed along a state evolution).

    Returns (hats, prox result, z*, z~).
    """
    T = int(round((math.sqrt(8 * g.shape[1] + 1) - 1) / 2))
    rs = np.sqrt(s_ab(T).astype(float))
    B = max(Q - M * M / A0, 0.0)
    z_star = teacher_fields(g, T, A0)  # eq. 47
    z_tilde = student_fields(g, zeta, T, A0, M, B)
    px = prox(
        z_star, z_tilde, V, activation, init=prox_init, tol=prox_tol, full=full, multi_start=multi_start, target=target
    )
    f = px.delta / rs
    Qhat = 2.0 * alpha / V**2 * float(np.mean(np.sum(f * f, axis=1)))  # eq. 50
    fg = float(np.mean(np.sum(f * g, axis=1))) / math.sqrt(A0)
    if stein:
        # E[f zeta]/sqrt(B) = E[dProx/dz~ - 1] (Stein's lemma, exact in expectation)
        fz_over_sqrtB = float(np.mean(np.sum(px.jacobian_diag - 1.0, axis=1)))
    else:
        if B <= 0:
            raise ValueError("literal estimators of eqs. 49, 51 need B = Q - M^2/A0 > 0; use stein=True")
        fz_over_sqrtB = float(np.mean(np.sum(f * zeta, axis=1))) / math.sqrt(B)
    Mhat = 2.0 * alpha / V * (fg - M / A0 * fz_over_sqrtB)  # eq. 49
    Vhat = -2.0 * alpha / V * fz_over_sqrtB  # eq. 51
    return {"Mhat": Mhat, "Qhat": Qhat, "Vhat": Vhat}, px, z_star, z_tilde


def output_channel_exact(alpha: float, A0: float, T: int, Q: float, M: float, V: float) -> dict[str, float]:
    """Closed-form output channel for sigma(x) = x/T (eqs. 49-51 with the prox of eq. 106).

    h - z~ = c (z* - z~), c = 4V/(T^2 + 4V): M_hat = V_hat = 2 alpha L c / V,
    Q_hat = 2 alpha L c^2 (A0 - 2M + Q) / V^2.
    """
    L = T * (T + 1) // 2
    c = 4.0 * V / (T * T + 4.0 * V)
    d_eff = delta_eff_of_A0(A0, Q, M)  # eq. 25
    return {
        "Mhat": 2.0 * alpha * L * c / V,
        "Vhat": 2.0 * alpha * L * c / V,
        "Qhat": 2.0 * alpha * L * c * c * d_eff / V**2,
    }


def output_channel_interpolating(
    alpha: float,
    A0: float,
    T: int,
    Q: float,
    M: float,
    v: float,
    g: np.ndarray | None,
    zeta: np.ndarray | None,
    activation: str,
) -> tuple[dict[str, float], np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The output channel at lam -> 0+ in the interpolation regime (eqs. 49-51 with V = v / lam):
    the rescaled conjugates m_hat = M_hat / lam, q_hat = Q_hat / lam^2, v_hat = V_hat / lam, finite.

    The prox is the projection of z~ onto {sigma(h) = sigma(z*)} (:func:`hdlora.theory.prox.prox_interpolating`),
    f = (h - z~) / sqrt(s) and J = d Prox / d z~ (diagonal):

        m_hat = (2 alpha / v) E sum_ab [f g / sqrt(A0) - (M / A0) (J - 1)],
        q_hat = (2 alpha / v^2) E sum_ab f^2,      v_hat = -(2 alpha / v) E sum_ab (J - 1),

    with sum_ab (J - 1) = 1 - L for softmax (J = (1/s) / sum 1/s) and -L for linear (J = 0).  ``g`` None:
    linear sigma in closed form (h = z*: E sum f^2 = L Delta_eff, eq. 25).
    Returns (hats, h, z*, z~) (the arrays None in closed form).
    """
    L = T * (T + 1) // 2
    if g is None or zeta is None:
        c = 2.0 * alpha * L / v
        return {"Mhat": c, "Vhat": c, "Qhat": c * delta_eff_of_A0(A0, Q, M) / v}, None, None, None
    rs = np.sqrt(s_ab(T).astype(float))
    B = max(Q - M * M / A0, 0.0)
    z_star = teacher_fields(g, T, A0)  # eq. 47
    z_tilde = student_fields(g, zeta, T, A0, M, B)
    h, jac = prox_interpolating(z_star, z_tilde, activation)
    f = (h - z_tilde) / rs
    j1 = float(np.mean(np.sum(jac - 1.0, axis=1)))
    fg = float(np.mean(np.sum(f * g, axis=1))) / math.sqrt(A0)
    hats = {
        "Mhat": 2.0 * alpha / v * (fg - M / A0 * j1),
        "Qhat": 2.0 * alpha / v**2 * float(np.mean(np.sum(f * f, axis=1))),
        "Vhat": -2.0 * alpha / v * j1,
    }
    return hats, h, z_star, z_tilde


def errors_exact(A0: float, T: int, Q: float, M: float, V: float) -> dict[str, float]:
    """Linear sigma: test error (eq. 55) (T+1)/T Delta_eff and train error (eq. 20) (T+1)/T Delta_eff (1-c)^2."""
    c = 4.0 * V / (T * T + 4.0 * V) if V > 0 else 0.0
    d_eff = delta_eff_of_A0(A0, Q, M)  # eq. 25
    test = (T + 1) / T * d_eff
    return {"pretrain_test_error": test, "pretrain_train_error": test * (1.0 - c) ** 2}


def input_channel(
    kappa0: float, kappa: float, lam: float, Mhat: float, Qhat: float, Vhat: float
) -> tuple[dict[str, float], Any]:
    """Spectral channel, eqs. 48 and 52-54.  Returns ({Q, M, V, eta, eps}, SpectralJ)."""
    if not (Mhat > 0 and Vhat > 0 and Qhat >= 0):
        raise FloatingPointError(f"conjugates out of domain: M_hat={Mhat}, Q_hat={Qhat}, V_hat={Vhat}")
    eta = max(math.sqrt(Qhat) / Mhat, spectral.ETA_MIN)
    eps = 2.0 * math.sqrt(kappa) * lam / Mhat  # eq. 48
    j = spectral.J(eta, eps, kappa0)
    r = Mhat / Vhat
    Q = r * r * j.J  # eq. 52
    V = j.dJ_dt / Vhat  # eq. 53: J1/(2 Vhat eta)
    M = 0.5 * r * (2.0 * j.J - eta * j.J1 - eps * j.J2)  # eq. 54
    return {"Q": Q, "M": M, "V": V, "eta": eta, "eps": eps}, j


def _mean_error(z: np.ndarray, z_star: np.ndarray, T: int, activation: str) -> float:
    sigma = get_activation(activation, "numpy")
    d = sigma(to_sym(z, T)) - sigma(to_sym(z_star, T))
    return float(np.mean(np.sum(d * d, axis=(-2, -1))))


# ------------------------------------------------------------------------------------- solve
def _check_method(params: Params, method: str | None) -> str:
    if method is None:
        method = "exact" if params.activation == "linear" else "mc"
    if method not in PRETRAIN_METHODS:
        raise ParamError(f"method must be one of {PRETRAIN_METHODS}, got {method!r}")
    if method == "exact" and params.activation != "linear":
        raise ParamError("method='exact' (closed-form Gaussian expectations) needs activation='linear'")
    return method


def _init_state(params: Params, init) -> dict[str, float]:
    if init is None:
        # a mildly informative start, inside the domain Q >= M^2/A0 (0.16 Q0^2 / A0 <= 0.5 Q0)
        return {"Q": 0.5 * params.Q0, "M": 0.4 * params.Q0, "V": _v_scale(params.lam)}
    if isinstance(init, PretrainResult):
        st = init.state
        if not (st["V"] > 0 and st["Q"] > 0):  # W_hat = 0 solution (lam = inf): nothing to continue
            return _init_state(params, None)
    elif isinstance(init, Mapping):
        try:
            st = {k: float(init[k]) for k in ("Q", "M", "V")}
        except KeyError as e:
            raise ParamError(f"init must provide Q, M and V, missing {e}") from None
    else:
        raise ParamError(f"init must be a PretrainResult, a mapping with Q, M, V, or None; got {type(init).__name__}")
    if not (st["V"] > 0 and st["Q"] > 0 and st["Q"] >= st["M"] ** 2 / A0_of(params)):
        raise ParamError(f"init state outside the domain V > 0, Q >= M^2/A0 > 0: {st}")
    return st


def solve_pretrain(
    params: Params,
    *,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    method: str | None = None,
    tol: float = 1e-7,
    max_iter: int = 500,
    mixing: float = 1.0,
    init: PretrainResult | Mapping[str, float] | None = None,
    warn: bool = True,
    stein: bool = True,
) -> PretrainResult:
    """Solve the pre-training state evolution (Result 4, eqs. 46-54) and evaluate eqs. 19-20, 75.

    Args:
        params: model parameters (alpha, tokens, kappa0, kappa, noise, lam, activation are used).
            lam = 0 is the lam -> 0+ limit: the min-norm interpolator (V = inf, ``lamV`` finite) while the
            data are interpolated, else lam = 0 with V finite (see the module docstring).
        n_mc: Monte-Carlo sample count (ignored for method 'exact').
        seed: seed of the fixed samples.
        method: 'mc', 'qmc' or 'exact' (linear sigma only; closed-form Gaussian expectations).
            Default: 'exact' for linear, 'mc' for softmax.
        tol: passed to :func:`hdlora.theory.fixed_point.iterate`.
        max_iter: passed to :func:`hdlora.theory.fixed_point.iterate`.
        mixing: passed to :func:`hdlora.theory.fixed_point.iterate`.
        init: warm start (a previous PretrainResult or a mapping with Q, M, V).  None: the default start,
            or below lam = LAM_V_SCALE the lam = 0+ fixed point (V = lamV / lam) when there is one.
            At lam = 0+ only a PretrainResult (its Q, M, lamV) is used.
        warn: warn (NonConvergenceWarning) when not converged.
        stein: the zeta-weighted averages of eqs. 49, 51 by Stein's lemma (default, lower variance) or literally
            (``False``: the fixed point is then the exact stationary point of the sampled free entropy, eq. 21).

    Returns:
        PretrainResult (frozen).  A non-converged solve is flagged (converged=False, status 'not
        converged') and warned about; ``status`` tells 'converged' from 'converged to Monte-Carlo
        resolution' (near-degenerate prox maxima, counted in ``n_not_global``, ``mc_jump``).
    """
    if not isinstance(params, Params):
        raise ParamError(f"params must be a hdlora.Params, got {type(params).__name__}")
    method = _check_method(params, method)
    tol = check_tol(tol)
    if method != "exact" and (isinstance(n_mc, bool) or not isinstance(n_mc, (int, np.integer)) or n_mc < 100):
        raise ParamError(f"n_mc must be an integer >= 100, got {n_mc!r}")
    t0 = time.perf_counter()
    T, A0, act, alpha = params.tokens, A0_of(params), params.activation, params.alpha
    L = T * (T + 1) // 2
    n_used = 0 if method == "exact" else int(n_mc)

    if params.lora_only:  # lam = inf: W_hat = 0 (App. A.7)
        if method == "exact":
            err = errors_exact(A0, T, 0.0, 0.0, 0.0)
        else:
            zs = frozen_fields(n_used, T, A0, 0.0, 0.0, seed, method, "pretrain")["z_star"]
            e = _mean_error(np.zeros_like(zs), zs, T, act)
            err = {"pretrain_test_error": e, "pretrain_train_error": e}
        return PretrainResult(
            0.0,
            0.0,
            0.0,
            math.nan,
            math.nan,
            math.nan,
            math.nan,
            math.inf,
            err["pretrain_train_error"],
            err["pretrain_test_error"],
            0.0,
            True,
            True,
            0.0,
            0,
            0,
            n_used,
            method,
            seed,
            time.perf_counter() - t0,
        )

    if method == "exact":
        fields = None
    else:
        fields = frozen_fields(n_used, T, A0, 1.0, 0.0, seed, method, "pretrain")  # only g, zeta are used
    g = None if fields is None else fields["g"]
    zeta = None if fields is None else fields["zeta"]
    if params.lam == 0:
        # lam -> 0+: the min-norm interpolator while the data are interpolated (V = inf, lam V finite);
        # beyond the interpolation threshold V stays finite and lam = 0 is solved as it stands below
        try:
            return _solve_interpolator(params, g, zeta, n_used, seed, method, tol, max_iter, mixing, init, warn, t0)
        except ParamError:
            pass
    elif init is None and params.lam < LAM_V_SCALE:
        # small lam: start from the lam = 0+ fixed point (V = v / lam) when the data are interpolated there
        try:
            z = _solve_interpolator(params, g, zeta, n_used, seed, method, tol, max_iter, mixing, None, False, t0)
            if z.converged:
                init = {"Q": z.Q, "M": z.M, "V": z.lamV / params.lam}
        except ParamError:  # not interpolated at lam = 0+: V stays finite, the default start
            pass
    # V is iterated in units of v_scale (V ~ 1/lam in the interpolation regime): all three O(1)
    v_scale = _v_scale(params.lam)
    names = ("Q", "M", "V")
    lo = np.array([1e-14, -math.inf, 1e-14])

    # the prox's target sigma(z*): z* (eq. 47) is fixed along the iteration
    target = None if g is None else target_rows(teacher_fields(g, T, A0), act)

    def channel(x: np.ndarray, h: np.ndarray | None, ptol: float, full: bool = False):
        Q, M, V = float(x[0]), float(x[1]), float(x[2]) * v_scale
        assert g is not None and zeta is not None  # the Monte-Carlo fields are drawn unless method == 'exact'
        return output_channel(
            alpha,
            A0,
            Q,
            M,
            V,
            g,
            zeta,
            act,
            prox_init=h,
            prox_tol=ptol,
            full=full,
            multi_start=False,
            stein=stein,
            target=target,
        )

    def update(x: np.ndarray, carry: Mapping[str, Any]):
        """One step (eqs. 46-54); the carry's prox warm start keeps each sample in its basin (frozen between
        verifications), its last residual sets the prox tolerance."""
        Q, M, V = float(x[0]), float(x[1]), float(x[2]) * v_scale
        nxt = dict(carry)
        if method == "exact":
            hats = output_channel_exact(alpha, A0, T, Q, M, V)
        else:
            hats, px, _, _ = channel(x, carry["h"], min(1e-6, max(1e-11, 1e-4 * carry["res"])))
            nxt["h"] = px.x
        try:
            new, _ = input_channel(params.kappa0, params.kappa, params.lam, hats["Mhat"], hats["Qhat"], hats["Vhat"])
        except FloatingPointError:
            return np.full(3, math.nan), nxt, hats
        raw = np.array([new["Q"], new["M"], new["V"] / v_scale])
        nxt["res"] = _engine.residual(raw, x)  # before the projection (sets the next prox tolerance)
        return np.maximum(raw, lo), nxt, hats  # the map projected onto its box

    def final(x: np.ndarray, carry: Mapping[str, Any]):
        """At a candidate fixed point: a tight evaluation, each sample in its basin, and the global search."""
        hats, px, z_star, z_tilde = channel(x, carry["h"], 1e-11, full=True)
        alt = _global_search(z_star, z_tilde, float(x[2]) * v_scale, act, ref=px.x, target=target)
        better = alt.value > px.value + 1e-9 * (1.0 + np.abs(px.value))
        return hats, px, z_star, z_tilde, alt, better

    def verify(x: np.ndarray, carry: Mapping[str, Any]):
        """The followed maxima must be the global ones: samples with a better maximum (not moved before) are moved
        to it, a new (continuous) map solved again from here (at most MAX_BASIN_ROUNDS times)."""
        if method == "exact":
            return carry, False
        out = final(x, carry)
        px, alt, better = out[1], out[4], out[5]
        h = px.x.copy()
        fresh = better & ~carry["moved"]
        if np.any(fresh) and carry["rounds"] < MAX_BASIN_ROUNDS:
            h[fresh] = alt.x[fresh]
            return {**carry, "h": h, "moved": carry["moved"] | fresh, "rounds": carry["rounds"] + 1}, True
        # the candidate was found with the iteration's looser prox tolerance: the tight evaluation's residual, the one
        # reported, must meet tol too, else the iteration goes on from here with the tight map (measured: a Fig. 1
        # solve with a coarse start on n/24 samples stopped at 1.03e-7 > tol = 1e-7, reported not converged)
        tight = _measured_residual(params, out[0], x, v_scale)
        if math.isfinite(tight) and tight > tol and carry["tight_rounds"] < MAX_TIGHT_ROUNDS:
            return {**carry, "h": h, "res": tight, "tight_rounds": carry["tight_rounds"] + 1}, True
        return {**carry, "h": h, "final": (x.copy(), out)}, False

    x0d = _init_state(params, init)
    x0 = np.maximum(np.array([x0d["Q"], x0d["M"], x0d["V"] / v_scale]), lo)
    stage = _engine.Stage(
        init=lambda _p, _s: {
            "h": None,
            "res": 1.0,
            "moved": np.zeros(n_used, dtype=bool),
            "rounds": 0,
            "tight_rounds": 0,
        },
        update=update,
        verify=verify,
        domain=lambda x: bool(np.all(np.isfinite(x)) and np.all(x >= lo)),
        names=names,
        name="pre-training state evolution",
    )
    # stall_verify = 0: the basins are verified at candidate fixed points only (the pre-training's rule)
    br = _engine.solve_one(stage, x0, tol=tol, max_iter=max_iter, mixing=mixing, stall_verify=0)
    # a start outside the domain returns before init: the fresh carry
    x, carry = br.x, (br.carry if br.carry is not None else stage.init(params, None))
    iterations = br.iterations
    converged = br.status != _engine.NOT_CONVERGED and br.residual <= tol
    Q, M, V = float(x[0]), float(x[1]), float(x[2]) * v_scale
    failures, mc_jump = 0, 0.0
    better = np.zeros(n_used, dtype=bool)
    if method == "exact":
        hats = output_channel_exact(alpha, A0, T, Q, M, V)
        err = errors_exact(A0, T, Q, M, V)
        c = 4.0 * V / (T * T + 4.0 * V)
        sample_term, sample_se, tail = L * c * c, 0.0, math.nan
    else:
        rec = carry.get("final")
        if rec is not None and np.array_equal(rec[0], x):
            hats, px, z_star, z_tilde, alt, better = rec[1]
        else:  # not converged: the same evaluation and search at the returned point, for the diagnostics
            hats, px, z_star, z_tilde, alt, better = final(x, carry)
    n_not_global = int(np.count_nonzero(better))
    if method != "exact":
        failures = px.n_failed
        if n_not_global:
            # samples left at a maximum that is not the global one: they were moved before and prefer
            # their old maximum again (two near-equal maxima, the sampled map jumps between them).  The
            # fixed point is then defined to Monte-Carlo resolution: accepted when moving them changes
            # each conjugate by less than its Monte-Carlo standard error.
            assert g is not None
            mc_jump = _switch_jump(px, alt, better, g, A0, M, T)
        err = {
            "pretrain_test_error": _mean_error(z_tilde, z_star, T, act),
            "pretrain_train_error": _mean_error(px.x, z_star, T, act),
        }
        sample_term = float(np.mean(px.replicon))
        sample_se = float(np.std(px.replicon, ddof=1) / math.sqrt(px.replicon.size)) if px.replicon.size > 1 else 0.0
        tail = replicon_tail_share(px.replicon)
    converged = converged and failures == 0 and mc_jump <= 1.0
    try:
        spec, _ = input_channel(params.kappa0, params.kappa, params.lam, hats["Mhat"], hats["Qhat"], hats["Vhat"])
        # converged: the residual measured at the returned point (not at the previous iterate) meets tol
        residual = _residual_of(spec, Q, M, V)
        converged = converged and residual <= tol
        r_int = float(spectral.replicon_integral(spec["eta"], spec["eps"], params.kappa0))
        rep = replicon_pretrain(alpha, V, hats["Vhat"], sample_term, r_int)
        # eq. 75 is linear in the sample term: its upper bound from the sample term's mean + 2 s.e.
        rep_upper = rep * (sample_term + 2.0 * sample_se) / sample_term if sample_term > 0 else rep
    except FloatingPointError:  # conjugates left their domain (e.g. V_hat <= 0): no fixed point here
        spec, rep, converged, residual = {"eta": math.nan, "eps": math.nan}, math.nan, False, math.nan
        rep_upper = math.nan
    status = (CONVERGED if n_not_global == 0 else CONVERGED_MC) if converged else NOT_CONVERGED
    result = PretrainResult(
        Q=Q,
        M=M,
        V=V,
        Mhat=hats["Mhat"],
        Qhat=hats["Qhat"],
        Vhat=hats["Vhat"],
        eta=spec["eta"],
        eps=spec["eps"],
        **_errors_and_replicon(err, rep),
        converged=bool(converged),
        residual=residual,
        iterations=iterations,
        prox_failures=int(failures),
        n_mc=n_used,
        method=method,
        seed=seed,
        wall_time=time.perf_counter() - t0,
        status=status,
        n_not_global=n_not_global,
        mc_jump=mc_jump,
        replicon_upper=float(rep_upper),
        replicon_tail=float(tail),
        lamV=params.lam * V,
        scaled_hats=(
            (hats["Mhat"] / params.lam, hats["Qhat"] / params.lam**2, hats["Vhat"] / params.lam)
            if params.lam > 0
            else (math.nan, math.nan, math.nan)
        ),
    )
    detail = f", {failures} prox failures" + (
        f", {n_not_global} samples not at their global maximum (jump {mc_jump:.3g} s.e.)" if n_not_global else ""
    )
    _warn_result(result, warn, "", detail, 3)
    return result


def _errors_and_replicon(err: Mapping[str, float], rep: float) -> dict[str, Any]:
    """The PretrainResult fields of the errors (eqs. 19, 20) and of the replicon (eq. 75)."""
    return dict(
        pretrain_train_error=err["pretrain_train_error"],
        pretrain_test_error=err["pretrain_test_error"],
        replicon_pretrain=rep,
        replicon_stable=bool(rep < 1.0),
    )


def _warn_result(result: PretrainResult, warn: bool, where: str, detail: str, stacklevel: int) -> None:
    """The warnings of a pre-training solve: not converged (with ``detail``), replicon of eq. 75 >= 1."""
    if warn and not result.converged:
        warnings.warn(
            f"pre-training state evolution{where} not converged: residual {result.residual:.3g} after "
            f"{result.iterations} iterations{detail}",
            NonConvergenceWarning,
            stacklevel=stacklevel,
        )
    if warn and not result.replicon_stable:
        warnings.warn(
            f"pre-training replicon condition violated: eq. 75 LHS = {result.replicon_pretrain:.4g} >= 1",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def _solve_interpolator(params, g, zeta, n_used, seed, method, tol, max_iter, mixing, init, warn, t0):
    """lam = 0+: the state evolution of the min-norm interpolator (V = inf, lam V = v finite).

    The fixed point of (Q, M, v) under :func:`output_channel_interpolating` and the spectral channel
    (eqs. 52-54) with the rescaled conjugates (eps = 2 sqrt(kappa) / m_hat, V -> v).  It exists only while
    the data can be interpolated; beyond that (alpha above the interpolation threshold) V stays finite as
    lam -> 0, v = lam V -> 0 along the iteration, and a ParamError says so.
    """
    T, A0, act, alpha = params.tokens, A0_of(params), params.activation, params.alpha
    L = T * (T + 1) // 2
    keys = ("Q", "M", "V")

    def update(state: dict[str, float]):
        hats = output_channel_interpolating(alpha, A0, T, state["Q"], state["M"], state["V"], g, zeta, act)[0]
        try:
            new, _ = input_channel(params.kappa0, params.kappa, 1.0, hats["Mhat"], hats["Qhat"], hats["Vhat"])
        except FloatingPointError:
            return {k: math.nan for k in keys}, hats
        return {k: new[k] for k in keys}, hats

    if isinstance(init, PretrainResult) and init.lamV > 0 and math.isfinite(init.lamV):
        x0 = {"Q": init.Q, "M": init.M, "V": init.lamV}
    else:
        x0 = {"Q": 0.5 * params.Q0, "M": 0.4 * params.Q0, "V": 0.1}
    iterations = 0
    for mix in (mixing, mixing / 2, mixing / 4):  # the undamped map can circle (e.g. alpha = 0.01): damp it
        fp = iterate(
            update,
            x0,
            mixing=mix,
            tol=tol,
            max_iter=max(1, max_iter - iterations),
            bounds={"Q": (1e-14, math.inf), "V": (1e-14, math.inf)},
            name="pre-training state evolution at lam = 0+",
            warn=False,
        )
        iterations += fp.iterations
        if fp.converged or iterations >= max_iter:
            break
    Q, M, v = fp.state["Q"], fp.state["M"], fp.state["V"]
    if not v > LAMV_MIN:  # the iteration went to the v = 0 face: V stays finite as lam -> 0
        raise ParamError(
            f"lam = 0+ (min-norm interpolator) has no fixed point at alpha = {alpha:g}: the data are not "
            f"interpolated (lam V -> 0 along the iteration, {v:.2g}); use lam > 0 or a smaller alpha"
        )
    hats, h, z_star, z_tilde = output_channel_interpolating(alpha, A0, T, Q, M, v, g, zeta, act)
    if h is None:
        err = errors_exact(A0, T, Q, M, math.inf)
    else:
        err = {
            "pretrain_test_error": _mean_error(z_tilde, z_star, T, act),
            "pretrain_train_error": _mean_error(h, z_star, T, act),
        }
    try:
        spec, _ = input_channel(params.kappa0, params.kappa, 1.0, hats["Mhat"], hats["Qhat"], hats["Vhat"])
        residual = max(abs(spec[k] - x) / max(1.0, abs(x)) for k, x in (("Q", Q), ("M", M), ("V", v)))
        r_int = float(spectral.replicon_integral(spec["eta"], spec["eps"], params.kappa0))
        # eq. 75 is invariant under V -> V / lam, V_hat -> lam V_hat; the sample term ||I - A^-1||^2 -> L - 1
        # (softmax, A^-1 the projector on 11^T) or L (linear, A^-1 = 0)
        rep = replicon_pretrain(alpha, v, hats["Vhat"], L - 1.0 if act == "softmax" else float(L), r_int)
    except FloatingPointError:
        spec, rep, residual = {"eta": math.nan, "eps": math.nan}, math.nan, math.nan
    converged = bool(fp.converged and residual <= tol)
    result = PretrainResult(
        Q=Q,
        M=M,
        V=math.inf,
        Mhat=0.0,
        Qhat=0.0,
        Vhat=0.0,
        eta=spec["eta"],
        eps=spec["eps"],
        **_errors_and_replicon(err, rep),
        converged=converged,
        residual=residual,
        iterations=iterations,
        prox_failures=0,
        n_mc=n_used,
        method=method,
        seed=seed,
        wall_time=time.perf_counter() - t0,
        status=CONVERGED if converged else NOT_CONVERGED,
        lamV=v,
        scaled_hats=(hats["Mhat"], hats["Qhat"], hats["Vhat"]),
    )
    _warn_result(result, warn, " at lam = 0+", "", 4)
    return result


# -------------------------------------------------------------------------------------- laws
def fields_test_law(
    params: Params, result: PretrainResult, n: int, seed: int = 0, method: str = "mc", purpose: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n samples (z*, z) of the test law Q (eq. 13) at the fixed point, arrays (n, L) (``purpose``: the named
    random stream, see :func:`hdlora.theory.sampling.standard_normals`)."""
    f = frozen_fields(n, params.tokens, A0_of(params), result.Q, result.M, seed, method, purpose)
    return f["z_star"], f["z"]


def train_fields(
    params: Params, result: PretrainResult, n: int, seed: int = 0, method: str = "mc", purpose: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n samples (z*, z) of the train law R (eq. 17): (z*, z~) ~ Q, z = Prox(z*, z~), arrays (n, L).

    Raises RuntimeError if the prox fails to converge on some sample.
    """
    z_star, z_tilde = fields_test_law(params, result, n, seed, method, purpose)
    if result.V == 0.0:  # lam = inf or V -> 0: Prox is the identity on z~
        return z_star, z_tilde
    if math.isinf(result.V):  # lam = 0+: the projection onto sigma(h) = sigma(z*)
        return z_star, prox_interpolating(z_star, z_tilde, params.activation)[0]
    if params.activation == "linear":
        return z_star, prox_linear(z_star, z_tilde, result.V)
    px = prox(z_star, z_tilde, result.V, params.activation, multi_start=True, tol=1e-11)
    if not px.all_converged:
        raise RuntimeError(f"train law R: prox did not converge on {px.n_failed} of {n} samples")
    return z_star, px.x


def pretrain_free_entropy(
    params: Params,
    state: Mapping[str, float],
    *,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    method: str = "mc",
) -> float:
    """The replica-symmetric free entropy Phi of pre-training (eq. 21) at (Q, M, V; M_hat, Q_hat, V_hat):

        Phi = -M M_hat / (2 alpha) + (Q V_hat - V Q_hat) / (4 alpha)
              + M_hat^2 / (4 alpha V_hat) J(Q_hat^(1/2) / M_hat, 2 sqrt(kappa) lam / M_hat)
              + E_{z*, z~} max_h Psi(h; z*, z~)                                             (eqs. 21, 42)

    on the samples of :func:`solve_pretrain` with the same ``n_mc``, ``seed`` and ``method`` (the named stream
    'pretrain'), so that its six partial derivatives vanish at the solver's fixed point (tested).  At zero
    temperature the largest Phi among fixed points on the same samples is the global minimiser of the training
    objective: the number that ranks pre-training branches.  ``state`` holds Q, M, V, Mhat, Qhat, Vhat (e.g.
    :attr:`PretrainResult.to_dict`).
    """
    Q, M, V = (float(state[k]) for k in ("Q", "M", "V"))
    Mh, Qh, Vh = (float(state[k]) for k in ("Mhat", "Qhat", "Vhat"))
    alpha, T = params.alpha, params.tokens
    if not (Mh > 0 and Vh > 0 and Qh >= 0 and V > 0):
        raise ParamError(f"the free entropy needs M_hat > 0, V_hat > 0, Q_hat >= 0, V > 0; got {state}")
    eta = max(math.sqrt(Qh) / Mh, spectral.ETA_MIN)
    eps = 2.0 * math.sqrt(params.kappa) * params.lam / Mh
    j = spectral.J(eta, eps, params.kappa0).J
    A0 = A0_of(params)
    f = frozen_fields(int(n_mc), T, A0, 1.0, 0.0, seed, method, "pretrain")
    s = s_ab(T).astype(float)
    rs = np.sqrt(s)
    B = max(Q - M * M / A0, 0.0)
    z_star = rs * math.sqrt(A0) * f["g"]  # eq. 47
    z_tilde = rs * (M / math.sqrt(A0) * f["g"] + math.sqrt(B) * f["zeta"])
    if params.activation == "linear":
        psi = pretrain_potential(prox_linear(z_star, z_tilde, V), z_star, z_tilde, V, "linear")
    else:
        psi = prox(z_star, z_tilde, V, params.activation, multi_start=True, tol=1e-12, full=False).value
    return float(
        -M * Mh / (2 * alpha) + (Q * Vh - V * Qh) / (4 * alpha) + Mh * Mh / (4 * alpha * Vh) * j + np.mean(psi)
    )
