"""Named-state front end of the fixed-point engine (:mod:`hdlora.theory.engine`).

Every stage (pre-training, Result 4; fine-tuning, Result 5; Bayes-optimal,
Appendix B) supplies an *update map* ``F`` from a named state (a mapping of
order parameters to floats) to a new state; :func:`iterate` hands it to the
engine as a one-start stage, which owns the damping, the Anderson acceleration,
the domain, the tolerance, the iteration record and the ``converged`` flag.
No stage re-implements the loop.

The map must be deterministic (fixed Monte-Carlo samples, drawn once per
solve) so that a true fixed point exists and the residual can go to zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class NonConvergenceWarning(RuntimeWarning):
    """An iterative solve stopped before reaching its tolerance."""


@dataclass(frozen=True)
class FixedPointResult:
    """Outcome of :func:`iterate`.

    Attributes:
        state: the last iterate (order parameter name -> value).
        aux: the auxiliary output returned by the update map at the last call
            (e.g. the conjugate parameters), or None.
        converged: residual <= tol was reached within max_iter, with finite values.
        residual: the last residual max_i |F(x)_i - x_i| / max(1, |x_i|).
        iterations: number of update-map evaluations.
        history: residual after each iteration.
        mixing: the mixing weight in force at the end (it is reduced when the
            iteration oscillates).
    """

    state: dict[str, float]
    aux: Any
    converged: bool
    residual: float
    iterations: int
    history: tuple[float, ...] = field(repr=False)
    mixing: float = 1.0


UpdateMap = Callable[[dict[str, float]], "tuple[Mapping[str, float], Any]"]


def iterate(
    update: UpdateMap,
    x0: Mapping[str, float],
    *,
    mixing: float = 0.5,
    tol: float = 1e-8,
    max_iter: int = 1000,
    min_mixing: float = 0.02,
    bounds: Mapping[str, tuple[float, float]] | None = None,
    name: str = "fixed point",
    warn: bool = True,
    anderson: int = 3,
    domain: Callable[[dict[str, float]], bool] | None = None,
) -> FixedPointResult:
    """Solve x = F(x) for a map on named states, by the engine (:func:`hdlora.theory.engine.solve_stage`).

    A one-start stage over the dict-valued map: damped steps x + mixing (F(x) - x), accelerated by
    Anderson mixing (memory ``anderson``; 0: plain damped iteration), restarted on stagnation and
    falling back to damped iteration with a halved mixing (down to ``min_mixing``) when Anderson
    does not help (see :mod:`hdlora.theory.engine`).

    Args:
        update: the map F; called with a dict state, returns (new state, aux).
        x0: starting point (warm start from a previous solution in sweeps); clipped into ``bounds``.
        mixing: weight of the new iterate in a damped step, in (0, 1].
        tol: tolerance on the relative residual (see FixedPointResult.residual).
        max_iter: maximum number of evaluations of F.
        min_mixing: floor of the mixing when the engine falls back to damped iteration.
        bounds: optional box (lo, hi) per name: the map is projected onto it (F(x) clipped into the
            box, so that a fixed point on a face is reached exactly), and an accelerated step that leaves
            it is rejected (never clipped into it).
        name: used in the non-convergence warning.
        warn: emit a NonConvergenceWarning when the solve does not converge.
        anderson: Anderson memory (number of previous steps mixed).
        domain: optional predicate on a state, besides ``bounds`` (e.g. q > m^2): a step leaving it is
            shortened or rejected like one leaving the box.

    Returns:
        FixedPointResult at the returned point x (the converged point, else the evaluated point
        with the smallest residual): its residual max_i |F(x)_i - x_i| / max(1, |x_i|) and the aux
        of F(x).  It is never silently wrong: ``converged`` is False, and a warning is emitted,
        when the tolerance was not met.
    """
    from . import engine  # the engine imports this module (NonConvergenceWarning)

    if not (0.0 < mixing <= 1.0):
        raise ValueError(f"mixing must be in (0, 1], got {mixing}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    names = list(x0)
    lo = np.array([(bounds or {}).get(k, (-np.inf, np.inf))[0] for k in names], dtype=float)
    hi = np.array([(bounds or {}).get(k, (-np.inf, np.inf))[1] for k in names], dtype=float)
    x = np.clip(np.array([float(x0[k]) for k in names]), lo, hi)

    def stage_update(xv: np.ndarray, carry: Any):
        # the map projected onto the box: a fixed point on its face (e.g. W_hat = 0, V at its floor) is reached
        # exactly instead of approached by ever shorter damped steps
        fx_map, aux = update(dict(zip(names, xv.tolist())))
        return np.clip(np.array([float(fx_map[k]) for k in names]), lo, hi), carry, aux

    def in_domain(xv: np.ndarray) -> bool:
        if not (np.all(np.isfinite(xv)) and np.all(xv >= lo) and np.all(xv <= hi)):
            return False
        return domain is None or bool(domain(dict(zip(names, xv.tolist()))))

    stage = engine.Stage(init=lambda params, samples: None, update=stage_update, domain=in_domain, names=tuple(names))
    b = engine.solve_one(stage, x, tol=tol, max_iter=max_iter, mixing=mixing, anderson=anderson, min_mixing=min_mixing)
    converged = b.status != engine.NOT_CONVERGED and b.residual <= tol
    result = FixedPointResult(
        state=dict(zip(names, b.x.tolist())),
        aux=b.aux,
        converged=bool(converged),
        residual=b.residual,
        iterations=b.iterations,
        history=b.history,
        mixing=b.mixing,
    )
    if warn and not converged:
        warnings.warn(
            f"{name}: not converged after {result.iterations} iterations (residual {b.residual:.3g} > tol {tol:.3g})",
            NonConvergenceWarning,
            stacklevel=2,
        )
    return result
