"""The one damped fixed-point engine shared by every state evolution.

Every stage (pre-training, Result 4; fine-tuning, Result 5; Bayes-optimal,
Appendix B) supplies an *update map* ``F`` from a named state (a mapping of
order parameters to floats) to a new state; this module owns the damping, the
tolerance, the iteration record and the ``converged`` flag.  No stage
re-implements the loop.

The map must be deterministic (fixed Monte-Carlo samples, drawn once per
solve) so that a true fixed point exists and the residual can go to zero.
"""

from __future__ import annotations

import math
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


def _residual(new: np.ndarray, old: np.ndarray) -> float:
    if not (np.all(np.isfinite(new)) and np.all(np.isfinite(old))):
        return math.nan
    return float(np.max(np.abs(new - old) / np.maximum(1.0, np.abs(old)))) if new.size else 0.0


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
) -> FixedPointResult:
    """Damped iteration x <- (1 - mixing) x + mixing F(x) until the residual is below tol.

    Args:
        update: the map F; called with a dict state, returns (new state, aux).
        x0: starting point (warm start from a previous solution in sweeps).
        mixing: weight of the new iterate, in (0, 1].
        tol: tolerance on the relative residual (see FixedPointResult.residual).
        max_iter: maximum number of evaluations of F.
        min_mixing: floor for the adaptive reduction of ``mixing``.
        bounds: optional box (lo, hi) per name; iterates are clipped into it
            (e.g. to keep variances positive while far from the fixed point).
        name: used in the non-convergence warning.
        warn: emit a NonConvergenceWarning when the solve does not converge.

    Returns:
        FixedPointResult. It is never silently wrong: ``converged`` is False, and a
        warning is emitted, when the tolerance was not met.
    """
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
    history: list[float] = []
    aux: Any = None
    res = math.inf
    converged = False
    rising = 0
    for _ in range(max_iter):
        fx_map, aux = update(dict(zip(names, x.tolist())))
        fx = np.array([float(fx_map[k]) for k in names])
        res = _residual(fx, x)
        history.append(res)
        if math.isnan(res):
            break
        if res <= tol:
            x = np.clip(fx, lo, hi)
            converged = True
            break
        # oscillation / growth control: shrink the step when the residual keeps rising
        if len(history) >= 2 and res > history[-2]:
            rising += 1
            if rising >= 3 and mixing > min_mixing:
                mixing = max(min_mixing, 0.5 * mixing)
                rising = 0
        else:
            rising = 0
        x = np.clip((1.0 - mixing) * x + mixing * fx, lo, hi)
    result = FixedPointResult(
        state=dict(zip(names, x.tolist())),
        aux=aux,
        converged=converged,
        residual=res,
        iterations=len(history),
        history=tuple(history),
        mixing=mixing,
    )
    if warn and not converged:
        warnings.warn(
            f"{name}: not converged after {result.iterations} iterations (residual {res:.3g} > tol {tol:.3g})",
            NonConvergenceWarning,
            stacklevel=2,
        )
    return result
