"""The engine that owns a state-evolution solve: iteration, acceleration, branches, status.

A *stage* (pre-training, Result 4; fine-tuning, Result 5; the Bayes-optimal stages, App. B)
is a set of pure functions over an explicit state (the optax shape)::

    init(params, samples)   -> carry                    # fixed samples, warm-start data
    update(x, carry)        -> (x_new, carry, aux)      # one state-evolution step F(x)
    verify(x, carry)        -> (carry, changed)         # global search at a candidate fixed point
    objective(x, carry)     -> (value, per_sample|None) # training objective (zero-temperature free energy)
    domain(x)               -> bool                     # e.g. q > m^2, v > 0

``x`` is a 1-D float64 vector (``Stage.names`` names its components).  The carry may hold
warm starts or tracked alternative maxima, but it must change only the *cost* of ``update``,
never its value (:func:`check_carry_independence`): otherwise Anderson mixing combines
evaluations of different maps.  When ``verify`` finds a better basin the map has changed:
it returns ``changed=True`` and the engine resets its history.

:func:`solve_stage` owns everything else: damped iteration with Anderson mixing (regularised
least squares, restarted on stagnation or ill-conditioning, with a fallback to damped iteration),
the rejection of steps that leave the domain (rejected and the history reset, never clipped into
it), a stall rule that catches divergent oscillation (the residual not below its running minimum
for ``stall`` steps: the relative residual of an oscillation whose amplitude grows can stay flat,
so a "rising residual" rule never fires), several named starts solved to :class:`Branch`
records, the choice among branches (lowest objective on the same samples, paired difference
with its standard error, undecided within 2 s.e., a replica-unstable branch never wins
silently), an honest status per branch and overall, and the warnings.

Residuals are relative, max_i |F(x)_i - x_i| / max(1, |x_i|), as in
:mod:`hdlora.theory.fixed_point`, and always measured at the returned point.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .fixed_point import NonConvergenceWarning

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from ..params import Params

__all__ = [
    "Stage",
    "Branch",
    "Comparison",
    "StageResult",
    "MCResolution",
    "solve_stage",
    "solve_one",
    "choose_branch",
    "compare_branches",
    "check_carry_independence",
    "CarryDependenceError",
    "BranchChoiceWarning",
    "CONVERGED",
    "CONVERGED_MC",
    "REPLICA_UNSTABLE",
    "NOT_CONVERGED",
    "STATUSES",
    "START_NAMES",
    "residual",
]

CONVERGED = "converged"
CONVERGED_MC = "converged to Monte-Carlo resolution"
REPLICA_UNSTABLE = "replica-unstable"
NOT_CONVERGED = "not converged"
STATUSES = (CONVERGED, CONVERGED_MC, REPLICA_UNSTABLE, NOT_CONVERGED)
#: conventional names of the starts (any names are accepted)
START_NAMES = ("uninformed", "informed", "warm")
#: the residual a ``converged`` point must reach whatever the requested tol
CONVERGED_CAP = 1e-3
#: ``stop_early``'s map-cycle rule: from CYCLE_MIN candidates whose verify changed the map on, stop when the smallest
#: new-map residual of the last CYCLE_WINDOW such candidates is not below CYCLE_PROGRESS x the smallest before them
CYCLE_MIN, CYCLE_WINDOW, CYCLE_PROGRESS = 6, 3, 0.5


class BranchChoiceWarning(RuntimeWarning):
    """The branch choice is not clear-cut (undecided, or a lower branch is replica-unstable)."""


class CarryDependenceError(AssertionError):
    """``update(x, carry)`` depends on the carry (see :func:`check_carry_independence`)."""


@dataclass(frozen=True)
class MCResolution:
    """What a stage's ``mc_resolution`` hook returns: the residual floor its Monte-Carlo samples explain.

    Attributes:
        floor: the largest residual the evidence explains (e.g. the jump of the update map caused by
            samples switching between near-degenerate maxima).
        evidence: the counts behind it (e.g. number of switching samples, size of their jump).
    """

    floor: float
    evidence: Mapping[str, Any] = field(default_factory=dict)


def _no_verify(x: np.ndarray, carry: Any):
    return carry, False


def _no_objective(x: np.ndarray, carry: Any):
    return math.nan, None


def _finite(x: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(x)))


@dataclass(frozen=True)
class Stage:
    """A state evolution as pure functions (see the module docstring).

    Attributes:
        init: (params, samples) -> carry.
        update: (x, carry) -> (F(x), carry, aux).  With ``inner_tol=True`` it is called as
            update(x, carry, inner_tol=t) with t = 1e-2 x the current residual (the prox tolerance
            follows the residual).
        verify: (x, carry) -> (carry, changed); default: nothing to verify.
        objective: (x, carry) -> (value, per-sample values or None); default: not available (nan).
        domain: x -> bool; default: all components finite.
        replicon: (x, carry, aux) -> float, the replicon (>= 1: replica-unstable); default: aux["replicon"]
            when aux is a mapping that has it, else not available.
        mc_resolution: (x, carry, aux, residual) -> MCResolution or None; default: not available.
        names: names of the components of x (for the record).
        name: used in warnings.
        inner_tol: see ``update``.
    """

    init: Callable[[Any, Any], Any]
    update: Callable[..., tuple]
    verify: Callable[[np.ndarray, Any], tuple] = _no_verify
    objective: Callable[[np.ndarray, Any], tuple] = _no_objective
    domain: Callable[[np.ndarray], bool] = _finite
    replicon: Callable[[np.ndarray, Any, Any], float] | None = None
    mc_resolution: Callable[[np.ndarray, Any, Any, float], MCResolution | None] | None = None
    names: tuple[str, ...] | None = None
    name: str = "state evolution"
    inner_tol: bool = False


@dataclass(frozen=True)
class Branch:
    """One start solved to the end.

    Attributes:
        name: the start's name (uninformed, informed, warm, ...).
        x: the returned point, always inside the domain and evaluated (F(x) known): the converged point, else
            the evaluated point with the smallest residual.
        status: one of STATUSES.
        residual: the relative residual of F at x (nan if F(x) was not finite).
        iterations: evaluations of ``update``.
        history: residual after each evaluation.
        events: (iteration, what) for every restart, rejection, fallback, mixing change, verify change.
        objective: training objective at x (nan if not available).
        per_sample: per-sample objective values (for paired comparison), or None.
        replicon: replicon at x, or nan if not available.
        mc: the MCResolution explanation when status is CONVERGED_MC (else None).
        aux: the aux of the last evaluation (at x).
        carry: the final carry.
        samples_key: which samples the branch was solved on (only equal keys are compared).
        n_rejected: accelerated steps rejected (left the domain, or non-finite).
        n_restarts: Anderson history resets.
        mixing: damping in force at the end.
        reason: why not converged ('' otherwise).
    """

    name: str
    x: np.ndarray
    status: str
    residual: float
    iterations: int
    history: tuple[float, ...] = field(repr=False)
    events: tuple[tuple[int, str], ...] = field(repr=False)
    objective: float = math.nan
    per_sample: np.ndarray | None = field(default=None, repr=False)
    replicon: float = math.nan
    mc: MCResolution | None = None
    aux: Any = field(default=None, repr=False)
    carry: Any = field(default=None, repr=False)
    samples_key: Any = None
    n_rejected: int = 0
    n_restarts: int = 0
    mixing: float = 1.0
    reason: str = ""

    @property
    def solved(self) -> bool:
        """Converged (to tol or to Monte-Carlo resolution), whatever its stability."""
        return self.status != NOT_CONVERGED


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of a branch with the chosen one: diff = objective(other) - objective(chosen).

    verdict: 'higher' (diff > 2 se), 'lower' (diff < -2 se: only for a replica-unstable other),
    'undecided' (|diff| <= 2 se), 'same point' (the two states coincide).
    """

    chosen: str
    other: str
    diff: float
    se: float
    verdict: str


@dataclass(frozen=True)
class StageResult:
    """Outcome of :func:`solve_stage`: every branch, the chosen one, the comparisons and the status."""

    branches: dict[str, Branch]
    chosen: str
    status: str
    comparisons: tuple[Comparison, ...]
    flags: tuple[str, ...]
    names: tuple[str, ...] | None = None

    @property
    def branch(self) -> Branch:
        return self.branches[self.chosen]

    @property
    def x(self) -> np.ndarray:
        return self.branch.x

    @property
    def state(self) -> dict[str, float]:
        names = self.names or tuple(f"x{i}" for i in range(self.x.size))
        return dict(zip(names, self.x.tolist()))

    @property
    def converged(self) -> bool:
        return self.status in (CONVERGED, CONVERGED_MC)

    @property
    def residual(self) -> float:
        return self.branch.residual

    @property
    def iterations(self) -> int:
        return sum(b.iterations for b in self.branches.values())

    @property
    def undecided(self) -> bool:
        return any(c.verdict == "undecided" for c in self.comparisons)


def residual(new: np.ndarray, old: np.ndarray) -> float:
    """max_i |new_i - old_i| / max(1, |old_i|); nan if either is not finite."""
    new, old = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    if not (np.all(np.isfinite(new)) and np.all(np.isfinite(old))):
        return math.nan
    return float(np.max(np.abs(new - old) / np.maximum(1.0, np.abs(old)))) if new.size else 0.0


# ------------------------------------------------------------------------------ Anderson mixing
def _anderson_step(X: list, G: list, mixing: float, reg: float, cond_max: float):
    """Type-II Anderson step from the memory (x_j, g_j = F(x_j) - x_j), oldest first.

    gamma = argmin ||W (g_k - dG gamma)||^2 + reg tr(dG^T W^2 dG)/m ||gamma||^2 (W = 1/max(1, |x_k|), the
    residual's scaling); x_new = x_k + mixing g_k - (dX + mixing dG) gamma.  Oldest columns are dropped while
    the regularised normal matrix has condition number > cond_max.  Returns (x_new, columns used) or
    (None, 0) when no column is usable.
    """
    xk, gk = X[-1], G[-1]
    w = 1.0 / np.maximum(1.0, np.abs(xk))
    dX = np.stack([X[j + 1] - X[j] for j in range(len(X) - 1)], axis=1)
    dG = np.stack([G[j + 1] - G[j] for j in range(len(G) - 1)], axis=1)
    while dG.shape[1] > 0:
        A = w[:, None] * dG
        N = A.T @ A
        m = N.shape[0]
        lam = reg * max(np.trace(N) / m, 1e-300)
        N = N + lam * np.eye(m)
        if np.all(np.isfinite(N)) and np.linalg.cond(N) <= cond_max:
            gamma = np.linalg.solve(N, A.T @ (w * gk))
            return xk + mixing * gk - (dX + mixing * dG) @ gamma, m
        dX, dG = dX[:, 1:], dG[:, 1:]
    return None, 0


# ------------------------------------------------------------------------------------ one branch
@dataclass(frozen=True)
class _Iteration:
    """How each start of :func:`solve_stage` is iterated: its arguments of the same names (checked there)."""

    tol: float
    max_iter: int
    mixing: float
    anderson: int
    regularization: float
    cond_max: float
    stall: int
    min_mixing: float
    growth: float
    stall_verify: int
    stop_early: bool


def _solve_branch(
    stage: Stage,
    name: str,
    x0: ArrayLike,
    params: Params,
    samples: Any,
    samples_key: Any,
    how: _Iteration,
) -> Branch:
    x = np.array(x0, dtype=np.float64).ravel()
    ctol = min(how.tol, CONVERGED_CAP)
    events: list[tuple[int, str]] = []
    history: list[float] = []
    if not (_finite(x) and stage.domain(x)):
        return Branch(
            name,
            x,
            NOT_CONVERGED,
            math.nan,
            0,
            (),
            ((0, "start outside the domain"),),
            samples_key=samples_key,
            mixing=how.mixing,
            reason="start outside the domain",
        )
    carry = stage.init(params, samples)
    X: list[np.ndarray] = []
    G: list[np.ndarray] = []
    mix = how.mixing
    use_anderson = how.anderson > 0
    best, best_abs, since_best, stall_restarts, progress = math.inf, math.inf, 0, 0, 0
    n_rejected = n_restarts = n_stall_verify = 0
    accelerated = False
    prev = None  # (x, g, res) of the last in-domain evaluation (to undo an accelerated step)
    aux: Any = None
    res = math.nan
    last_res = 1.0
    converged, reason = False, ""
    ev = None  # (x, res, aux) of the evaluation with the smallest finite residual
    cycles: list[float] = []  # the new map's residual at each candidate whose verify changed the map
    cycle_pending = False  # the next evaluation is the new map at such a candidate
    early_mc = None  # the Monte-Carlo floor that stopped a stagnating iteration (stop_early)
    hopeless = False  # stopped by the map-cycle rule (stop_early): not converged, whatever the floor

    def reset(it: int, why: str):
        nonlocal n_restarts
        if len(X) > 1:
            n_restarts += 1
        X.clear()
        G.clear()
        events.append((it, why))

    it = 0
    while it < how.max_iter:
        it += 1
        if stage.inner_tol:
            fx, carry, aux = stage.update(x, carry, inner_tol=1e-2 * last_res)
        else:
            fx, carry, aux = stage.update(x, carry)
        fx = np.asarray(fx, dtype=np.float64).ravel()
        res = residual(fx, x)
        history.append(res)
        if not math.isfinite(res) or (accelerated and prev is not None and res > how.growth * prev[2]):
            if accelerated and prev is not None:
                # the accelerated step was bad (non-finite image or residual blow-up): undo it, damped step instead
                n_rejected += 1
                reset(it, "accelerated step rejected (non-finite or residual grew): history reset")
                px, pg, _ = prev
                x = _shorten(stage, px, pg, mix)
                accelerated = False
                if x is None:
                    reason = "the damped step leaves the domain"
                    x = px
                    break
                continue
            if not math.isfinite(res):
                reason = "the update map returned non-finite values"
                break
        last_res = res
        if ev is None or res < ev[1]:
            ev = (x, res, aux)
        if cycle_pending:
            cycle_pending = False
            cycles.append(res)
            if how.stop_early and len(cycles) >= CYCLE_MIN:
                recent, before = min(cycles[-CYCLE_WINDOW:]), min(cycles[:-CYCLE_WINDOW])
                if recent > CYCLE_PROGRESS * before:
                    # the global search changes the map at every candidate and the new maps' residuals no longer fall:
                    # the iteration walks among the samples' maxima (measured at Delta = 2, lam = lam' = 1e-3:
                    # 500 iterations, not converged all the same)
                    hopeless = True
                    reason = (
                        f"the global prox search changed the map at {len(cycles)} candidate fixed points without "
                        f"progress (new-map residuals {recent:.3g} over the last {CYCLE_WINDOW}, {before:.3g} before)"
                    )
                    events.append((it, f"map cycles without progress: stopped ({reason})"))
                    break
        if res <= ctol:
            carry, changed = stage.verify(x, carry)
            if changed:
                cycle_pending = True
                reset(it, "verify changed the map: history reset")
                best, best_abs, since_best, stall_restarts, progress = math.inf, math.inf, 0, 0, 0
                accelerated, ev = False, None  # residuals of the old map no longer count
                continue  # re-evaluate x with the new map
            converged = True
            break
        g = fx - x
        prev = (x, g, res)
        # stall rule: neither the relative residual nor the absolute one max|F(x) - x| below its running minimum
        # for `stall` evaluations (a growing oscillation can keep the relative residual flat; a slow approach
        # through large |x| can make the relative residual rise while the absolute one falls)
        gabs = float(np.max(np.abs(g))) if g.size else 0.0
        if res < best or gabs < best_abs:
            best, best_abs, since_best, stall_restarts = min(res, best), min(gabs, best_abs), 0, 0
            progress += 1
        else:
            since_best, progress = since_best + 1, 0
        if progress >= 2 * how.stall and how.anderson > 0 and not use_anderson:
            # sustained progress after a fallback (e.g. the stagnation was a transient): acceleration back on
            use_anderson, progress = True, 0
            reset(it, "sustained progress: Anderson re-enabled")
        if since_best >= how.stall:
            since_best = 0
            if n_stall_verify < how.stall_verify:
                # a stagnating point is a candidate too: the samples' tracked maxima may have drifted away from the
                # global ones (a map the iteration cannot settle on); the global search resets the map if so
                n_stall_verify += 1
                carry, changed = stage.verify(x, carry)
                if changed:
                    reset(it, "stagnation: verify changed the map: history reset")
                    best, best_abs, stall_restarts, progress = math.inf, math.inf, 0, 0
                    accelerated, ev = False, None
                    continue  # re-evaluate x with the new map
            if how.stop_early and stage.mc_resolution is not None and ev is not None and ev[1] <= CONVERGED_CAP:
                # stagnation at a residual the samples' near-degenerate maxima explain: the end of max_iter
                # iterations would find the same (measured at Delta = 2, lam = lam' = 1e-2: residual 2e-5 to 5e-5
                # for 490 iterations, then converged to Monte-Carlo resolution)
                mc = stage.mc_resolution(ev[0], carry, ev[2], ev[1])
                if mc is not None and ev[1] <= mc.floor:
                    early_mc = mc
                    events.append((it, f"stagnation within the Monte-Carlo floor {mc.floor:.3g}: stopped"))
                    break
            if use_anderson and stall_restarts < 2:
                stall_restarts += 1
                reset(it, "stagnation: Anderson history reset")
            else:
                if use_anderson:
                    use_anderson = False
                    events.append((it, "stagnation after restarts: fallback to damped iteration"))
                if mix > how.min_mixing:
                    mix = max(how.min_mixing, 0.5 * mix)
                    events.append((it, f"stagnation: mixing reduced to {mix:.3g}"))
        X.append(x)
        G.append(g)
        del X[: -(how.anderson + 1)], G[: -(how.anderson + 1)]
        x_new, accelerated = None, False
        if use_anderson and len(X) >= 2:
            x_acc, used = _anderson_step(X, G, mix, how.regularization, how.cond_max)
            if used < len(X) - 1:
                del X[: len(X) - 1 - used], G[: len(G) - 1 - used]
                events.append((it, "ill-conditioned: oldest Anderson columns dropped"))
            if x_acc is not None:
                if _finite(x_acc) and stage.domain(x_acc):
                    x_new, accelerated = x_acc, True
                else:
                    n_rejected += 1
                    reset(it, "accelerated step leaves the domain: rejected, history reset")
                    X.append(x)
                    G.append(g)
        if x_new is None:
            x_new = _shorten(stage, x, g, mix)
            if x_new is None:
                reason = "the damped step leaves the domain"
                break
        x = x_new
    else:
        reason = f"not converged after {how.max_iter} iterations (residual {res:.3g} > {ctol:.3g})"
    if not converged and not reason:
        reason = f"not converged (residual {res:.3g} > {ctol:.3g})"
    if not converged and ev is not None:  # the best point evaluated, its residual measured there
        x, res, aux = ev

    if converged:
        status, mc = CONVERGED, None
    elif early_mc is not None:  # stopped at ev, whose residual the floor explains (stop_early)
        status, mc, reason = CONVERGED_MC, early_mc, ""
    else:
        status, mc = NOT_CONVERGED, None
        # the hook explains (or not) the residual at the returned point
        if stage.mc_resolution is not None and math.isfinite(res) and not hopeless:
            mc = stage.mc_resolution(x, carry, aux, res)
            if mc is not None and res <= mc.floor:
                status = CONVERGED_MC
                reason = ""
            else:
                mc = None
    rep = _replicon(stage, x, carry, aux)
    if status != NOT_CONVERGED and rep >= 1.0:
        status = REPLICA_UNSTABLE
    value, per = stage.objective(x, carry)
    per = None if per is None else np.asarray(per, dtype=np.float64).ravel()
    return Branch(
        name,
        x,
        status,
        res,
        len(history),
        tuple(history),
        tuple(events),
        objective=float(value),
        per_sample=per,
        replicon=rep,
        mc=mc,
        aux=aux,
        carry=carry,
        samples_key=samples_key,
        n_rejected=n_rejected,
        n_restarts=n_restarts,
        mixing=mix,
        reason=reason,
    )


def _shorten(stage: Stage, x: np.ndarray, g: np.ndarray, mix: float, max_halvings: int = 30):
    """The damped step x + mix g, halved until it stays in the domain (a shorter step, not a clip); None if never."""
    step = mix
    for _ in range(max_halvings):
        x_new = x + step * g
        if _finite(x_new) and stage.domain(x_new):
            return x_new
        step *= 0.5
    return None


def _replicon(stage: Stage, x: np.ndarray, carry: Any, aux: Any) -> float:
    if stage.replicon is not None:
        return float(stage.replicon(x, carry, aux))
    if isinstance(aux, Mapping) and "replicon" in aux:
        return float(aux["replicon"])
    return math.nan


# ------------------------------------------------------------------------------- branch choice
def compare_branches(a: Branch, b: Branch) -> tuple[float, float]:
    """Paired difference objective(b) - objective(a) and its standard error.

    With per-sample objectives on both (same samples, same length): mean and s.e. of the per-sample
    differences; otherwise the plain difference with s.e. 0 (deterministic objectives).
    """
    if a.samples_key != b.samples_key:
        raise ValueError(
            f"branches {a.name!r} and {b.name!r} were solved on different samples "
            f"({a.samples_key!r} vs {b.samples_key!r}): their objectives cannot be compared"
        )
    if a.per_sample is not None and b.per_sample is not None:
        if a.per_sample.shape != b.per_sample.shape:
            raise ValueError(f"branches {a.name!r} and {b.name!r}: per-sample objectives of different lengths")
        d = b.per_sample - a.per_sample
        se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
        return float(b.objective - a.objective), se
    return float(b.objective - a.objective), 0.0


def _same_point(a: Branch, b: Branch, tol: float) -> bool:
    scale = max(1.0, float(np.max(np.abs(b.x)))) if b.x.size else 1.0
    return a.x.shape == b.x.shape and (a.x.size == 0 or float(np.max(np.abs(a.x - b.x))) <= tol * scale)


def choose_branch(
    branches: Sequence[Branch], *, same_point_tol: float = 1e-6
) -> tuple[str, str, tuple[Comparison, ...], tuple[str, ...]]:
    """The branch choice: (chosen name, status, comparisons, flags).

    Candidates are the solved branches with a finite objective.  The chosen one is the lowest objective
    among the replica-stable candidates (status converged or converged to Monte-Carlo resolution); if
    there is none, the lowest replica-unstable one (status replica-unstable); if nothing is solved, the
    branch with the smallest residual (status not converged).  Every other candidate is compared with
    it (:func:`compare_branches`): 'undecided' when |diff| <= 2 s.e. (and the states differ).  A
    replica-unstable branch with a lower objective is flagged, never chosen silently.
    """
    if not branches:
        raise ValueError("no branches to choose from")
    keys = {repr(b.samples_key) for b in branches}
    if len(keys) > 1:
        raise ValueError(f"compare only branches solved on the same samples; got sample keys {sorted(keys)}")
    flags: list[str] = []
    solved = [b for b in branches if b.solved]
    cands = [b for b in solved if math.isfinite(b.objective)]
    if not solved:
        best = min(branches, key=lambda b: b.residual if math.isfinite(b.residual) else math.inf)
        return best.name, NOT_CONVERGED, (), ("no branch converged",)
    flags += [f"not converged: branch {b.name!r} ({b.reason})" for b in branches if not b.solved]
    if not cands:  # solved but no objective: only one branch can be reported unambiguously
        stable = [b for b in solved if b.status != REPLICA_UNSTABLE]
        best = min(stable or solved, key=lambda b: b.residual)
        if any(not _same_point(b, best, same_point_tol) for b in solved):
            flags.append("no objective: distinct branches not compared")
        return best.name, best.status, (), tuple(flags)
    stable = [b for b in cands if b.status != REPLICA_UNSTABLE]
    best = min(stable or cands, key=lambda b: b.objective)
    if not stable:
        flags.append("no replica-stable branch")
    comps = []
    for b in cands:
        if b is best:
            continue
        diff, se = compare_branches(best, b)
        if _same_point(b, best, same_point_tol):
            verdict = "same point"
        elif abs(diff) <= 2.0 * se:
            verdict = "undecided"
        else:
            verdict = "higher" if diff > 0 else "lower"
        comps.append(Comparison(best.name, b.name, diff, se, verdict))
        if b.status == REPLICA_UNSTABLE and verdict in ("lower", "undecided"):
            flags.append(
                f"branch {b.name!r} has a {'lower' if verdict == 'lower' else 'comparable'} objective "
                f"({b.objective:.6g} vs {best.objective:.6g}) but is replica-unstable "
                f"(replicon {b.replicon:.3g}): not chosen"
            )
    if any(c.verdict == "undecided" for c in comps):
        flags.append(
            "undecided: "
            + ", ".join(
                f"{c.other!r} - {c.chosen!r} = {c.diff:.3g} +- {c.se:.2g}" for c in comps if c.verdict == "undecided"
            )
        )
    return best.name, best.status, tuple(comps), tuple(flags)


# ----------------------------------------------------------------------------------- the solve
def solve_stage(
    stage: Stage,
    starts: Mapping[str, Any],
    *,
    params: Any = None,
    samples: Any = None,
    samples_key: Any = "default",
    tol: float = 1e-8,
    max_iter: int = 500,
    mixing: float = 1.0,
    anderson: int = 5,
    regularization: float = 1e-10,
    cond_max: float = 1e12,
    stall: int = 8,
    min_mixing: float = 0.02,
    growth: float = 1e3,
    same_point_tol: float = 1e-6,
    stall_verify: int = 4,
    stop_early: bool = False,
    warn: bool = True,
) -> StageResult:
    """Solve a stage from every named start and choose among the branches.

    Args:
        stage: the Stage.
        starts: name -> starting state (1-D array-like), e.g. {'uninformed': ..., 'informed': ..., 'warm': ...}.
            Each start gets its own carry from ``stage.init(params, samples)``, on the same samples.
        params: passed to ``stage.init``.
        samples: passed to ``stage.init``.
        samples_key: identifies the samples (only branches with equal keys are compared).
        tol: residual tolerance; ``converged`` requires residual <= min(tol, 1e-3) at the returned point.
        max_iter: evaluations of ``update`` per start.
        mixing: damping of the plain step x + mixing (F(x) - x), in (0, 1].
        anderson: Anderson memory (0: plain damped iteration).
        regularization: Tikhonov weight of the Anderson least squares (relative to the mean diagonal).
        cond_max: largest condition number of the Anderson normal matrix (oldest columns dropped beyond).
        stall: evaluations without a new minimum of the residual before acting (Anderson restart, twice;
            then fallback to damped iteration and halving of the mixing, down to ``min_mixing``); after
            2 x stall evaluations that each set a new minimum, a fallen-back Anderson is switched on again.
        growth: an accelerated step whose residual exceeds ``growth`` x the previous one is undone.
        stall_verify: on stagnation, ``verify`` is also called (up to this many times per start): a point the
            iteration cannot settle on is a candidate too, and the map may have drifted (e.g. samples tracked in
            non-global prox maxima); a change resets the history.
        stop_early: two rules that end a branch before ``max_iter`` (for stages with ``mc_resolution``): at a
            stagnation (after its ``verify``), a best residual <= CONVERGED_CAP that the stage's Monte-Carlo floor
            explains ends it as converged to Monte-Carlo resolution (what the end of the iterations would report);
            and once ``verify`` has changed the map at CYCLE_MIN candidates, new-map residuals that no longer fall
            (the smallest of the last CYCLE_WINDOW not below CYCLE_PROGRESS x the smallest before) end it as not
            converged.
        same_point_tol: branches whose states differ by less than this (relative) are the same point.
        warn: emit NonConvergenceWarning / BranchChoiceWarning.

    Returns:
        StageResult.
    """
    if not (0.0 < mixing <= 1.0):
        raise ValueError(f"mixing must be in (0, 1], got {mixing}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if anderson < 0:
        raise ValueError(f"anderson (memory) must be >= 0, got {anderson}")
    if stall < 1:
        raise ValueError(f"stall must be >= 1, got {stall}")
    if not starts:
        raise ValueError("give at least one start")
    how = _Iteration(
        tol=tol,
        max_iter=max_iter,
        mixing=mixing,
        anderson=anderson,
        regularization=regularization,
        cond_max=cond_max,
        stall=stall,
        min_mixing=min_mixing,
        growth=growth,
        stall_verify=stall_verify,
        stop_early=stop_early,
    )
    branches = {name: _solve_branch(stage, name, x0, params, samples, samples_key, how) for name, x0 in starts.items()}
    chosen, status, comps, flags = choose_branch(list(branches.values()), same_point_tol=same_point_tol)
    result = StageResult(branches, chosen, status, comps, flags, stage.names)
    if warn:
        b = result.branch
        if status == NOT_CONVERGED:
            warnings.warn(
                f"{stage.name}: not converged from any start ({', '.join(branches)}); best "
                f"{chosen!r}: residual {b.residual:.3g} after {b.iterations} iterations ({b.reason})",
                NonConvergenceWarning,
                stacklevel=2,
            )
        for f in flags:
            if f != "no branch converged" and not f.startswith("not converged:"):
                warnings.warn(f"{stage.name}: {f}", BranchChoiceWarning, stacklevel=2)
    return result


def solve_one(
    stage: Stage,
    x0: ArrayLike,
    *,
    tol: float,
    max_iter: int,
    mixing: float,
    anderson: int = 3,
    min_mixing: float = 0.02,
    stall_verify: int = 4,
    stop_early: bool = False,
) -> Branch:
    """One start of a stage, no warnings (the stage reports its own): the branch.  Anderson memory 3 and the
    mixing floor min(min_mixing, mixing) are the stages' settings (see :func:`solve_stage` for the arguments)."""
    return solve_stage(
        stage,
        {"start": x0},
        tol=tol,
        max_iter=max_iter,
        mixing=mixing,
        anderson=anderson,
        min_mixing=min(min_mixing, mixing),
        stall_verify=stall_verify,
        stop_early=stop_early,
        warn=False,
    ).branch


# ------------------------------------------------------------------------------ the carry trap
def check_carry_independence(
    stage: Stage, x: np.ndarray, carries: Sequence[Any], *, rtol: float = 1e-10, atol: float = 1e-12
) -> float:
    """Check that ``update(x, carry)`` returns the same state for every carry (to rtol/atol).

    The carry (warm starts, tracked maxima) may change the cost of an update, never which maximum it
    returns; else Anderson mixing combines evaluations of different maps.  Returns the largest
    deviation found; raises CarryDependenceError if it exceeds atol + rtol |F(x)|.
    """
    if len(carries) < 2:
        raise ValueError("give at least two carries to compare")
    x = np.asarray(x, dtype=np.float64).ravel()
    outs = [np.asarray(stage.update(x.copy(), c)[0], dtype=np.float64).ravel() for c in carries]
    ref = outs[0]
    worst = 0.0
    for i, o in enumerate(outs[1:], 1):
        dev = np.abs(o - ref)
        worst = max(worst, float(np.max(dev)) if dev.size else 0.0)
        if not np.all(dev <= atol + rtol * np.abs(ref)):
            raise CarryDependenceError(
                f"{stage.name}: update(x, carry) depends on the carry: carry 0 -> {ref.tolist()}, "
                f"carry {i} -> {o.tolist()} (max deviation {float(np.max(dev)):.3g})"
            )
    return worst
