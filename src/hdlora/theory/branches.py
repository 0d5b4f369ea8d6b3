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
from .engine import CONVERGED, NOT_CONVERGED, REPLICA_UNSTABLE
from .finetune import FinetuneResult, solve_finetune
from .sampling import frozen_fields

__all__ = ["MBranch", "MScan", "finetune_m_scan", "finetune_m_scan_effective"]


@dataclass(frozen=True)
class MBranch:
    """A fixed point found as a root of g(m): the state, g there (the residual of the m equation), the
    objective, the replicon and the status ('converged' or 'replica-unstable'; 'not converged' if the
    (q, v) part did not converge at the root or |g| did not reach ``root_tol``)."""

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
    """The scan: g on the grid (nan where the (q, v) part did not converge), the roots as branches."""

    m: np.ndarray
    g: np.ndarray
    q: np.ndarray
    v: np.ndarray
    converged: np.ndarray
    branches: tuple[MBranch, ...]

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
            "branches": [
                {k: getattr(b, k) for k in MBranch.__dataclass_fields__ if k != "result"} for b in self.branches
            ],
        }


def _g(r: FinetuneResult) -> float:
    return r.mhat * r.v - r.m if r.converged else math.nan


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
        params, z_star, z, Q0, Q, M, seed, tol, max_iter, kwargs: as :func:`hdlora.theory.finetune.solve_finetune`
            (the same samples for every m).
        m_values: the grid of m (increasing, at least 2 values).
        root_tol: Brent's tolerance on m at a root; a root is 'converged' when |g| <= 10 root_tol there.
        edge_bisections: bisections of every grid interval where the (q, v) part converges at one end only.

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
    for i in range(ms.size - 1):
        a, b = g[i], g[i + 1]
        if not (math.isfinite(a) and math.isfinite(b)) or a * b > 0:
            continue
        near = results[i]
        cache: dict[float, FinetuneResult] = {}

        def gm(m: float) -> float:
            r = solve_finetune(params, z_star, z, fix_m=m, init=near, **common)
            cache[m] = r
            return _g(r) if r.converged else math.nan

        if a == 0.0:
            m_star, r = float(ms[i]), results[i]
        else:
            try:
                m_star = float(brentq(gm, float(ms[i]), float(ms[i + 1]), xtol=root_tol, rtol=1e-12))
            except ValueError:  # g not defined (nan) inside the bracket
                continue
            r = cache.get(m_star) or solve_finetune(params, z_star, z, fix_m=m_star, init=near, **common)
        gr = _g(r)
        ok = r.converged and math.isfinite(gr) and abs(gr) <= 10 * root_tol
        status = NOT_CONVERGED if not ok else (REPLICA_UNSTABLE if r.replicon_finetune >= 1 else CONVERGED)
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
        converged=np.array([r.converged for r in results]),
        branches=tuple(branches),
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
    :func:`hdlora.theory.finetune.solve_finetune_effective` draws them)."""
    f = frozen_fields(n_mc, params.tokens, _A0(Q0, params.noise), Q, M, seed=seed, purpose="finetune_fields")
    return finetune_m_scan(params, f["z_star"], f["z"], m_values, Q0=Q0, Q=Q, M=M, seed=seed, **kwargs)
