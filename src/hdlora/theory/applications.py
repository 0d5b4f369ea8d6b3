"""Theory side of the applications: active fine-tuning (Section 4.3) and recalibration (eq. 26).

* :func:`active_comparison_effective`: on an effective pre-training (fields (z*, z) ~ Q with
  given Q0, Q, M, eq. 13), the fine-tuning state evolution (Result 5) twice, on the fields
  selected by Algorithm 1 (App. D: draw n_mc / rho samples of Q, keep the n_mc with the
  lowest ||sigma(beta z) - sigma(0)||_F^2) and on unconditioned fields ("uniform from the
  pool"), with the *same* rank-one samples and the same test samples, so that
  Delta E' = E'(uniform) - E'(active) carries a paired Monte-Carlo standard error.  Test
  errors use the unconditioned law Q (test data are uniform, App. D).
* :func:`active_comparison`: the same after a real pre-training (two :func:`solve` calls).

Effective noises reported (App. C): Delta_eff(beta) (eqs. 25-26), Delta_eff,ActFT (eq. 28) and
the Monte-Carlo second moment of (beta z - z*)_ab / sqrt(1 + delta_ab) over the selected
and the unconditioned fields (the quantity eq. 28 approximates by conditioning on z = 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..params import A0, DEFAULT_N_MC, ParamError, Params
from . import effective as _eff
from .active import active_fields
from .errors import finetune_losses
from .finetune import FinetuneResult, solve_finetune
from .sampling import frozen_fields

if TYPE_CHECKING:
    from .solve import TheoryResult

    # the solve behind each arm: fine-tuning only (effective pre-training) or the whole pipeline
    _Outcome = FinetuneResult | TheoryResult

__all__ = ["ActiveComparison", "active_comparison_effective", "active_comparison"]


@dataclass(frozen=True)
class ActiveComparison:
    """Active (Algorithm 1) vs uniform fine-tuning from the same pool, in the theory.

    Attributes:
        finetune_test_error, overlap: E' and o_w of w_hat_ActFT.
        uniform_finetune_test_error, uniform_overlap: E' and o_w of w_hat (uniform choice).
        delta_finetune_test_error: E'(uniform) - E'(active); ``_se`` its paired MC s.e.
        delta_overlap: o_w(active) - o_w(uniform).
        delta_eff: Delta_eff(beta) of eqs. 25-26; delta_eff_actft: eq. 28.
        delta_eff_selected, delta_eff_uniform: MC second moment of (beta z - z*) per entry
            (divided by 1 + delta_ab) over the selected / unconditioned fields.
        rho: labelling ratio alpha'/alpha_bar'.  converged: both solves converged.
        active, uniform: the two results (FinetuneResult or TheoryResult).
    """

    finetune_test_error: float
    uniform_finetune_test_error: float
    delta_finetune_test_error: float
    delta_finetune_test_error_se: float
    overlap: float
    uniform_overlap: float
    delta_overlap: float
    delta_eff: float
    delta_eff_actft: float
    delta_eff_selected: float
    delta_eff_uniform: float
    rho: float
    converged: bool
    active: _Outcome
    uniform: _Outcome

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("active", "uniform")}
        d["active"] = self.active.to_dict()
        d["uniform"] = self.uniform.to_dict()
        return d


def _paired_test_difference(
    params: Params, Q0: float, Q: float, M: float, a: _Outcome, u: _Outcome, n_test: int, seed: int
):
    """E'(uniform) - E'(active) on common test samples: (mean, s.e.) (eq. 73, fields from Q)."""
    b = params.beta
    if params.frozen:
        return 0.0, 0.0
    if params.activation == "linear":  # closed forms (deterministic), see hdlora.theory.errors
        return float(u.finetune_test_error - a.finetune_test_error), 0.0
    f = frozen_fields(n_test, params.tokens, A0(Q0, params.noise), b * b * Q, b * M, seed=seed, purpose="test")
    la = finetune_losses(params.activation, f["z_star"], f["z"], a.q, a.m, seed=seed)["finetune"]
    lu = finetune_losses(params.activation, f["z_star"], f["z"], u.q, u.m, seed=seed)["finetune"]
    d = lu - la
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def active_comparison_effective(
    params: Params,
    Q0: float,
    Q: float,
    M: float,
    *,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    n_test: int | None = None,
    **kwargs: Any,
) -> ActiveComparison:
    """Active vs uniform fine-tuning on an effective pre-training (Fig. 4), theory.

    Args:
        params: needs ``active_pool`` (alpha_bar'); alpha_ft, tokens, noise, lam_ft, beta,
            activation are used.
        Q0: the effective pre-training (law Q, eq. 13), before recalibration: Q0.
        Q: the same law's Q.
        M: the same law's M.
        n_mc: Monte-Carlo samples of the fine-tuning state evolution (the pool has n_mc / rho).
        seed: seed of the named random streams of the fields ('active' for the pool, 'finetune_fields' for the
            uniform draw, as :func:`hdlora.theory.solve`), of the rank-one normals and of the test samples, shared
            by both solves.
        n_test: test samples of E' (default n_mc).
        kwargs (Any): passed to :func:`hdlora.theory.finetune.solve_finetune` (tol, max_iter, ...).
    """
    if params.active_pool is None:
        raise ParamError("active_comparison_effective needs params.active_pool (alpha_bar')")
    if params.reuse:
        raise ParamError("active fine-tuning is defined for e = 0 only; set reuse=False")
    zs_a, z_a = active_fields(params, Q0, Q, M, n_mc, seed=seed, purpose="active")
    f = frozen_fields(n_mc, params.tokens, A0(Q0, params.noise), Q, M, seed=seed, purpose="finetune_fields")
    zs_u, z_u = f["z_star"], f["z"]
    kw = dict(Q0=Q0, Q=Q, M=M, seed=seed, n_test=n_test, **kwargs)
    act: FinetuneResult = solve_finetune(params, zs_a, z_a, **kw)
    uni: FinetuneResult = solve_finetune(params.replace(active_pool=None), zs_u, z_u, **kw)
    return _compare(params, Q0, Q, M, act, uni, zs_a, z_a, zs_u, z_u, n_test or n_mc, seed)


def active_comparison(params: Params, *, n_mc: int = DEFAULT_N_MC, seed: int = 0, **kwargs: Any) -> ActiveComparison:
    """Active vs uniform fine-tuning after a real pre-training: :func:`hdlora.theory.solve` with and
    without ``active_pool`` (same seeds, hence common rank-one and test samples)."""
    from .solve import solve

    if params.active_pool is None:
        raise ParamError("active_comparison needs params.active_pool (alpha_bar')")
    act = solve(params, n_mc=n_mc, seed=seed, **kwargs)
    uni = solve(params.replace(active_pool=None), n_mc=n_mc, seed=seed, init=act, **kwargs)
    p = params.replace(beta=act.params["beta"])
    Q0, Q, M = act.Q0, act.Q, act.M
    zs_a, z_a = active_fields(p, Q0, Q, M, n_mc, seed=seed, purpose="active")
    f = frozen_fields(n_mc, p.tokens, A0(Q0, p.noise), Q, M, seed=seed, purpose="finetune_fields")
    return _compare(p, Q0, Q, M, act, uni, zs_a, z_a, f["z_star"], f["z"], n_mc, seed)


def _compare(
    params: Params,
    Q0: float,
    Q: float,
    M: float,
    act: _Outcome,
    uni: _Outcome,
    zs_a: np.ndarray,
    z_a: np.ndarray,
    zs_u: np.ndarray,
    z_u: np.ndarray,
    n_test: int,
    seed: int,
) -> ActiveComparison:
    b = params.beta
    d, d_se = _paired_test_difference(params, Q0, Q, M, act, uni, n_test, seed)
    return ActiveComparison(
        finetune_test_error=act.finetune_test_error,
        uniform_finetune_test_error=uni.finetune_test_error,
        delta_finetune_test_error=d,
        delta_finetune_test_error_se=d_se,
        overlap=act.overlap,
        uniform_overlap=uni.overlap,
        delta_overlap=act.overlap - uni.overlap,
        delta_eff=_eff.delta_eff_beta(Q0, Q, M, params.noise, b),
        delta_eff_actft=_eff.delta_eff_actft(Q0, Q, M, params.noise) if Q > 0 else math.nan,
        delta_eff_selected=_eff.delta_eff_from_fields(zs_a, z_a, b)[0],
        delta_eff_uniform=_eff.delta_eff_from_fields(zs_u, z_u, b)[0],
        rho=cast(float, params.rho),  # active_pool is set (both callers check), so rho is a float
        converged=bool(act.converged and uni.converged),
        active=act,
        uniform=uni,
    )
