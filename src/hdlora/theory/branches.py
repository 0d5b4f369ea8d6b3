"""Every fixed point of the rank-one fine-tuning state evolution: the continuation in m (issue 10).

Damped or accelerated iteration finds only the fixed points that attract it.  For the rank-one
LoRA the state is (m, q, v), and the fixed points are the roots of one scalar function: at fixed m
the (q, v) part of eqs. 67-72 is solved (``solve_finetune(..., fix_m=m)``), and

    g(m) = F_m(m, q(m), v(m)) - m = m_hat v - m                                  (eqs. 67, 69)

vanishes exactly at the fixed points of the full map, attracting or repelling alike.  A scan of g over
an m grid brackets every root the grid resolves; each bracket is refined by Brent's method, and the
fixed-m solution at the root is reported as a branch: its objective alpha' L'_train + lam' q (the
training objective, :class:`hdlora.theory.finetune.FinetuneResult`), replicon (eq. 78) and status.
All solves use the same samples, so the branches' objectives are comparable.

Where the (q, v) part itself has no fixed point (for example when 2 lam' + v_hat <= 0 drives v to
infinity) g is undefined: such m are reported, never bridged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..params import A0 as _A0
from ..params import DEFAULT_N_MC, ParamError, Params
from .engine import CONVERGED, CONVERGED_MC, NOT_CONVERGED, REPLICA_UNSTABLE
from .finetune import FinetuneResult, solve_finetune
from .sampling import frozen_fields

__all__ = ["MBranch", "MScan", "finetune_m_scan", "finetune_m_scan_effective"]


@dataclass(frozen=True)
class MBranch:
    """A fixed point found as a root of g(m): the state, g there (the residual of the m equation), the
    objective, the replicon and the status: 'converged' (|g| <= 10 root_tol), 'converged to Monte-Carlo
    resolution' (g changes sign within root_tol of the root but jumps there: samples switching between
    near-degenerate prox maxima), 'replica-unstable' (either of those with replicon >= 1), else 'not converged'."""

    m: float
    q: float
    v: float
    overlap: float
    g: float
    objective: float
    replicon: float
    replicon_upper: float
    finetune_test_error: float
    status: str
    result: FinetuneResult = field(repr=False)


@dataclass(frozen=True)
class MScan:
    """The scan: g on the grid (nan where the (q, v) part did not converge), the roots as branches, and the m inside
    a sign-change bracket where the (q, v) part failed from both ends (its root not refined: reported)."""

    m: np.ndarray
    g: np.ndarray
    q: np.ndarray
    v: np.ndarray
    converged: np.ndarray
    branches: tuple[MBranch, ...]
    undefined_in_brackets: tuple[float, ...] = ()

    @property
    def stable(self) -> tuple[MBranch, ...]:
        """The converged, replica-stable branches."""
        return tuple(b for b in self.branches if b.status == CONVERGED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "m": self.m.tolist(),
            "g": [None if not math.isfinite(x) else float(x) for x in self.g],
            "q": self.q.tolist(),
            "v": self.v.tolist(),
            "converged": self.converged.tolist(),
            "undefined_in_brackets": list(self.undefined_in_brackets),
            "branches": [
                {k: getattr(b, k) for k in MBranch.__dataclass_fields__ if k != "result"} for b in self.branches
            ],
        }


class _Undefined(Exception):
    def __init__(self, m: float):
        super().__init__(m)
        self.m = m


def _solved(r: FinetuneResult) -> bool:
    return r.converged or r.status == CONVERGED_MC


def _g(r: FinetuneResult) -> float:
    return r.mhat * r.v - r.m if _solved(r) else math.nan


def _jump_within(cache: dict[float, FinetuneResult], m_star: float, width: float) -> bool:
    """A sign change of g between evaluated points on both sides of m_star, at most ``width`` apart."""
    ev = sorted((m, _g(r)) for m, r in cache.items() if math.isfinite(_g(r)))
    left = [(m, g) for m, g in ev if m <= m_star]
    right = [(m, g) for m, g in ev if m >= m_star]
    if not left or not right:
        return False
    (ml, gl), (mr, gr) = left[-1], right[0]
    return gl * gr <= 0 and mr - ml <= width


def finetune_m_scan(
    params: Params,
    z_star: np.ndarray,
    z: np.ndarray,
    m_values: Sequence[float],
    *,
    Q0: float | None = None,
    Q: float | None = None,
    M: float | None = None,
    seed: int = 0,
    tol: float = 1e-7,
    root_tol: float = 1e-6,
    max_iter: int = 400,
    edge_bisections: int = 5,
    **kwargs: Any,
) -> MScan:
    """Scan g(m) = m_hat v - m over ``m_values`` (increasing) and refine every sign change to a branch.

    Args:
        params: as :func:`hdlora.theory.finetune.solve_finetune`.
        z_star: the frozen teacher fields (the same samples for every m).
        z: the frozen student fields.
        m_values: the grid of m (increasing, at least 2 values).
        Q0: the law's Q0 (see solve_finetune).
        Q: the law's Q.
        M: the law's M.
        seed: seed of the rank-one and test samples.
        tol: tolerance of each fixed-m solve.
        max_iter: iterations of each fixed-m solve.
        root_tol: Brent's tolerance on m at a root; a root is 'converged' when |g| <= 10 root_tol there.
        edge_bisections: bisections of every grid interval where the (q, v) part converges at one end only.
        kwargs (Any): passed to solve_finetune.

    Returns:
        MScan on the grid plus the bisection points (sorted), with the branches.
    """
    from scipy.optimize import brentq

    ms = np.asarray(m_values, dtype=np.float64)
    if ms.ndim != 1 or ms.size < 2 or not np.all(np.isfinite(ms)) or np.any(np.diff(ms) <= 0):
        raise ParamError("m_values must be at least 2 finite, strictly increasing numbers")
    common = dict(Q0=Q0, Q=Q, M=M, seed=seed, tol=tol, max_iter=max_iter, warn=False, **kwargs)
    pts: dict[float, FinetuneResult] = {}
    prev: FinetuneResult | None = None
    for m in ms:
        r = solve_finetune(params, z_star, z, fix_m=float(m), init=prev, **common)
        pts[float(m)] = r
        prev = r if r.converged else prev
    # the edges of the region where the (q, v) part has a fixed point, located by bisection (a root can sit
    # between the last grid point where g is defined and the first where it is not)
    for _ in range(edge_bisections):
        keys = sorted(pts)
        new = {}
        for lo_m, hi_m in zip(keys[:-1], keys[1:]):
            a_ok, b_ok = pts[lo_m].converged, pts[hi_m].converged
            if a_ok != b_ok:
                mid = 0.5 * (lo_m + hi_m)
                new[mid] = solve_finetune(params, z_star, z, fix_m=mid, init=pts[lo_m if a_ok else hi_m], **common)
        if not new:
            break
        pts.update(new)
    ms = np.array(sorted(pts))
    results = [pts[m] for m in ms]
    g = np.array([_g(r) for r in results])
    branches = []
    undefined: list[float] = []
    for i in range(ms.size - 1):
        a, b = g[i], g[i + 1]
        if not (math.isfinite(a) and math.isfinite(b)) or a * b > 0:
            continue
        ends = (results[i], results[i + 1])
        cache: dict[float, FinetuneResult] = {}

        def gm(m: float, ends=ends, cache=cache) -> float:
            # from the nearer end's state; a failed (q, v) solve is retried from the other end
            first = ends[0] if abs(m - ends[0].m) <= abs(m - ends[1].m) else ends[1]
            for start in (first, ends[1] if first is ends[0] else ends[0]):
                r = solve_finetune(params, z_star, z, fix_m=m, init=start, **common)
                cache[m] = r
                if _solved(r):
                    return _g(r)
            raise _Undefined(m)

        if a == 0.0:
            m_star, r = float(ms[i]), results[i]
        else:
            try:
                m_star = float(brentq(gm, float(ms[i]), float(ms[i + 1]), xtol=root_tol, rtol=1e-12))
            except _Undefined as e:  # the (q, v) part has no fixed point inside the bracket: reported, not bridged
                undefined.append(e.m)
                continue
            r = (
                cache[m_star]
                if m_star in cache
                else solve_finetune(params, z_star, z, fix_m=m_star, init=ends[0], **common)
            )
        gr = _g(r)
        if _solved(r) and math.isfinite(gr) and abs(gr) <= 10 * root_tol:
            status = CONVERGED
        elif _solved(r) and _jump_within(cache, m_star, 4 * root_tol):
            # g changes sign within root_tol of m* but jumps there (samples switching between near-degenerate prox
            # maxima): a root to Monte-Carlo resolution
            status = CONVERGED_MC
        else:
            status = NOT_CONVERGED
        if status != NOT_CONVERGED and r.replicon_finetune >= 1:
            status = REPLICA_UNSTABLE
        branches.append(
            MBranch(
                m=r.m,
                q=r.q,
                v=r.v,
                overlap=r.overlap,
                g=gr,
                objective=r.objective,
                replicon=r.replicon_finetune,
                replicon_upper=r.replicon_upper,
                finetune_test_error=r.finetune_test_error,
                status=status,
                result=r,
            )
        )
    return MScan(
        m=ms,
        g=g,
        q=np.array([r.q for r in results]),
        v=np.array([r.v for r in results]),
        converged=np.array([_solved(r) for r in results]),
        branches=tuple(branches),
        undefined_in_brackets=tuple(undefined),
    )


def finetune_m_scan_effective(
    params: Params,
    Q0: float,
    Q: float,
    M: float,
    m_values: Sequence[float],
    *,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    **kwargs: Any,
) -> MScan:
    """:func:`finetune_m_scan` on an effective pre-training (fields of the law (Q0, Q, M), eq. 13, drawn as
    :func:`hdlora.theory.finetune.solve_finetune_effective` draws them).

    Args:
        params: the fine-tuning parameters.
        Q0: the effective pre-training's Q0.
        Q: its Q.
        M: its M.
        m_values: the grid of m.
        n_mc: Monte-Carlo samples.
        seed: seed of the named random streams.
        kwargs (Any): passed to :func:`finetune_m_scan`.
    """
    f = frozen_fields(n_mc, params.tokens, _A0(Q0, params.noise), Q, M, seed=seed, purpose="finetune_fields")
    return finetune_m_scan(params, f["z_star"], f["z"], m_values, Q0=Q0, Q=Q, M=M, seed=seed, **kwargs)
