"""One theoretical point: pre-training (Result 4) then fine-tuning (Result 5), with Result 3.

``solve(params)`` chains the two state evolutions the way the paper does:

1. the pre-training fixed point (Q, M, V) of eqs. 46-54 (skipped for lam = inf,
   the LoRA-only baseline of A.7, where Q = M = V = 0);
2. the frozen fields (z*, z) of the fine-tuning sequences: the test law Q
   (eq. 13) for e = 0, the train law R (eq. 17) for e = 1 (eq. 61), conditioned
   by Algorithm 1 when ``params.active_pool`` is set (Section 4.3, App. D), and
   recalibrated by ``params.beta`` (eq. 26);
3. the fine-tuning fixed point (q, m, v) of eqs. 62-72 (skipped for lam' = inf,
   the frozen baseline, eq. 79);
4. errors, overlap and forgetting (eqs. 19-20, 84), effective noises
   (eqs. 25-28) and replicon conditions (eqs. 75, 78).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..params import DEFAULT_N_MC, ParamError, Params, check_tol
from . import effective as _eff
from .active import active_fields
from .engine import CONVERGED, CONVERGED_MC, NOT_CONVERGED, REPLICA_UNSTABLE
from .finetune import FinetuneResult, solve_finetune
from .fixed_point import NonConvergenceWarning
from .order_parameters import FinetuneOrderParameters, PretrainOrderParameters
from .pretrain import PretrainResult, solve_pretrain, train_fields
from .sampling import frozen_fields

#: The A.7 baselines, canonical spellings (results and stored rows use these).
BASELINES = ("frozen", "lora_only")
#: Other spellings accepted on input only.
BASELINE_ALIASES = {"lora-only": "lora_only"}


def canonical_baseline(baseline: str | None) -> str | None:
    """The canonical spelling of a baseline name (None stays None); ParamError for an unknown one."""
    if baseline is None:
        return None
    name = BASELINE_ALIASES.get(baseline, baseline)
    if name not in BASELINES:
        raise ParamError(f"baseline must be one of {BASELINES} or None, got {baseline!r}")
    return name


@dataclass(frozen=True)
class TheoryResult(FinetuneOrderParameters, PretrainOrderParameters):
    """The asymptotic prediction at one parameter point (all floats are float64 numbers).

    Order parameters (eqs. 8-9, 48, 67-72), errors (Result 3, eq. 84), the overlap
    o_w = m / sqrt(q q0), effective noises (eqs. 25-28), replicon left-hand sides
    (eqs. 75, 78; stable when < 1) and the diagnostics of both solves.
    ``converged`` is True only when both stages converged.  ``finetune_second_maxima``: samples on which the
    fine-tuning's final global prox search found a second local maximum of psi (eq. 63) besides the kept one
    (None where the stage does not report it: rank r).
    """

    Q0: float
    pretrain_train_error: float
    pretrain_test_error: float
    finetune_train_error: float
    finetune_test_error: float
    forgetting_error: float
    overlap: float
    delta_eff: float
    delta_eff_finetune: float
    delta_eff_actft: float
    beta_min: float
    delta_eff_min: float
    replicon_pretrain: float
    replicon_finetune: float
    replicon_ok: bool
    converged: bool
    pretrain_converged: bool
    finetune_converged: bool
    iterations: int
    pretrain_iterations: int
    finetune_iterations: int
    pretrain_residual: float
    finetune_residual: float
    n_mc: int
    seed: int
    wall_time: float
    baseline: str | None
    params: dict = field(default_factory=dict)
    mc_se: dict = field(default_factory=dict)
    finetune_objective: float = math.nan
    finetune_status: str = ""
    pretrain_status: str = ""
    finetune_mc_resolution: dict | None = None
    replicon_finetune_upper: float = math.nan
    replicon_finetune_tail: float = math.nan
    replicon_pretrain_upper: float = math.nan
    replicon_pretrain_tail: float = math.nan
    finetune_second_maxima: int | None = None

    @property
    def status(self) -> str:
        """'converged', 'converged to Monte-Carlo resolution' (a stage's residual floor explained by samples
        switching between near-degenerate prox maxima: ``finetune_mc_resolution``, the pre-training's n_not_global
        and mc_jump; ``converged`` is True), 'replica-unstable' (converged, a replicon >= 1: eqs. 75, 78) or
        'not converged' (the engine's statuses, :mod:`hdlora.theory.engine`)."""
        if not self.converged:
            return NOT_CONVERGED
        if not self.replicon_ok:
            return REPLICA_UNSTABLE
        return CONVERGED_MC if CONVERGED_MC in (self.pretrain_status, self.finetune_status) else CONVERGED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        d["wall_time_s"] = d["wall_time"]
        return d

    @property
    def state(self) -> dict[str, float]:
        """Warm start for a neighbouring point (``solve(..., init=result)``)."""
        return {k: getattr(self, k) for k in ("Q", "M", "V", "q", "m", "v")}


def _warm_state(
    init: Mapping[str, float] | None, keys: tuple[str, str, str], positive: tuple[str, str]
) -> dict[str, float] | None:
    """The stage's part of a warm start (``keys``), or None when absent, non-finite or not positive
    where it must be (a baseline's zeros are not a valid starting point)."""
    if not init:
        return None
    try:
        st = {k: float(init[k]) for k in keys}
    except (KeyError, TypeError, ValueError):
        return None
    ok = all(math.isfinite(x) for x in st.values()) and all(st[k] > 0 for k in positive)
    return st if ok else None


def _pretrain_init(init: Mapping[str, float] | None) -> dict[str, float] | None:
    return _warm_state(init, ("Q", "M", "V"), ("V", "Q"))


def _finetune_init(init: Mapping[str, float] | None) -> dict[str, float] | None:
    return _warm_state(init, ("m", "q", "v"), ("v", "q"))


@dataclass(frozen=True)
class StageOptions:
    """The options of :func:`solve` that every stage of a point shares: its arguments of the same names."""

    n_mc: int
    seed: int
    tol: float
    max_iter: int
    method: str | None
    optimal_beta: bool
    warn: bool

    @property
    def iteration(self) -> dict[str, Any]:
        """The keyword arguments that both state evolutions take (:func:`hdlora.theory.pretrain.solve_pretrain`,
        :func:`hdlora.theory.finetune.solve_finetune`): seed, tol, max_iter and warn."""
        return {"seed": self.seed, "tol": self.tol, "max_iter": self.max_iter, "warn": self.warn}


#: the coarse start of :func:`solve`: n_mc / COARSE_DIVISOR samples, used when that is >= COARSE_MIN_N
COARSE_DIVISOR = 8
COARSE_MIN_N = 1000


def _coarse_state(params: Params, baseline: str | None, options: StageOptions) -> tuple[dict[str, float] | None, bool]:
    """The state of the same solve on ``options.n_mc`` samples to tol 1e-4 (a start; None when it did not converge),
    and whether the main solve should also run the fine-tuning's global prox search at its first iteration: not when
    the coarse solve's own final search found no second prox maximum on any of its samples."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r, ft = _solve_rank_one(
            params,
            replace(options, tol=1e-4, warn=False),
            init=None,
            baseline=baseline,
            first_search=True,
            t0=time.perf_counter(),
        )
    if not r.converged:
        return None, True
    return r.state, ft.n_second_maxima > 0


def _second_maxima(init: TheoryResult | Mapping[str, Any] | None) -> int | None:
    """``finetune_second_maxima`` of a warm start (a TheoryResult, or a mapping that carries it), else None."""
    if isinstance(init, TheoryResult):
        value = init.finetune_second_maxima
    else:
        value = None if init is None else init.get("finetune_second_maxima")
    return None if value is None or not math.isfinite(value) else int(value)


def apply_baseline(params: Params, baseline: str | None) -> Params:
    """The A.7 baselines as parameters: 'frozen' is lam_ft = inf, 'lora_only' is lam = inf."""
    baseline = canonical_baseline(baseline)
    if baseline is None:
        return params
    if baseline == "frozen":
        return params.replace(lam_ft=math.inf)
    return params.replace(lam=math.inf)


def finetune_fields(params: Params, pre: PretrainResult, n_mc: int, seed: int) -> tuple[Any, Any]:
    """The frozen fields (z*, z) of the fine-tuning sequences (eq. 61), before recalibration: the train law R
    (eq. 17) for e = 1, the test law Q (eq. 13) for e = 0, conditioned by Algorithm 1 when
    ``params.active_pool`` is set; drawn from the named streams 'finetune_fields' ('active' for the pool)."""
    Q0, Q, M = params.Q0, pre.Q, pre.M
    if params.reuse and not params.lora_only:
        return train_fields(params, pre, n_mc, seed=seed, purpose="finetune_fields")
    if params.active_pool is not None:
        return active_fields(params, Q0, Q, M, n_mc, seed=seed, purpose="active")
    f = frozen_fields(n_mc, params.tokens, params.A0, Q, M, seed=seed, purpose="finetune_fields")
    return f["z_star"], f["z"]


def solve(
    params: Params,
    *,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    baseline: str | None = None,
    init: TheoryResult | Mapping[str, float] | None = None,
    tol: float = 1e-7,
    max_iter: int = 500,
    method: str | None = None,
    optimal_beta: bool = False,
    warn: bool = True,
    coarse: bool = True,
) -> TheoryResult:
    """Solve the pre-training and fine-tuning state evolutions at ``params``.

    Args:
        params: the model parameters (Params).
        n_mc: Monte-Carlo samples of each expectation (default 3e4 as in the paper, App. D).
            The linear activation's pre-training uses closed forms and ignores it.
        seed: seed of the fixed samples (common random numbers).
        baseline: None, 'frozen' (lam' = inf) or 'lora_only' (lam = inf; 'lora-only' accepted), App. A.7.
        init: warm start: a previous TheoryResult or a mapping with Q, M, V, q, m, v (and, optionally, that
            result's ``finetune_second_maxima``: when it is 0 the fine-tuning skips its global prox search at the
            first iteration and searches only at the fixed point, as a cold start does).
        tol: tolerance of each fixed-point solve.
        max_iter: iteration cap of each fixed-point solve.
        method: pre-training expectation rule ('mc', 'qmc', 'exact'; default exact for
            linear sigma, mc for softmax).
        optimal_beta: recalibrate the frozen map at beta* = M/Q (eq. 26) found from the
            pre-training fixed point (overrides params.beta; the result's params show it).
        warn: emit a NonConvergenceWarning when a stage does not converge.
        coarse: without ``init``, start from the fixed point of the same solve on the first
            n_mc / COARSE_DIVISOR samples (to tol 1e-4; a start only: the fixed point returned is that
            of the n_mc samples, to ``tol``).  Measured at the Fig. 1 softmax point: Newton steps
            2.64e6 -> 2.14e6, the fixed point within tol.  When the coarse solve's final prox search found
            no second maximum, the fine-tuning searches only at the fixed point (as for ``init`` above): at the
            Fig. 1 point one global search of 3e4 samples instead of two, the same fixed point bit for bit.
    """
    if not isinstance(params, Params):
        raise ParamError(f"params must be a hdlora.Params, got {type(params).__name__}")
    if isinstance(n_mc, bool) or not isinstance(n_mc, int) or n_mc < 100:
        raise ParamError(f"n_mc must be an integer >= 100, got {n_mc!r}")
    baseline = canonical_baseline(baseline)
    tol = check_tol(tol)
    params = apply_baseline(params, baseline)
    # a warm start whose own final prox search found no second maximum: the fine-tuning's first search is skipped
    first_search = _second_maxima(init) != 0
    if isinstance(init, TheoryResult):
        init = init.state
    options = StageOptions(
        n_mc=n_mc, seed=seed, tol=tol, max_iter=max_iter, method=method, optimal_beta=optimal_beta, warn=warn
    )
    if not params.rank_one:  # a rank-r LoRA or a rank-r* task (beyond the paper): docs/theory/rank_r.md
        from .solve_rank_r import rank_r_point

        return rank_r_point(params, options, baseline=baseline, init=init)
    t0 = time.perf_counter()
    if coarse and init is None and n_mc >= COARSE_DIVISOR * COARSE_MIN_N:  # (rank one: rank r returned above)
        init, first_search = _coarse_state(params, baseline, replace(options, n_mc=n_mc // COARSE_DIVISOR))
    return _solve_rank_one(params, options, init=init, baseline=baseline, first_search=first_search, t0=t0)[0]


def _solve_rank_one(
    params: Params,
    options: StageOptions,
    *,
    init: Mapping[str, float] | None,
    baseline: str | None,
    first_search: bool,
    t0: float,
) -> tuple[TheoryResult, FinetuneResult]:
    """The two stages of :func:`solve` at a rank-one point (``params`` with its baseline applied), from ``init``;
    ``first_search``: see :func:`hdlora.theory.finetune.solve_finetune`.  Returns the point and its fine-tuning
    stage."""
    params, pre, ft_params, z_star, z = pretrain_stage(params, options, init)
    Q0, Q, M = params.Q0, pre.Q, pre.M
    with _warnings_shown(options.warn):
        ft: FinetuneResult = solve_finetune(
            ft_params,
            z_star,
            z,
            Q0=Q0,
            Q=Q,
            M=M,
            init=_finetune_init(init),
            first_search=first_search,
            **options.iteration,
        )
    point = point_result(TheoryResult, params, pre, ft, options, t0=t0, baseline=baseline)
    return point, ft


@contextmanager
def _warnings_shown(warn: bool) -> Iterator[None]:
    """A stage of :func:`solve`: its NonConvergenceWarning shown only when ``warn`` (solve's argument)."""
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", NonConvergenceWarning)
        yield


def pretrain_stage(
    params: Params, options: StageOptions, init: Mapping[str, float] | None
) -> tuple[Params, PretrainResult, Params, Any, Any]:
    """The pre-training state evolution (Result 4) and what the fine-tuning starts from: (params, with beta = beta* =
    M/Q when ``options.optimal_beta``; the PretrainResult; the fine-tuning's params (reuse off for LoRA only: there is
    no pre-training data to reuse); the frozen fields z*, z of the fine-tuning sequences)."""
    with _warnings_shown(options.warn):
        pre: PretrainResult = solve_pretrain(
            params, n_mc=options.n_mc, method=options.method, init=_pretrain_init(init), **options.iteration
        )
        if options.optimal_beta:
            if not pre.Q > 0:
                raise ParamError("optimal_beta needs a pre-trained map (Q > 0); lam = inf has none")
            params = params.replace(beta=_eff.beta_min(pre.Q, pre.M))
        z_star, z = finetune_fields(params, pre, options.n_mc, options.seed)
    ft_params = params.replace(reuse=False) if params.lora_only else params
    return params, pre, ft_params, z_star, z


#: the fields of a point's result copied as they are from the pre-training and the fine-tuning stage
_FROM_PRETRAIN = (
    "Q",
    "M",
    "V",
    "Mhat",
    "Qhat",
    "Vhat",
    "pretrain_train_error",
    "pretrain_test_error",
    "replicon_pretrain",
)
_FROM_FINETUNE = (
    "q",
    "m",
    "v",
    "qhat",
    "mhat",
    "vhat",
    "finetune_train_error",
    "finetune_test_error",
    "forgetting_error",
    "overlap",
    "replicon_finetune",
)


def point_result(
    cls: type,
    params: Params,
    pre: PretrainResult,
    ft: Any,
    options: StageOptions,
    *,
    t0: float,
    baseline: str | None,
    **extra: Any,
) -> Any:
    """The point's result (``cls``: TheoryResult or a subclass with ``extra`` fields) from the two stages solved with
    ``options``: ``ft`` has the fine-tuning scalars of a :class:`hdlora.theory.finetune.FinetuneResult` (q, m, v,
    conjugates, errors, overlap, delta_eff, replicon_finetune, converged, iterations, residual, mc_se)."""
    Q0, Q, M = params.Q0, pre.Q, pre.M
    noise = params.noise
    d_eff = _eff.delta_eff_beta(Q0, Q, M, noise, params.beta)
    has_q = Q > 0
    return cls(
        **{k: getattr(pre, k) for k in _FROM_PRETRAIN},
        **{k: getattr(ft, k) for k in _FROM_FINETUNE},
        Q0=Q0,
        delta_eff=d_eff,
        delta_eff_finetune=ft.delta_eff,
        delta_eff_actft=_eff.delta_eff_actft(Q0, Q, M, noise) if has_q else d_eff,
        beta_min=_eff.beta_min(Q, M) if has_q else math.nan,
        delta_eff_min=_eff.delta_eff_min(Q0, Q, M, noise) if has_q else d_eff,
        replicon_ok=bool(pre.replicon_pretrain < 1 and ft.replicon_finetune < 1),
        converged=bool(pre.converged and ft.converged),
        pretrain_converged=pre.converged,
        finetune_converged=ft.converged,
        iterations=pre.iterations + ft.iterations,
        pretrain_iterations=pre.iterations,
        finetune_iterations=ft.iterations,
        pretrain_residual=pre.residual,
        finetune_residual=ft.residual,
        n_mc=options.n_mc,
        seed=options.seed,
        wall_time=time.perf_counter() - t0,
        baseline=baseline,
        params=params.to_dict(),
        mc_se=dict(ft.mc_se),
        finetune_objective=float(getattr(ft, "objective", math.nan)),
        finetune_status=str(getattr(ft, "status", "")),
        pretrain_status=str(getattr(pre, "status", "")),
        finetune_mc_resolution=getattr(ft, "mc_resolution", None),
        replicon_finetune_upper=float(getattr(ft, "replicon_upper", math.nan)),
        replicon_finetune_tail=float(getattr(ft, "replicon_tail", math.nan)),
        replicon_pretrain_upper=float(getattr(pre, "replicon_upper", math.nan)),
        replicon_pretrain_tail=float(getattr(pre, "replicon_tail", math.nan)),
        finetune_second_maxima=getattr(ft, "n_second_maxima", None),
        **extra,
    )
