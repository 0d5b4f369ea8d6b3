"""Theory-driven tuning of the regularisations lam, lam_ft and the recalibration beta.

The state evolution (Results 3-5, :func:`hdlora.theory.solve`) predicts the errors
and the overlap of every hyperparameter choice, so the paper's "prescription for the
optimal pre-training procedure" (Sections 4.1-4.2, Figs. 1, 3, 6) is an optimisation
of a deterministic function of (lam, lam', beta):

* ``finetune_test_error`` E' (eq. 73): minimised;
* ``pretrain_test_error`` E (eqs. 19, 55): minimised; it depends on lam only (the
  pre-training stage of Result 4 never sees lam' nor the recalibration beta of eq. 26,
  which acts after pre-training), so only ``over=("lam",)`` is accepted for it and the
  pre-training state evolution is solved alone (:func:`hdlora.theory.pretrain.solve_pretrain`,
  with the arguments :func:`hdlora.theory.solve` would pass);
* ``overlap`` o_w = m / sqrt(q q0): maximised.

Search (on log10 of every hyperparameter, inside bounds):

* 1-D: a coarse grid of ``n_grid`` points (the objective can be flat or multimodal, e.g.
  E' vs lam' is flat over a decade at small lam'), then bounded Brent
  (``scipy.optimize.minimize_scalar(method="bounded")``) between the two grid neighbours
  of the best grid point, to an absolute tolerance ``xtol`` on log10.
* 2-D / 3-D: a coarse product grid, then coordinate descent: cycles of the same bounded
  1-D Brent searches along each coordinate, in a window of +-(grid step) around the
  current point (shrunk to twice the last move, never below 5 xtol), until a cycle moves
  no coordinate by more than ``xtol``.

Every solve is warm-started (``init=``) from the nearest converged solve in log space; its
pre-training part (Q, M, V) from the converged solve nearest in lam (the same lam when
available: the pre-training fixed point is shared by all lam', beta at fixed lam, and a
warm start at the fixed point costs one or two iterations). A warm-started solve that does
not converge is repeated once from the default (cold) start; both solves are recorded.

Fixed Monte-Carlo samples (the same ``seed`` for every solve, common random numbers) make
the objective a deterministic function. It is still slightly rough: the fixed points are
converged to a relative tolerance (``tol``, 1e-7), and different warm starts reach them
within ~1e-8 (measured on the linear activation: E' changes by 1-2e-8 between warm starts
from lam = 0.01, 0.1, 1). The default ``xtol = 0.01`` on log10 (a 2.3 % step in the
hyperparameter) is far above the location noise this roughness induces (sqrt(2 eps / c)
~ 1e-3 for eps ~ 1e-7 and a curvature c ~ 1 per decade^2, measured for E' vs lam) and far
below the seed-to-seed Monte-Carlo uncertainty of the optimum (the objective's MC standard
error, ~1e-3 relative at n_mc = 3e4, moves the minimiser by ~sqrt(2 se / c) ~ 0.05 decades):
refining further would optimise the Monte-Carlo noise, not the theory. Near a quadratic
minimum an error of xtol in log10 changes the value by c xtol^2 / 2 ~ 5e-5.

Measured at the Fig. 3 setting (softmax, e = 1, n_mc = 1e4): E' around its minimiser varies
smoothly at the 1e-7 level (0.1831141, 0.1831134, 0.1831142 at lam = 0.0259, 0.0261, 0.0263),
while its Monte-Carlo standard error is 2e-3. There the pre-training state evolution creeps
for lam <~ 1.6e-3 (V ~ 60, residual 3e-7 to 1.5e-6 after 500 iterations): such points are
recorded as not converged, and each costs up to the full iteration budget.

A solve that did not converge (``converged=False``), or that returned a non-finite value,
is recorded but never chosen as the optimum; in the search it counts as worse than every
converged solve. If no solve converged, the best non-converged one is returned with
``converged=False`` and a :class:`NonConvergenceWarning`.

The LoRA rank (beyond the paper; docs/theory/rank_r.md) is an integer axis: ``over`` may name
``lora_rank`` (with bounds ``(low, high)``, integers, default 1..8 cut at the theory's limit
``lora_rank * tokens <= MAX_PROX_DIM``). Every rank of the interval is solved
(:func:`hdlora.theory.solve`, rank-r branches); when continuous hyperparameters are searched too,
they are tuned per rank by the search above. The result says which rank is best, the value it
reaches, and how flat the optimum is: ``per_rank`` (each rank's optimum) and ``flat_ranks`` (the
ranks whose converged target lies within ``FLAT_REL`` = 1 % of the best value).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from ..params import DEFAULT_N_MC, ParamError, Params
from ..theory.fixed_point import NonConvergenceWarning

#: target -> maximise? (errors are minimised, the overlap is maximised)
TARGETS: dict[str, bool] = {"finetune_test_error": False, "overlap": True, "pretrain_test_error": False}
#: hyperparameters that can be searched (Params field names: lam = lambda, lam_ft = lambda', beta of eq. 26;
#: lora_rank = r, an integer axis)
HYPERPARAMETERS = ("lam", "lam_ft", "beta", "lora_rank")
#: the continuous (log-scale) hyperparameters
CONTINUOUS = ("lam", "lam_ft", "beta")
#: the integer axis
RANK = "lora_rank"
#: default rank interval (cut at the theory's limit :func:`max_lora_rank`)
DEFAULT_RANK_BOUNDS = (1, 8)
#: a rank is "as good as the best" when its target is within this relative distance of the best value
FLAT_REL = 0.01
#: default search intervals (the search is on log10 of the parameter)
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {"lam": (1e-3, 10.0), "lam_ft": (1e-3, 10.0), "beta": (0.3, 3.0)}
#: default tolerance on log10 of each hyperparameter (see the module docstring)
DEFAULT_XTOL = 0.01
#: default coarse-grid points per searched dimension (1-D, 2-D, 3-D)
DEFAULT_GRID = {1: 7, 2: 5, 3: 4}


class _BudgetExhausted(Exception):
    pass


@dataclass(frozen=True)
class SolveRecord:
    """One state-evolution solve of the search.

    Attributes:
        point: the searched hyperparameters of this solve (not logs).
        value: the target's value there (NaN when the solve returned none).
        converged: whether the solve converged (both stages for E' and o_w).
        iterations: fixed-point iterations used (both stages).
        wall_time: seconds.
        phase: 'grid' (coarse grid) or 'refine' (Brent / coordinate descent); '-cold' appended
            for a solve repeated without warm start after the warm-started one failed.
    """

    point: dict[str, float]
    value: float
    converged: bool
    iterations: int
    wall_time: float
    phase: str


@dataclass(frozen=True)
class OptimizeResult:
    """The optimum of a theory-driven search and the record of every solve.

    Attributes:
        target, maximize, over: what was optimised, in which direction, over which names.
        optimum: the optimal hyperparameters {name: value}.
        value: the target at the optimum.
        value_se: Monte-Carlo standard error of ``value`` reported by the solver (0 for
            closed forms; NaN when not available).
        converged: the optimum's solve converged (False only when no solve converged).
        all_converged: every solve of the search converged.
        n_solves, n_not_converged: solves used, and how many of them did not converge.
        at_bound: {name: True} when the optimum lies within xtol (log10) of a bound:
            the true optimum may be outside the interval.
        budget_exhausted: the search stopped at ``max_solves`` before meeting ``xtol``.
        records: every solve, in order.
        bounds, xtol, n_grid, n_mc, seed: the search settings.
        params: the full parameters at the optimum (Params.to_dict()).
        solution: the solver's result at the optimum (TheoryResult / PretrainResult .to_dict()).
        wall_time: seconds for the whole search.
    """

    target: str
    maximize: bool
    over: tuple[str, ...]
    optimum: dict[str, float]
    value: float
    value_se: float
    converged: bool
    all_converged: bool
    n_solves: int
    n_not_converged: int
    at_bound: dict[str, bool]
    budget_exhausted: bool
    records: tuple[SolveRecord, ...]
    bounds: dict[str, tuple[float, float]]
    xtol: float
    n_grid: int
    n_mc: int
    seed: int
    params: dict[str, Any]
    solution: dict[str, Any] = field(repr=False)
    wall_time: float
    per_rank: tuple[dict[str, Any], ...] = ()
    flat_ranks: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["over"] = list(self.over)
        d["bounds"] = {k: list(v) for k, v in self.bounds.items()}
        d["per_rank"] = [dict(r) for r in self.per_rank]
        d["flat_ranks"] = [dict(r) for r in self.flat_ranks]
        return d


# ------------------------------------------------------------------------------ validation
def _check_over(over: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(over, str):
        over = [s.strip() for s in over.split(",") if s.strip()]
    try:
        names = tuple(over)
    except TypeError:
        raise ParamError(f"over must be a sequence of names from {HYPERPARAMETERS}, got {over!r}") from None
    if not names:
        raise ParamError(f"over must name at least one of {HYPERPARAMETERS}")
    for n in names:
        if n not in HYPERPARAMETERS:
            raise ParamError(f"over: unknown hyperparameter {n!r}; allowed: {', '.join(HYPERPARAMETERS)}")
    if len(set(names)) != len(names):
        raise ParamError(f"over: each hyperparameter at most once, got {list(names)}")
    return names


def _check_bounds(
    over: tuple[str, ...], bounds: Mapping[str, Sequence[float]] | None
) -> dict[str, tuple[float, float]]:
    bounds = dict(bounds or {})
    for n in bounds:
        if n not in over:
            raise ParamError(f"bounds given for {n!r}, which is not searched (over = {list(over)})")
    out = {}
    for n in over:
        if n == RANK:
            continue
        b = bounds.get(n, DEFAULT_BOUNDS[n])
        try:
            lo, hi = (float(x) for x in b)
        except (TypeError, ValueError):
            raise ParamError(f"bounds for {n} must be a pair (low, high) of numbers, got {b!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ParamError(f"bounds for {n} must satisfy 0 < low < high < inf (log-scale search), got ({lo}, {hi})")
        out[n] = (lo, hi)
    return out


# ------------------------------------------------------------------------------ evaluator
class _Evaluator:
    """Solves at log10 points, caches them, warm-starts from the nearest converged solve."""

    def __init__(
        self,
        params: Params,
        target: str,
        over: tuple[str, ...],
        maximize: bool,
        *,
        n_mc: int,
        seed: int,
        tol: float,
        max_iter: int,
        max_solves: int,
    ):
        self.params, self.target, self.over, self.sign = params, target, over, (-1.0 if maximize else 1.0)
        self.n_mc, self.seed, self.tol, self.max_iter, self.max_solves = n_mc, seed, tol, max_iter, max_solves
        self.cache: dict[tuple, float] = {}
        self.solved: list[tuple[np.ndarray, Any, SolveRecord]] = []  # (log point, result, record)
        self.phase = "grid"
        self.lam_index = over.index("lam") if "lam" in over else None
        self.on_solve: Callable[[SolveRecord], None] | None = None

    @property
    def records(self) -> list[SolveRecord]:
        return [r for _, _, r in self.solved]

    def _ok(self, rec: SolveRecord) -> bool:
        return rec.converged and math.isfinite(rec.value)

    def _init(self, x: np.ndarray) -> dict[str, float] | None:
        good = [(lx, res) for lx, res, rec in self.solved if self._ok(rec)]
        if not good:
            return None
        d = [float(np.sum((lx - x) ** 2)) for lx, _ in good]
        res_all = good[int(np.argmin(d))][1]
        init = dict(res_all.state)
        if getattr(res_all, "finetune_second_maxima", None) is not None:  # see hdlora.theory.solve.solve's init
            init["finetune_second_maxima"] = float(res_all.finetune_second_maxima)
        if self.lam_index is not None and self.target != "pretrain_test_error":
            i = self.lam_index
            key = [(abs(lx[i] - x[i]), dd) for (lx, _), dd in zip(good, d)]
            res_pre = good[min(range(len(good)), key=key.__getitem__)][1]
            init.update({k: res_pre.state[k] for k in ("Q", "M", "V")})
        return init

    def _solve(self, p: Params, init):
        if self.target == "pretrain_test_error":
            from ..theory.pretrain import solve_pretrain

            return solve_pretrain(
                p, n_mc=self.n_mc, seed=self.seed, tol=self.tol, max_iter=self.max_iter, init=init, warn=False
            )
        from ..theory.solve import solve

        return solve(p, n_mc=self.n_mc, seed=self.seed, tol=self.tol, max_iter=self.max_iter, init=init, warn=False)

    def value(self, x: Sequence[float] | np.ndarray) -> float:
        """The target at log10 point x (raw value, NaN if unavailable)."""
        xa = np.asarray(x, dtype=float)
        key = tuple(np.round(xa, 12))
        if key in self.cache:
            return self.cache[key]
        if len(self.solved) >= self.max_solves:
            raise _BudgetExhausted
        point = {n: float(10.0**xi) for n, xi in zip(self.over, xa)}
        init = self._init(xa)
        rec = self._record(xa, point, init, self.phase)
        if not self._ok(rec) and init is not None and len(self.solved) < self.max_solves:
            # a warm start can lead the iteration astray (measured: softmax, e = 1, a warm start two
            # decades of lam away ran 500 fine-tuning iterations without converging): retry cold
            rec = self._record(xa, point, None, self.phase + "-cold")
        self.cache[key] = rec.value if self._ok(rec) else math.nan
        return self.cache[key]

    def _record(self, x: np.ndarray, point: dict[str, float], init, phase: str) -> SolveRecord:
        t0 = time.perf_counter()
        try:
            res = self._solve(self.params.replace(**point), init)
        except FloatingPointError:  # a stage left its domain: no fixed point here
            res = None
        except ValueError as exc:  # the rank-r prox refuses a non-positive-definite v (a branch left its domain)
            if isinstance(exc, ParamError):
                raise
            res = None
        if res is None:
            val, conv, its = math.nan, False, 0
        else:
            val, conv, its = float(getattr(res, self.target)), bool(res.converged), int(res.iterations)
        rec = SolveRecord(
            point=point, value=val, converged=conv, iterations=its, wall_time=time.perf_counter() - t0, phase=phase
        )
        self.solved.append((x.copy(), res, rec))
        if self.on_solve is not None:
            self.on_solve(rec)
        return rec

    def objective(self, x: Sequence[float] | np.ndarray) -> float:
        """Signed objective to minimise; non-converged / non-finite solves rank below every converged one."""
        v = self.value(x)
        if math.isfinite(v):
            return self.sign * v
        ok = [self.sign * r.value for r in self.records if self._ok(r)]
        worst = max(ok) if ok else 0.0
        return worst + abs(worst) + 1.0

    def best(self):
        """(log point, result, record) of the best converged solve, else the best finite one, else the first."""
        ok = [s for s in self.solved if self._ok(s[2])]
        pool = ok or [s for s in self.solved if math.isfinite(s[2].value)] or self.solved[:1]
        return min(pool, key=lambda s: self.sign * s[2].value if math.isfinite(s[2].value) else math.inf)


# ------------------------------------------------------------------------------ searches
def _brent(f: Callable[[float], float], a: float, b: float, xtol: float) -> None:
    """Bounded Brent on [a, b] (log10 units); the evaluator keeps every solve."""
    if b - a <= xtol:
        return
    minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": xtol, "maxiter": 200})


def _search_1d(ev: _Evaluator, lo: float, hi: float, n_grid: int, xtol: float) -> None:
    grid = np.linspace(lo, hi, n_grid)
    vals = [ev.objective([x]) for x in grid]
    i = int(np.argmin(vals))
    ev.phase = "refine"
    _brent(lambda x: ev.objective([x]), grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)], xtol)


def _search_nd(ev: _Evaluator, lo: np.ndarray, hi: np.ndarray, n_grid: int, xtol: float, max_cycles: int) -> None:
    k = lo.size
    axes = [np.linspace(lo[j], hi[j], n_grid) for j in range(k)]
    # snake order: consecutive grid points are neighbours (good warm starts)
    pts = []
    for cell in itertools.product(range(n_grid), repeat=k):
        idx = list(cell)
        for j in range(1, k):
            if sum(idx[:j]) % 2:
                idx[j] = n_grid - 1 - idx[j]
        pts.append(np.array([axes[j][idx[j]] for j in range(k)]))
    vals = [ev.objective(x) for x in pts]
    x = pts[int(np.argmin(vals))].copy()
    step = (hi - lo) / (n_grid - 1)
    ev.phase = "refine"
    for _ in range(max_cycles):
        x_old = x.copy()
        for j in range(k):
            a, b = max(lo[j], x[j] - step[j]), min(hi[j], x[j] + step[j])

            def f(t, j=j):
                y = x.copy()
                y[j] = t
                return ev.objective(y)

            _brent(f, a, b, xtol)
            # move to the best converged point of this line (the current x included)
            cand = [
                (lx, rec)
                for lx, _, rec in ev.solved
                if ev._ok(rec) and np.allclose(np.delete(lx, j), np.delete(x, j), rtol=0, atol=1e-12)
            ]
            if cand:
                lx, _ = min(cand, key=lambda c: ev.sign * c[1].value)
                x = lx.copy()
        move = np.abs(x - x_old)
        if np.all(move <= xtol):
            break
        step = np.minimum(step, np.maximum(2.0 * move, 5.0 * xtol))


# ------------------------------------------------------------------------------ entry point
def optimize(
    params: Params,
    target: str,
    over: str | Sequence[str],
    *,
    bounds: Mapping[str, Sequence[float]] | None = None,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    tol: float = DEFAULT_XTOL,
    max_solves: int = 300,
    maximize: bool | None = None,
    n_grid: int | None = None,
    max_cycles: int = 8,
    solver_tol: float = 1e-7,
    max_iter: int = 500,
    warn: bool = True,
    on_solve: Callable[[SolveRecord], None] | None = None,
) -> OptimizeResult:
    """Optimise a state-evolution prediction over lam, lam_ft and/or beta (log-scale search).

    Args:
        params: the model parameters; the searched fields are replaced, the others are fixed.
        target: 'finetune_test_error' (E', eq. 73; minimised), 'pretrain_test_error' (E, eqs. 19,
            55; minimised; depends on lam only) or 'overlap' (o_w; maximised).
        over: hyperparameters to search, a tuple (or comma-separated string) of 1-3 names
            from ('lam', 'lam_ft', 'beta').
        bounds: {name: (low, high)} with 0 < low < high < inf; defaults :data:`DEFAULT_BOUNDS`
            (lam, lam_ft in [1e-3, 10], beta in [0.3, 3]); for lora_rank integers
            1 <= low <= high <= :func:`max_lora_rank` (default 1..8, cut at that limit).
        n_mc: Monte-Carlo samples, the same for every solve.
        seed: their seed, the same for every solve.
        tol: absolute tolerance on log10 of each hyperparameter (default 0.01, see module doc).
        max_solves: budget of state-evolution solves; the search stops there (flagged). With
            lora_rank searched, the budget of each rank's continuous search.
        maximize: override the direction (default: maximise the overlap, minimise errors).
        n_grid: coarse-grid points per dimension (default 7, 5, 4 for 1-, 2-, 3-D).
        max_cycles: coordinate-descent cycles (2-D, 3-D).
        solver_tol: fixed-point tolerance of each solve.
        max_iter: fixed-point iteration cap of each solve.
        warn: emit a NonConvergenceWarning when solves did not converge.
        on_solve: called with each solve's record as it is made (progress display).

    Returns:
        OptimizeResult (frozen).
    """
    t0 = time.perf_counter()
    if not isinstance(params, Params):
        raise ParamError(f"params must be a hdlora.Params, got {type(params).__name__}")
    if target not in TARGETS:
        raise ParamError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    over = _check_over(over)
    if RANK in over and target != "pretrain_test_error":
        return _optimize_over_rank(
            params,
            target,
            over,
            bounds=bounds,
            n_mc=n_mc,
            seed=seed,
            tol=tol,
            max_solves=max_solves,
            maximize=maximize,
            n_grid=n_grid,
            max_cycles=max_cycles,
            solver_tol=solver_tol,
            max_iter=max_iter,
            warn=warn,
            on_solve=on_solve,
        )
    if target == "pretrain_test_error" and over != ("lam",):
        raise ParamError(
            "target pretrain_test_error depends on lam only (pre-training, Result 4, does not see "
            f"lam_ft nor the recalibration beta): search over=('lam',), got {list(over)}"
        )
    bnd = _check_bounds(over, bounds)
    if maximize is None:
        maximize = TARGETS[target]
    elif not isinstance(maximize, bool):
        raise ParamError(f"maximize must be True, False or None, got {maximize!r}")
    if isinstance(n_mc, bool) or not isinstance(n_mc, int) or n_mc < 100:
        raise ParamError(f"n_mc must be an integer >= 100, got {n_mc!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ParamError(f"tol (on log10 of the hyperparameters) must be > 0, got {tol!r}")
    k = len(over)
    n_grid = DEFAULT_GRID[k] if n_grid is None else n_grid
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 3:
        raise ParamError(f"n_grid must be an integer >= 3, got {n_grid!r}")
    if isinstance(max_solves, bool) or not isinstance(max_solves, int) or max_solves < n_grid**k:
        raise ParamError(
            f"max_solves must be an integer >= n_grid^{k} = {n_grid**k} (the coarse grid), got {max_solves!r}"
        )

    ev = _Evaluator(
        params, target, over, maximize, n_mc=n_mc, seed=seed, tol=solver_tol, max_iter=max_iter, max_solves=max_solves
    )
    ev.on_solve = on_solve
    lo = np.array([math.log10(bnd[n][0]) for n in over])
    hi = np.array([math.log10(bnd[n][1]) for n in over])
    exhausted = False
    try:
        if k == 1:
            _search_1d(ev, lo[0], hi[0], n_grid, tol)
        else:
            _search_nd(ev, lo, hi, n_grid, tol, max_cycles)
    except _BudgetExhausted:
        exhausted = True

    lx, res, rec = ev.best()
    records = tuple(ev.records)
    n_bad = sum(not ev._ok(r) for r in records)
    converged = ev._ok(rec)
    if warn and not converged:
        warnings.warn(
            f"optimize: no state-evolution solve converged ({len(records)} solves); the returned "
            f"{target} = {rec.value:.6g} is not a converged prediction",
            NonConvergenceWarning,
            stacklevel=2,
        )
    elif warn and n_bad:
        warnings.warn(
            f"optimize: {n_bad} of {len(records)} solves did not converge (excluded from the optimum)",
            NonConvergenceWarning,
            stacklevel=2,
        )
    if warn and exhausted:
        warnings.warn(
            f"optimize: stopped at max_solves = {max_solves} before reaching tol = {tol}", RuntimeWarning, stacklevel=2
        )
    at_bound = {n: bool(lx[j] - lo[j] <= tol or hi[j] - lx[j] <= tol) for j, n in enumerate(over)}
    if res is None:
        solution, se = {}, math.nan
    else:
        solution = res.to_dict()
        se = (
            float(getattr(res, "mc_se", {}).get(target, math.nan))
            if hasattr(res, "mc_se")
            else (0.0 if getattr(res, "method", "") == "exact" else math.nan)
        )
    return OptimizeResult(
        target=target,
        maximize=maximize,
        over=over,
        optimum=dict(rec.point),
        value=rec.value,
        value_se=se,
        converged=converged,
        all_converged=n_bad == 0,
        n_solves=len(records),
        n_not_converged=n_bad,
        at_bound=at_bound,
        budget_exhausted=exhausted,
        records=records,
        bounds=bnd,
        xtol=float(tol),
        n_grid=n_grid,
        n_mc=n_mc,
        seed=seed,
        params=params.replace(**rec.point).to_dict(),
        solution=solution,
        wall_time=time.perf_counter() - t0,
    )


# ------------------------------------------------------------------------------ the rank axis
def max_lora_rank(params: Params) -> int:
    """The largest LoRA rank the rank-r theory solves at these parameters: lora_rank * tokens <= MAX_PROX_DIM
    (the per-sample dimension of the rank-r prox, :data:`hdlora.theory.prox_rank_r.MAX_PROX_DIM`), and
    lora_rank <= :data:`hdlora.params.MAX_RANK`."""
    from ..params import MAX_RANK
    from ..theory.prox_rank_r import MAX_PROX_DIM

    return int(min(MAX_RANK, MAX_PROX_DIM // params.tokens))


def rank_bounds(params: Params, b: Sequence[float] | None) -> tuple[int, int]:
    """Validated integer interval (low, high) of the LoRA rank; ParamError (one line) otherwise."""
    from ..theory.prox_rank_r import MAX_PROX_DIM

    limit = max_lora_rank(params)
    if b is None:
        return DEFAULT_RANK_BOUNDS[0], min(DEFAULT_RANK_BOUNDS[1], limit)
    hint = (
        f"lora_rank bounds must be integers 1 <= low <= high <= {limit} (the rank-r theory needs lora_rank * tokens "
        f"<= {MAX_PROX_DIM}, tokens = {params.tokens}), e.g. --bounds lora_rank=1:{min(DEFAULT_RANK_BOUNDS[1], limit)}"
    )
    try:
        lo, hi = (float(x) for x in b)
    except (TypeError, ValueError):
        raise ParamError(f"{hint}; got {b!r}") from None
    if not all(math.isfinite(x) and x == int(x) for x in (lo, hi)) or not 1 <= lo <= hi <= limit:
        raise ParamError(f"{hint}; got ({lo:g}, {hi:g})")
    return int(lo), int(hi)


def _rank_entry(r: int, sub: OptimizeResult) -> dict[str, Any]:
    sol = sub.solution or {}
    return {
        RANK: r,
        "value": sub.value,
        "value_se": sub.value_se,
        "converged": sub.converged,
        "optimum": {k: v for k, v in sub.optimum.items()},
        "winner": sol.get("winner", ""),
        "winner_status": sol.get("winner_status", ""),
        "replicon_ok": sol.get("replicon_ok"),
        "overlap": sol.get("overlap", math.nan),
        "finetune_test_error": sol.get("finetune_test_error", math.nan),
        "n_solves": sub.n_solves,
    }


def _optimize_over_rank(
    params: Params,
    target: str,
    over: tuple[str, ...],
    *,
    bounds: Mapping[str, Sequence[float]] | None,
    n_mc: int,
    seed: int,
    tol: float,
    max_solves: int,
    maximize: bool | None,
    n_grid: int | None,
    max_cycles: int,
    solver_tol: float,
    max_iter: int,
    warn: bool,
    on_solve: Callable[[SolveRecord], None] | None,
) -> OptimizeResult:
    """Every LoRA rank of the interval solved; the continuous hyperparameters (if any) tuned per rank."""
    t0 = time.perf_counter()
    bounds = dict(bounds or {})
    lo, hi = rank_bounds(params, bounds.pop(RANK, None))
    cont = tuple(n for n in over if n != RANK)
    bnd = _check_bounds(over, bounds)  # the continuous ones (and unknown names refused)
    if maximize is None:
        maximize = TARGETS[target]
    elif not isinstance(maximize, bool):
        raise ParamError(f"maximize must be True, False or None, got {maximize!r}")
    if isinstance(n_mc, bool) or not isinstance(n_mc, int) or n_mc < 100:
        raise ParamError(f"n_mc must be an integer >= 100, got {n_mc!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ParamError(f"tol (on log10 of the hyperparameters) must be > 0, got {tol!r}")
    sign = -1.0 if maximize else 1.0
    per: list[dict[str, Any]] = []
    subs: dict[int, OptimizeResult] = {}
    records: list[SolveRecord] = []
    for r in range(lo, hi + 1):
        p = params.replace(lora_rank=r)

        def tag(rec: SolveRecord, r: int = r) -> SolveRecord:
            out = SolveRecord(
                point={**rec.point, RANK: r},
                value=rec.value,
                converged=rec.converged,
                iterations=rec.iterations,
                wall_time=rec.wall_time,
                phase=rec.phase,
            )
            if on_solve is not None:
                on_solve(out)
            return out

        if cont:
            got: list[SolveRecord] = []

            def collect(rec: SolveRecord, got: list[SolveRecord] = got) -> None:
                got.append(tag(rec))

            sub = optimize(
                p,
                target,
                cont,
                bounds={n: bnd[n] for n in cont},
                n_mc=n_mc,
                seed=seed,
                tol=tol,
                max_solves=max_solves,
                maximize=maximize,
                n_grid=n_grid,
                max_cycles=max_cycles,
                solver_tol=solver_tol,
                max_iter=max_iter,
                warn=False,
                on_solve=collect,
            )
            records += got
        else:
            sub = _single(p, target, maximize, n_mc=n_mc, seed=seed, solver_tol=solver_tol, max_iter=max_iter)
            records += [tag(rec) for rec in sub.records]
        subs[r] = sub
        per.append(_rank_entry(r, sub))

    def good(e: dict[str, Any]) -> bool:
        return bool(e["converged"]) and math.isfinite(e["value"])

    pool = [e for e in per if good(e)] or [e for e in per if math.isfinite(e["value"])] or per[:1]
    best = min(pool, key=lambda e: sign * e["value"] if math.isfinite(e["value"]) else math.inf)
    r_best = int(best[RANK])
    sub = subs[r_best]
    converged = good(best)
    flat = tuple(
        {RANK: e[RANK], "value": e["value"]}
        for e in per
        if converged and good(e) and abs(e["value"] - best["value"]) <= FLAT_REL * abs(best["value"])
    )
    n_bad = sum(not (r.converged and math.isfinite(r.value)) for r in records)
    if warn and not converged:
        warnings.warn(
            f"optimize: no rank's state-evolution solve converged ({len(records)} solves); the returned "
            f"{target} = {best['value']:.6g} is not a converged prediction",
            NonConvergenceWarning,
            stacklevel=3,
        )
    elif warn and n_bad:
        warnings.warn(
            f"optimize: {n_bad} of {len(records)} solves did not converge (excluded from the optimum)",
            NonConvergenceWarning,
            stacklevel=3,
        )
    if warn and any(s.budget_exhausted for s in subs.values()):
        warnings.warn(
            f"optimize: some rank's search stopped at max_solves = {max_solves} before reaching tol = {tol}",
            RuntimeWarning,
            stacklevel=3,
        )
    optimum: dict[str, Any] = {RANK: r_best, **sub.optimum}
    at_bound = {RANK: bool(lo < hi and r_best in (lo, hi)), **{n: sub.at_bound.get(n, False) for n in cont}}
    return OptimizeResult(
        target=target,
        maximize=maximize,
        over=over,
        optimum=optimum,
        value=best["value"],
        value_se=sub.value_se,
        converged=converged,
        all_converged=n_bad == 0,
        n_solves=len(records),
        n_not_converged=n_bad,
        at_bound=at_bound,
        budget_exhausted=any(s.budget_exhausted for s in subs.values()),
        records=tuple(records),
        bounds={RANK: (lo, hi), **bnd},
        xtol=float(tol),
        n_grid=sub.n_grid,
        n_mc=n_mc,
        seed=seed,
        params=params.replace(**optimum).to_dict(),
        solution=sub.solution,
        wall_time=time.perf_counter() - t0,
        per_rank=tuple(per),
        flat_ranks=flat,
    )


def _single(
    params: Params, target: str, maximize: bool, *, n_mc: int, seed: int, solver_tol: float, max_iter: int
) -> OptimizeResult:
    """One solve at ``params`` (nothing searched), as an OptimizeResult (no search, no warnings)."""
    t0 = time.perf_counter()
    ev = _Evaluator(params, target, (), maximize, n_mc=n_mc, seed=seed, tol=solver_tol, max_iter=max_iter, max_solves=1)
    ev.value(np.zeros(0))
    _, res, rec = ev.best()
    se = math.nan
    if res is not None and hasattr(res, "mc_se"):
        se = float(res.mc_se.get(target, math.nan))
    return OptimizeResult(
        target=target,
        maximize=maximize,
        over=(),
        optimum={},
        value=rec.value,
        value_se=se,
        converged=ev._ok(rec),
        all_converged=ev._ok(rec),
        n_solves=1,
        n_not_converged=0 if ev._ok(rec) else 1,
        at_bound={},
        budget_exhausted=False,
        records=(rec,),
        bounds={},
        xtol=0.0,
        n_grid=0,
        n_mc=n_mc,
        seed=seed,
        params=params.to_dict(),
        solution={} if res is None else res.to_dict(),
        wall_time=time.perf_counter() - t0,
    )
