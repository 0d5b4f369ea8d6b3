"""The full finite-D pipeline (pre-training, then LoRA: rank one as the paper, rank r beyond it),
per seed and over seeds."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import activations
from ..data import (
    Effective,
    Teacher,
    _chunks,
    check_teacher,
    draw_teacher,
    effective_finetune_dataset,
    finetune_dataset,
    lora_field,
    pretrain_dataset,
    quadratic_field,
)
from ..params import A0 as _A0
from ..params import DEFAULT_N_MC, ParamError, Params
from .active import delta_eff_measured, effective_pool, full_pool
from .finetune import finetune
from .losses import check_loss
from .metrics import lora_parameters, order_parameters, test_errors
from .pretrain import default_chunk, pretrain


class ConvergenceWarning(RuntimeWarning):
    """An L-BFGS stage stopped before its gradient tolerance was met."""


#: Keys averaged over seeds (each also gets ``<key>_se``).
KEYS = (
    "pretrain_train_error",
    "pretrain_test_error",
    "recalibrated_test_error",
    "finetune_train_error",
    "finetune_test_error",
    "forgetting_error",
    "overlap",
    "Q",
    "M",
    "Q0",
    "q",
    "m",
    "q0",
    "Q_frozen",
    "M_frozen",
    "pretrain_objective",
    "pretrain_iterations",
    "pretrain_grad_norm",
    "pretrain_converged",
    "finetune_objective",
    "finetune_iterations",
    "finetune_grad_norm",
    "finetune_converged",
    "finetune_informed_won",
    "beta",
    "delta_eff",
    "delta_eff_actft",
    "delta_eff_measured",
    "wall_time",
)
#: Keys of active fine-tuning (``params.active_pool`` set), averaged by :func:`run` as well. The
#: main keys describe the active run (w_hat_ActFT); ``uniform_*`` the run on the first N' of the
#: same pool; ``delta_finetune_test_error = E'(uniform) - E'(active)`` and
#: ``delta_overlap = o_w(active) - o_w(uniform)`` are paired differences (same pool, teacher, tokens,
#: test sets), so their standard errors are the paired ones.
ACTIVE_KEYS = (
    "uniform_finetune_test_error",
    "uniform_forgetting_error",
    "uniform_finetune_train_error",
    "uniform_overlap",
    "uniform_q",
    "uniform_m",
    "uniform_finetune_converged",
    "uniform_finetune_informed_won",
    "uniform_delta_eff_measured",
    "delta_finetune_test_error",
    "delta_overlap",
    "selection_score_selected",
    "selection_score_pool",
    "pool_size",
    "labelled_size",
)
#: Lists per seed describing the rank-r LoRA (issue 11; at rank one too), averaged by :func:`run`
#: entry by entry when every seed has the same length (``<key>_se`` likewise), else left out:
#: eigenvalues of q, singular values of m and of w/sqrt(D), principal-angle cosines between
#: span(w_hat) and span(w*).  Per seed there are also ``numerical_rank`` and the matrices
#: ``q_matrix``, ``m_matrix``, ``q0_matrix`` (w_hat in the gauge of
#: :func:`hdlora.simulate.finetune.canonical_gauge`).
VECTOR_KEYS = ("q_eigenvalues", "m_singular_values", "w_singular_values", "principal_cosines")
#: Values of ``optimal_beta``: recalibrate at beta* = M/Q (eq. 26) measured on the pre-trained
#: weights of each seed, or taken from the pre-training state evolution (as the paper's App. E).
OPTIMAL_BETA = ("measured", "theory")
#: Tensors added by ``return_weights=True`` (left out of :meth:`SimulationResult.to_dict`).
WEIGHT_KEYS = ("W_hat", "w_hat", "W_star", "w_star")
#: Keys that do not exist in the effective-pre-training mode (reported as NaN there).
EFFECTIVE_NAN_KEYS = (
    "pretrain_train_error",
    "pretrain_objective",
    "pretrain_iterations",
    "pretrain_grad_norm",
    "pretrain_converged",
)


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' (error if absent) or 'auto' (cuda when available, else cpu)."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParamError(
                f"device {name!r} requested but CUDA is not available here; use device='cpu' (or 'auto' to fall back)"
            )
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ParamError(f"device must be 'cpu', 'cuda' or 'auto', got {name!r}")


def _check(
    params: Params, dim: int, loss: str, effective, optimal_beta=None, teacher: str = "gaussian"
) -> tuple[dict, Effective | None]:
    if not isinstance(params, Params):
        raise ParamError(f"params must be a hdlora.Params, got {type(params).__name__}")
    check_teacher(teacher)
    if optimal_beta is not None and optimal_beta not in OPTIMAL_BETA:
        raise ParamError(f"optimal_beta must be None or one of {OPTIMAL_BETA}, got {optimal_beta!r}")
    if optimal_beta is not None and params.lora_only:
        raise ParamError("optimal_beta needs a pre-trained map (Q > 0); lam = inf has none")
    check_loss(loss)
    sizes = params.sizes(dim)
    for name, r in (("lora_rank (r)", params.lora_rank), ("teacher_rank (r*)", params.teacher_rank)):
        if r > sizes["D"]:
            raise ParamError(f"{name} must be <= dim (D) = {sizes['D']}, got {r}; lower the rank or raise dim")
    eff = None
    if effective is not None:
        eff = Effective.from_mapping(effective, params.noise)
        if params.reuse:
            raise ParamError("reuse (e = 1) needs a real pre-training set; it cannot be combined with effective")
    return sizes, eff


def theory_beta_star(params: Params, n_mc: int = DEFAULT_N_MC, seed: int = 0) -> float:
    """beta* = M/Q from the pre-training state evolution (Result 4), as the paper's App. E does."""
    from ..theory.pretrain import solve_pretrain

    if params.lora_only:
        raise ParamError("optimal_beta needs a pre-trained map (Q > 0); lam = inf has none")
    r = solve_pretrain(params, n_mc=n_mc, seed=seed)
    if not r.converged:
        warnings.warn(
            f"optimal_beta='theory': pre-training state evolution not converged (residual {r.residual:.3g})",
            ConvergenceWarning,
            stacklevel=3,
        )
    return r.M / r.Q


def _delta_effs(params: Params, out: dict) -> dict:
    """Effective noises from the measured order parameters: Delta_eff(beta) (eqs. 25-26) and
    Delta_eff,ActFT = Delta/2 + Q0 - M^2/Q (eq. 28; independent of beta; NaN when Q = 0)."""
    from ..theory.effective import delta_eff_beta_of_A0, delta_eff_min_of_A0

    Q0, Q, M, b = out["Q0"], out["Q"], out["M"], out["beta"]
    A0 = _A0(Q0, params.noise)
    return {
        "delta_eff": delta_eff_beta_of_A0(A0, Q, M, b),
        "delta_eff_actft": delta_eff_min_of_A0(A0, Q, M) if Q > 0 else math.nan,
    }


def _optim_keys(stage: str, o, train_error: float) -> dict:
    """Optimiser record of a stage; no optimisation (o is None: lam = inf or lam' = inf, the
    weights are exactly 0) counts as converged, with the train error as objective."""
    return {
        f"{stage}_objective": o.objective if o else train_error,
        f"{stage}_iterations": o.iterations if o else 0,
        f"{stage}_grad_norm": o.grad_norm if o else 0.0,
        f"{stage}_converged": float(o.converged) if o else 1.0,
    }


def _finetune_record(fr, teacher: Teacher, seed: int, rtol: float, what: str = "fine-tuning") -> dict:
    rec = lora_parameters(fr.w, teacher.w_star)
    rec["finetune_train_error"] = fr.train_error
    o = fr.optim
    rec.update(_optim_keys("finetune", o, fr.train_error))
    rec.update(
        {
            "finetune_informed_won": float(fr.winner == "informed") if o else math.nan,
            "finetune_winner": fr.winner,
            "finetune_start_objectives": dict(fr.objectives),
            "finetune_stop": o.reason if o else "lam_ft=inf",
        }
    )
    if o is not None and not o.converged:
        warnings.warn(
            f"seed {seed}: {what} did not converge ({o.reason}): max|grad| = {o.grad_norm:.3g} "
            f"> {rtol:g} x {o.grad_norm_initial:.3g} after {o.iterations} iterations",
            ConvergenceWarning,
            stacklevel=3,
        )
    return rec


def _lora_field(X, w: torch.Tensor) -> torch.Tensor:
    """``chi chi^T - tr(q) I`` for tokens X (a tensor, or :class:`hdlora.data.Tokens` chunk by chunk)."""
    if isinstance(X, torch.Tensor):
        return lora_field(X, w)[1]
    return torch.cat([lora_field(X[sl], w)[1] for sl in _chunks(X.shape[0], X.chunk)])


def run_seed(
    params: Params,
    dim: int,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    loss: str = "sequence",
    effective: dict | None = None,
    restarts: int = 2,
    informed_start: bool = True,
    reduce_width: bool = False,
    pretrain_rtol: float = 1e-5,
    pretrain_max_iter: int = 3000,
    finetune_rtol: float = 1e-6,
    finetune_max_iter: int = 1000,
    n_test: int | None = None,
    return_weights: bool = False,
    optimal_beta: str | None = None,
    compare_uniform: bool = True,
    on_stage: Callable[[str], None] | None = None,
    token_storage: str = "auto",
    teacher: str = "gaussian",
) -> dict:
    """One seed of the pipeline; returns a dict with every key of :data:`KEYS` plus diagnostics.

    Errors are per sample (mean over samples, Result 3). Objectives are (sum of losses + ridge) / n,
    the quantity L-BFGS minimises; ``*_grad_norm`` is max|gradient| of that objective at the end,
    ``*_converged`` is 1.0 when it is below rtol times its value at the start (NaN-free 0/1, so the
    seed mean is the converged fraction). ``Q_frozen = beta^2 Q``, ``M_frozen = beta M`` describe the
    recalibrated frozen map used in fine-tuning (eq. 26); ``recalibrated_test_error`` is its E.

    Seed ``seed`` fixes the teacher, the data, the noise, the test sets and the
    initialisations (one torch generator per named stream, see :mod:`hdlora.data`).

    Args:
        params: model parameters (beta, lam = inf, lam_ft = inf and reuse respected).
        dim: D.
        effective: ``{"Q0":, "Q":, "M":}`` selects the effective-pre-training mode (no
            pre-training: the frozen fields are drawn from Q, eq. 13); the keys in
            :data:`EFFECTIVE_NAN_KEYS` are NaN there, Q0/Q/M are the given values.
        restarts: random fine-tuning starts, in addition to the informed one at w = w*.
        reduce_width: for kappa > 1 pre-train a width-D student with ridge lam sqrt(kappa)
            (same minimisers in S, see :mod:`hdlora.simulate.pretrain`).
        n_test: test samples per test set (default 10 D, as the paper's App. D).
        return_weights: also return the tensors ``W_hat`` (None when lam = inf or in the
            effective mode), ``w_hat``, ``W_star``, ``w_star`` (not averaged by :func:`run`).
        optimal_beta: None (use ``params.beta``), 'measured' (beta* = M/Q of this seed's
            pre-trained weights, or of the given effective law) or 'theory' (beta* = M/Q of
            the pre-training state evolution, the paper's App. E protocol); eq. 26.  The beta
            used is reported as ``beta``.
        compare_uniform: with ``params.active_pool`` set (Algorithm 1), also fine-tune on the
            first N' candidates of the same pool (``uniform_*`` keys, paired differences).
        on_stage: called with a stage name after each stage (progress bars).
        token_storage: how the effective mode keeps the N' x T x D fine-tuning tokens
            (:data:`hdlora.data.TOKEN_STORAGE`); 'auto' (default) takes float64 when it fits the
            memory available, else float32, else regenerate (:func:`hdlora.resources.choose_token_storage`).
            The choice is reported as ``token_storage``.
        teacher: how the fine-tuning teacher w* is drawn (:data:`hdlora.data.TEACHERS`):
            'gaussian' (eq. 6) or 'orthonormal' (sqrt(D) x an orthonormal frame, q0 = diag(s_k^2)
            exactly; issue 11).

    Rank r (``params.lora_rank``, ``params.teacher_rank``, ``params.teacher_strengths``; beyond the
    paper, issue 11): w* is D x r* (:func:`hdlora.data.draw_teacher`), w_hat is D x r, fine-tuned
    from the informed start (w* truncated or padded) and the random ones; ``q``, ``m``, ``q0`` are
    tr q, ||m||_F, tr q0 and ``overlap`` is ||m||_F / sqrt(||q||_F ||q0||_F), plus the lists of
    :data:`VECTOR_KEYS` and the matrices (:func:`hdlora.simulate.metrics.rank_r_parameters`).
    At r = r* = 1, s = 1, Gaussian every number is that of the paper's rank-one code path.

    Active fine-tuning (``params.active_pool = alpha_bar'``, Section 4.3): a pool of
    N_bar' = alpha_bar' D candidates is streamed (see :mod:`hdlora.simulate.active`), the N'
    with the lowest ``||sigma(beta z) - sigma(0)||_F^2`` are labelled and fine-tuned on; the
    main keys then describe w_hat_ActFT and :data:`ACTIVE_KEYS` are added.  Test errors are
    on uniform fresh test data in both runs.  ``delta_eff`` (eqs. 25-26) and ``delta_eff_actft``
    (eq. 28) come from the measured Q0, Q, M; ``delta_eff_measured`` is the second moment of
    (beta z - z*)_ab / sqrt(1 + delta_ab) over the fine-tuning set actually used (the quantity
    eqs. 25 and 28 describe; the selected set for active runs).
    """
    t0 = time.perf_counter()
    sizes, eff = _check(params, dim, loss, effective, optimal_beta, teacher)
    dev = resolve_device(device)
    sigma = activations.get(params.activation, "torch")
    T, D, beta = params.tokens, sizes["D"], params.beta
    stage = on_stage or (lambda name: None)
    out: dict[str, Any] = {"seed": int(seed)}
    storage = None
    if eff is not None:
        from ..resources import choose_token_storage

        storage = choose_token_storage(sizes["N_ft"], T, D, dev, token_storage)
        out["token_storage"] = storage

    # ---------------------------------------------------------------- stage 1
    out["teacher"] = teacher
    target_model = draw_teacher(  # the Teacher (``teacher`` is its kind)
        D,
        0 if eff else sizes["P0"],
        seed,
        dev,
        rank=params.teacher_rank,
        strengths=params.teacher_strengths,
        kind=teacher,
    )
    if eff is None:
        pre = pretrain_dataset(sizes["N"], T, params.noise, target_model, seed, dev)
        width, lam = sizes["P"], params.lam
        if reduce_width and width > D:
            width, lam = D, params.lam * math.sqrt(width / D)
        pt = pretrain(
            pre, width=width, lam=lam, sigma=sigma, loss=loss, seed=seed, rtol=pretrain_rtol, max_iter=pretrain_max_iter
        )
        W_hat = pt.W
        out.update(order_parameters(W_hat, target_model))
        out["pretrain_train_error"] = pt.train_error
        o = pt.optim
        out.update(_optim_keys("pretrain", o, pt.train_error))
        out.update(
            {
                "pretrain_stop": o.reason if o else "lam=inf",
                "pretrain_width": width,
            }
        )
        if o is not None and not o.converged:
            warnings.warn(
                f"seed {seed}: pre-training did not converge ({o.reason}): max|grad| = {o.grad_norm:.3g} "
                f"> {pretrain_rtol:g} x {o.grad_norm_initial:.3g} after {o.iterations} iterations",
                ConvergenceWarning,
                stacklevel=2,
            )
    else:
        W_hat, pre = None, None
        out.update({"Q0": eff.Q0, "Q": eff.Q, "M": eff.M})
        out.update({k: math.nan for k in EFFECTIVE_NAN_KEYS})
        out["pretrain_stop"] = "effective"
    # ---------------------------------------------------------------- recalibration (eq. 26)
    if optimal_beta is not None:
        if optimal_beta == "theory":
            beta = eff.M / eff.Q if eff is not None and eff.Q > 0 else theory_beta_star(params)
        else:
            if not out["Q"] > 0:
                raise ParamError("optimal_beta needs a pre-trained map (Q > 0); lam = inf has none")
            beta = out["M"] / out["Q"]  # beta* = M/Q of this seed's weights
        if not beta > 0:
            raise ParamError(f"optimal_beta: beta* = M/Q = {beta} is not > 0 (no alignment to recalibrate)")
        params = params.replace(beta=beta)
    out["beta"] = beta
    out["Q_frozen"], out["M_frozen"] = beta**2 * out["Q"], beta * out["M"]
    out.update(_delta_effs(params, out))
    stage("pretrain")

    # ---------------------------------------------------------------- stage 2
    sel = None
    if params.active_pool is not None:  # Algorithm 1 (Section 4.3)
        if eff is None:
            width = D if W_hat is None else W_hat.shape[1]
            sel = full_pool(
                sizes["N_pool"],
                sizes["N_ft"],
                T,
                params.noise,
                beta,
                sigma,
                target_model,
                W_hat,
                seed,
                dev,
                chunk=max(64, (1 << 22) // (T * max(D, width))),
            )
        else:
            assert storage is not None  # chosen above whenever eff is set
            sel = effective_pool(
                sizes["N_pool"],
                sizes["N_ft"],
                T,
                eff,
                params.noise,
                beta,
                sigma,
                target_model,
                seed,
                dev,
                storage=storage,
            )
        ft, ft_star = sel.active, sel.active_z_star
    elif eff is None:
        ft = finetune_dataset(
            sizes["N_ft"], T, params.noise, target_model, seed, dev, reuse_from=pre if params.reuse else None
        )
        if W_hat is None:
            z_frozen = torch.zeros_like(ft.z_star)
        else:
            tr = float((W_hat * W_hat).sum()) / math.sqrt(W_hat.shape[1])
            z_frozen = torch.empty_like(ft.z_star)
            for sl in _chunks(ft.n, default_chunk(T, W_hat.shape[1])):
                z_frozen[sl] = quadratic_field(ft.X[sl], W_hat, tr)
        ft = ft.with_frozen(beta * z_frozen)  # recalibration: S_hat -> beta S_hat (eq. 26)
        ft_star = ft.z_star - lora_field(ft.X, target_model.w_star)[1]
    else:
        assert storage is not None  # chosen above whenever eff is set
        ft = effective_finetune_dataset(sizes["N_ft"], T, params.noise, eff, target_model, seed, dev, storage=storage)
        assert ft.z_frozen is not None  # effective_finetune_dataset sets the frozen fields
        ft = ft.with_frozen(beta * ft.z_frozen)
        ft_star = ft.z_star - _lora_field(ft.X, target_model.w_star)
    del pre
    assert ft.z_frozen is not None  # every branch above sets the frozen fields
    out["delta_eff_measured"] = delta_eff_measured(ft_star, ft.z_frozen)
    ft_kwargs: dict[str, Any] = dict(
        lam_ft=params.lam_ft,
        sigma=sigma,
        loss=loss,
        seed=seed,
        restarts=restarts,
        informed=informed_start,
        rtol=finetune_rtol,
        max_iter=finetune_max_iter,
        rank=params.lora_rank,
    )
    fr = finetune(ft, target_model.w_star, **ft_kwargs)
    out.update(_finetune_record(fr, target_model, seed, finetune_rtol))
    fr_u = None
    if sel is not None and compare_uniform:  # the same pool, uniformly: its first N'
        fr_u = finetune(sel.uniform, target_model.w_star, **ft_kwargs)
        rec = _finetune_record(fr_u, target_model, seed, finetune_rtol, what="uniform fine-tuning")
        out.update(
            {
                f"uniform_{k}": rec[k]
                for k in ("finetune_train_error", "overlap", "q", "m", "finetune_converged", "finetune_informed_won")
            }
        )
        assert sel.uniform.z_frozen is not None  # both pool sets carry their frozen fields
        out["uniform_delta_eff_measured"] = delta_eff_measured(sel.uniform_z_star, sel.uniform.z_frozen)
    if sel is not None:
        out.update(
            {
                "selection_score_selected": float(sel.scores.mean()),
                "selection_score_pool": sel.score_pool_mean,
                "pool_size": float(sel.n_pool),
                "labelled_size": float(ft.n),
            }
        )
    stage("finetune")

    # ---------------------------------------------------------------- test errors
    test_kwargs: dict[str, Any] = dict(
        teacher=target_model,
        W_hat=W_hat,
        beta=beta,
        T=T,
        Delta=params.noise,
        n_test=10 * D if n_test is None else int(n_test),
        seed=seed,
        sigma=sigma,
        loss=loss,
        effective=eff,
    )
    out.update(test_errors(w_hat=fr.w, **test_kwargs))
    if sel is not None:
        nan = math.nan
        if fr_u is not None:  # same test sets (same seed and streams): paired differences
            te = test_errors(w_hat=fr_u.w, **test_kwargs)
            out["uniform_finetune_test_error"] = te["finetune_test_error"]
            out["uniform_forgetting_error"] = te["forgetting_error"]
            out["delta_finetune_test_error"] = te["finetune_test_error"] - out["finetune_test_error"]
            out["delta_overlap"] = out["overlap"] - out["uniform_overlap"]
        for k in ACTIVE_KEYS:
            out.setdefault(k, nan)
    stage("test")
    if return_weights:
        out.update({"W_hat": W_hat, "w_hat": fr.w, "W_star": target_model.W_star, "w_star": target_model.w_star})
    out["wall_time"] = time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class SimulationResult:
    """Seed-averaged simulation results.

    Attributes:
        params, dim, seeds, loss, device, effective: what was run.
        mean, se: per-key seed mean and standard error std/sqrt(n) (ddof = 1; NaN for one seed).
        per_seed: the raw per-seed dicts (with diagnostics such as the winning start).
        wall_time: total seconds.
    """

    params: Params
    dim: int
    seeds: tuple
    loss: str
    device: str
    effective: dict | None
    mean: dict
    se: dict
    per_seed: tuple
    wall_time: float
    meta: dict = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def converged(self) -> bool:
        return all(
            r[k] in (1.0,) or math.isnan(r[k])
            for r in self.per_seed
            for k in ("pretrain_converged", "finetune_converged")
        )

    def __getitem__(self, key: str) -> float:
        return self.mean[key]

    def to_dict(self, per_seed: bool = True) -> dict:
        d: dict[str, Any] = {}
        for k in self.mean:
            d[k] = self.mean[k]
            d[f"{k}_se"] = self.se[k]
        d.update(
            {
                "dim": self.dim,
                "seeds": list(self.seeds),
                "n_seeds": self.n_seeds,
                "loss": self.loss,
                "device": self.device,
                "mode": "effective" if self.effective else "full",
                "effective": self.effective,
                "converged": self.converged,
                "total_wall_time": self.wall_time,
                "params": self.params.to_dict(),
            }
        )
        d.update(self.meta)
        if per_seed:
            d["per_seed"] = [{k: v for k, v in r.items() if k not in WEIGHT_KEYS} for r in self.per_seed]
        return d


def _seed_list(seeds) -> tuple:
    if isinstance(seeds, bool):
        raise ParamError(f"seeds must be a count >= 1 or a list of seeds, got {seeds!r}")
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ParamError(f"seeds must be >= 1, got {seeds}")
        return tuple(range(int(seeds)))
    out = tuple(seeds)
    if not out:
        raise ParamError("seeds must not be empty")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise ParamError(f"seeds must be integers >= 0, got {s!r}")
    return out


def run(
    params: Params,
    dim: int,
    seeds: int | Sequence[int] = 4,
    *,
    device: str = "cpu",
    loss: str = "sequence",
    effective: dict | None = None,
    restarts: int = 2,
    progress: bool = False,
    **kwargs: Any,
) -> SimulationResult:
    """Run the pipeline for several seeds (``seeds=4`` means seeds 0..3) and average.

    Keyword arguments beyond those shown go to :func:`run_seed`.  ``optimal_beta='theory'``
    solves the pre-training state evolution once for all seeds.  With ``params.active_pool``
    set, :data:`ACTIVE_KEYS` are averaged too.
    """
    t0 = time.perf_counter()
    seed_list = _seed_list(seeds)
    _check(params, dim, loss, effective, kwargs.get("optimal_beta"), kwargs.get("teacher", "gaussian"))
    meta: dict[str, Any] = {"teacher": kwargs.get("teacher", "gaussian")}
    if kwargs.get("optimal_beta") is not None:
        meta["optimal_beta"] = kwargs["optimal_beta"]
    if kwargs.get("optimal_beta") == "theory" and effective is None:
        kwargs = dict(kwargs, optimal_beta=None)
        params = params.replace(beta=theory_beta_star(params))
        meta["beta_theory"] = params.beta
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 0:
        raise ParamError(f"restarts must be an integer >= 0, got {restarts!r}")
    dev = resolve_device(device)
    from ..resources import check_simulate  # refuse (one line) before allocating what cannot fit

    check_simulate(
        params,
        dim,
        seeds=len(seed_list),
        device=str(dev),
        effective=effective is not None,
        restarts=int(restarts),
        reduce_width=bool(kwargs.get("reduce_width", False)),
        n_test=kwargs.get("n_test"),
        token_storage=kwargs.get("token_storage", "auto"),
    )
    bar = None
    if progress:
        from ..progress import bar as progress_bar  # plain lines when stderr is not a terminal

        bar = progress_bar(total=3 * len(seed_list), file=sys.stderr, desc="simulate", unit="stage")
    records = []
    try:
        for s in seed_list:

            def on_stage(name, s=s):
                if bar is not None:
                    bar.set_postfix_str(f"seed {s}: {name} done")
                    bar.update(1)

            records.append(
                run_seed(
                    params,
                    dim,
                    s,
                    device=dev,
                    loss=loss,
                    effective=effective,
                    restarts=restarts,
                    on_stage=on_stage,
                    **kwargs,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    mean: dict[str, Any] = {}  # floats; lists for VECTOR_KEYS
    se: dict[str, Any] = {}
    n = len(records)
    for k in KEYS + (ACTIVE_KEYS if params.active_pool is not None else ()):
        v = np.array([r[k] for r in records], dtype=float)
        mean[k] = float(np.mean(v))
        se[k] = float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    for k in VECTOR_KEYS:  # entry by entry, when every seed has a list of the same length
        lists = [r.get(k) for r in records]
        if all(isinstance(x, list) for x in lists) and len({len(x) for x in lists if isinstance(x, list)}) == 1:
            a = np.array(lists, dtype=float).reshape(n, -1)
            mean[k] = a.mean(axis=0).tolist()
            se[k] = (a.std(axis=0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else [math.nan] * a.shape[1]
    return SimulationResult(
        params,
        dim,
        seed_list,
        loss,
        str(dev),
        dict(effective) if effective else None,
        mean,
        se,
        tuple(records),
        time.perf_counter() - t0,
        meta,
    )
