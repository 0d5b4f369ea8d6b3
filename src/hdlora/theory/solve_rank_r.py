"""One theoretical point with a rank-r LoRA on a rank-r* task (beyond the paper; docs/theory/rank_r.md, sec. 13).

``solve(params)`` dispatches here when ``not params.rank_one``.  The pre-training stage and the frozen fields
(e = 0: the test law Q, e = 1: the train law R, active selection) are the rank-one pipeline's, unchanged; the
fine-tuning stage is the rank-r state evolution (:func:`hdlora.theory.finetune_rank_r.solve_finetune_rank_r`)
solved once per *branch*:

m = 0 is a fixed point of the state evolution (the model is invariant under w -> -w, and under w -> w O), so
which fixed point an iteration reaches depends on its start.  The branches start from (all slightly perturbed by a
seeded random matrix of size 1e-2):

    ``m0``: small random m (1e-2), q = 0.5 I: the branch of m = 0 and whatever grows out of it;
    ``rank{k}`` (1 <= k < min(r, r*)): m = 0.5 diag(q0)^{1/2} on the k strongest teacher directions only;
    ``full``: m = q0 padded (w = w* truncated to r columns, or padded with zero columns), q = q0 padded + 0.05 I.

The branches are solved coarse to fine (:func:`solve_branches`): each on n_mc / 16 samples, the coarse fixed points
that coincide merged, the distinct ones refined on all samples.  Every branch is reported (objective
alpha' L' + lam' tr q, replicon, status, rank(m), its coarse fixed point, and what it was merged into).  The winner is the lowest
objective among the branches that converged *and* are replica stable (replicon < 1); when there is none, the lowest
objective among the converged ones, else among all, and the result says so (``winner_status``,
``converged`` False for an unconverged winner, ``replicon_ok`` False for an unstable one).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..params import DEFAULT_N_MC, ParamError, Params
from .finetune_rank_r import RankRResult, solve_finetune_rank_r
from .fixed_point import NonConvergenceWarning
from .prox_rank_r import MAX_PROX_DIM
from .solve import StageOptions, TheoryResult, point_result, pretrain_stage
from .streams import stream

__all__ = ["RankRTheoryResult", "branch_starts", "solve_rank_r", "WINNER_STATUSES"]

#: ``winner_status``: how the winning branch was chosen.
WINNER_STATUSES = ("converged_stable", "converged_unstable", "unconverged")


@dataclass(frozen=True)
class RankRTheoryResult(TheoryResult):
    """:class:`hdlora.theory.solve.TheoryResult` at rank r (the winning branch), with the matrices.

    The scalar fields keep their names with rank-r meanings: q = tr q, m = ||m||_F, v = tr v, qhat = tr q_hat,
    mhat = ||m_hat||_F, vhat = tr v_hat, overlap = ||m||_F / sqrt(||q||_F ||q0||_F) (the paper's o_w at rank one).
    Matrices as nested lists; ``branches`` holds every branch's summary (see :func:`solve_rank_r`).
    """

    lora_rank: int = 1
    teacher_rank: int = 1
    q_eigenvalues: list = field(default_factory=list)
    m_singular_values: list = field(default_factory=list)
    principal_cosines: list = field(default_factory=list)
    rank_m: int = 0
    objective: float = math.nan
    q_matrix: list = field(default_factory=list)
    m_matrix: list = field(default_factory=list)
    v_matrix: list = field(default_factory=list)
    q0_matrix: list = field(default_factory=list)
    qhat_matrix: list = field(default_factory=list)
    mhat_matrix: list = field(default_factory=list)
    vhat_matrix: list = field(default_factory=list)
    prox_failed: int = 0
    prox_not_max: int = 0
    prox_uncertified: int | None = None
    winner: str = ""
    winner_status: str = ""
    branches: list = field(default_factory=list)


def branch_starts(r: int, q0: np.ndarray, lam_ft: float, alpha_ft: float, T: int, seed: int) -> dict[str, dict]:
    """The starting points {name: {'m', 'q', 'v'}} of the branches (module docstring)."""
    rs = q0.shape[0]
    rng = stream(seed, "branch_starts")
    v0 = np.eye(r) / (2.0 * lam_ft + alpha_ft * T)
    order = np.argsort(-np.diag(q0), kind="stable")  # strongest teacher directions first
    kmax = min(r, rs)
    out: dict[str, dict] = {}
    m = 1e-2 * rng.standard_normal((r, rs)) * np.sqrt(np.diag(q0))[None, :]
    out["m0"] = {"m": m, "q": 0.5 * np.eye(r), "v": v0}
    for k in range(1, kmax):
        m = 1e-2 * rng.standard_normal((r, rs))
        for i in range(k):
            m[i, order[i]] += 0.5 * math.sqrt(q0[order[i], order[i]])
        out[f"rank{k}"] = {"m": m, "q": 0.5 * np.eye(r), "v": v0}
    m = 1e-2 * rng.standard_normal((r, rs))
    q = 0.05 * np.eye(r)
    for i in range(kmax):
        m[i] += q0[order[i]]
        for j in range(kmax):
            q[i, j] += q0[order[i], order[j]]
    out["full"] = {"m": m, "q": q, "v": v0}
    return out


def _branch_summary(
    name: str, b: RankRResult | None, error: str | None = None, coarse: dict | None = None
) -> dict[str, Any]:
    head: dict[str, Any] = {"name": name}
    if coarse:
        head["coarse"] = coarse
    if b is None:
        merged = (coarse or {}).get("merged_into")
        status = f"merged into {merged}" if merged else "failed"
        return {**head, "status": status, "error": error, "converged": False, "replica_stable": False}
    return {
        **head,
        "status": "converged" if b.converged else "not converged",
        "converged": b.converged,
        "replica_stable": b.replica_stable,
        "objective": b.objective,
        "replicon": b.replicon_finetune,
        "rank_m": b.rank_m,
        "q": b.tr_q,
        "m": b.m_fro,
        "overlap": b.overlap,
        "q_eigenvalues": b.eig_q,
        "m_singular_values": b.sv_m,
        "finetune_test_error": b.finetune_test_error,
        "finetune_train_error": b.finetune_train_error,
        "forgetting_error": b.forgetting_error,
        "residual": b.residual,
        "iterations": b.iterations,
        "prox_failed": b.prox_failed,
        "prox_not_max": b.prox_not_max,
        "prox_uncertified": b.prox_uncertified,
    }


def pick_winner(results: Mapping[str, RankRResult | None]) -> tuple[str, str]:
    """(name, status) of the winning branch: the lowest objective among the converged, replica-stable branches
    ('converged_stable'); else among the converged ('converged_unstable'); else among all ('unconverged')."""
    ok = {k: b for k, b in results.items() if b is not None and math.isfinite(b.objective)}
    if not ok:
        raise FloatingPointError("no branch of the rank-r fine-tuning state evolution produced a fixed point")
    for status, keep in (
        ("converged_stable", lambda b: b.converged and b.replica_stable),
        ("converged_unstable", lambda b: b.converged),
        ("unconverged", lambda b: True),
    ):
        cand = {k: b for k, b in ok.items() if keep(b)}
        if cand:
            return min(cand, key=lambda k: cand[k].objective), status
    raise AssertionError("unreachable")


#: the coarse stage of :func:`solve_branches` uses n_mc // COARSE_FACTOR samples (when that is >= COARSE_MIN)
COARSE_FACTOR = 16
COARSE_MIN = 1000


def same_branch(a: RankRResult, b: RankRResult, tol: float = 0.05) -> bool:
    """Two coarse fixed points are the same branch: same rank(m), and eigenvalues of q and singular values of m
    within tol x (1 + the largest eigenvalue of q) (the coarse Monte-Carlo noise is ~2e-2 at n = 1875)."""
    if a.rank_m != b.rank_m:
        return False
    scale = tol * (1.0 + max(a.eig_q[0], b.eig_q[0]))
    da = np.abs(np.subtract(a.eig_q, b.eig_q)).max()
    dm = np.abs(np.subtract(a.sv_m, b.sv_m)).max() if a.sv_m else 0.0
    return bool(da <= scale and dm <= scale)


def solve_branches(
    params: Params,
    z_star: np.ndarray,
    z: np.ndarray,
    *,
    Q0: float,
    Q: float,
    M: float,
    seed: int,
    tol: float,
    max_iter: int,
) -> tuple[dict[str, RankRResult | None], dict[str, str], dict[str, dict]]:
    """Solve the fine-tuning state evolution from every branch start, coarse to fine.

    Coarse stage (when n // COARSE_FACTOR >= COARSE_MIN): every branch on the first n // COARSE_FACTOR samples.
    Branches whose coarse fixed points are the same (:func:`same_branch`) are merged into the first of them; the
    distinct ones are solved on all n samples, warm-started from their coarse fixed point.  Without a coarse stage
    every branch is solved on all samples from its start.

    Returns ({name: full-n result, or None (failed, or merged)}, {name: error}, {name: coarse summary with
    'merged_into'}).
    """
    q0 = np.diag(np.asarray(params.q0, dtype=np.float64))
    starts = branch_starts(params.lora_rank, q0, params.lam_ft, params.alpha_ft, params.tokens, seed)
    n = np.shape(z_star)[0]
    n_c = n // COARSE_FACTOR
    law = {"Q0": Q0, "Q": Q, "M": M}
    results: dict[str, RankRResult | None] = {}
    errors: dict[str, str] = {}
    coarse: dict[str, dict] = {}

    def run(name, st, zs, zz):
        try:
            return solve_finetune_rank_r(params, zs, zz, seed=seed, tol=tol, max_iter=max_iter, init=st, **law)
        except (FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:  # e.g. v not positive definite
            errors[name] = f"{type(exc).__name__}: {exc}"
            return None

    if n_c < COARSE_MIN:
        for name, st in starts.items():
            results[name] = run(name, st, z_star, z)
        return results, errors, coarse
    reps: list[tuple[str, RankRResult]] = []
    for name, st in starts.items():
        c = run(name, st, z_star[:n_c], z[:n_c])
        merged = None
        if c is not None:
            merged = next((k for k, b in reps if same_branch(b, c)), None)
            if merged is None:
                reps.append((name, c))
        coarse[name] = {"n_mc": n_c, "merged_into": merged, **({} if c is None else _coarse_summary(c))}
        if c is None:
            results[name] = run(name, st, z_star, z)  # no coarse fixed point: the full solve from the start
        elif merged is not None:
            results[name] = None
    for name, c in reps:
        results[name] = run(name, {"m": np.asarray(c.m), "q": np.asarray(c.q), "v": np.asarray(c.v)}, z_star, z)
    return {k: results[k] for k in starts}, errors, coarse


def _coarse_summary(c: RankRResult) -> dict[str, Any]:
    return {
        "converged": c.converged,
        "objective": c.objective,
        "replicon": c.replicon_finetune,
        "rank_m": c.rank_m,
        "q_eigenvalues": c.eig_q,
        "m_singular_values": c.sv_m,
        "iterations": c.iterations,
    }


def check_rank_params(params: Params, baseline: str | None, *, bayes_optimal: bool = False) -> None:
    """ParamError (one line) for what the rank-r theory does not cover."""
    if bayes_optimal:
        raise ParamError(
            "--bayes-optimal is the rank-one benchmark (App. B): drop it, or use lora_rank = teacher_rank = 1"
        )
    if params.tokens * params.lora_rank > MAX_PROX_DIM:
        raise ParamError(
            f"lora_rank * tokens must be <= {MAX_PROX_DIM} (the per-sample dimension of the rank-r prox), got "
            f"{params.lora_rank} * {params.tokens} = {params.lora_rank * params.tokens}; lower --lora-rank"
        )
    if params.frozen or baseline == "frozen":
        raise ParamError("the frozen baseline (lam_ft = inf) has no LoRA: use lora_rank = teacher_rank = 1 for it")


def solve_rank_r(
    params: Params,
    *,
    n_mc: int = DEFAULT_N_MC,
    seed: int = 0,
    baseline: str | None = None,
    tol: float = 1e-7,
    max_iter: int = 500,
    method: str | None = None,
    optimal_beta: bool = False,
    warn: bool = True,
    init: Mapping[str, float] | None = None,
) -> RankRTheoryResult:
    """Pre-training (unchanged) then the rank-r fine-tuning branches; the arguments as :func:`hdlora.theory.solve`
    (``params`` already carries the baseline; ``init`` warms the pre-training only)."""
    options = StageOptions(
        n_mc=n_mc, seed=seed, tol=tol, max_iter=max_iter, method=method, optimal_beta=optimal_beta, warn=warn
    )
    return rank_r_point(params, options, baseline=baseline, init=init)


def rank_r_point(
    params: Params, options: StageOptions, *, baseline: str | None, init: Mapping[str, float] | None
) -> RankRTheoryResult:
    """:func:`solve_rank_r` with its options as one :class:`hdlora.theory.solve.StageOptions` (how
    :func:`hdlora.theory.solve` calls it)."""
    check_rank_params(params, baseline)
    t0 = time.perf_counter()
    params, pre, ft_params, z_star, z = pretrain_stage(params, options, init)
    Q0, Q, M = params.Q0, pre.Q, pre.M
    results, errors, coarse = solve_branches(
        ft_params, z_star, z, Q0=Q0, Q=Q, M=M, seed=options.seed, tol=options.tol, max_iter=options.max_iter
    )
    name, status = pick_winner(results)
    ft = results[name]
    assert ft is not None
    branches = [_branch_summary(k, b, errors.get(k), coarse.get(k)) for k, b in results.items()]
    if options.warn and status != "converged_stable":
        warnings.warn(
            f"rank-r fine-tuning: no converged replica-stable branch; the winner '{name}' is {status}",
            NonConvergenceWarning,
            stacklevel=3,
        )
    mhat = np.asarray(ft.mhat)
    scalars = SimpleNamespace(
        q=ft.tr_q,
        m=ft.m_fro,
        v=float(np.trace(np.asarray(ft.v))),
        qhat=float(np.trace(np.asarray(ft.qhat))),
        mhat=float(np.linalg.norm(mhat)) if mhat.size else math.nan,
        vhat=float(np.trace(np.asarray(ft.vhat))),
        finetune_train_error=ft.finetune_train_error,
        finetune_test_error=ft.finetune_test_error,
        forgetting_error=ft.forgetting_error,
        overlap=ft.overlap,
        delta_eff=ft.delta_eff,
        replicon_finetune=ft.replicon_finetune,
        converged=ft.converged,
        iterations=ft.iterations,
        residual=ft.residual,
        mc_se=ft.mc_se,
    )
    return point_result(
        RankRTheoryResult,
        params,
        pre,
        scalars,
        options,
        t0=t0,
        baseline=baseline,
        lora_rank=params.lora_rank,
        teacher_rank=params.teacher_rank,
        q_eigenvalues=ft.eig_q,
        m_singular_values=ft.sv_m,
        principal_cosines=ft.principal_cosines,
        rank_m=ft.rank_m,
        objective=ft.objective,
        **{f"{k}_matrix": getattr(ft, k) for k in ("q", "m", "v", "q0", "qhat", "mhat", "vhat")},
        **{k: getattr(ft, k) for k in ("prox_failed", "prox_not_max", "prox_uncertified")},
        winner=name,
        winner_status=status,
        branches=branches,
    )
