"""The model's parameters, as the paper names them (Section 2, eqs. 1-7).

One validated, immutable object is passed everywhere: the simulator, the state
evolution, the applications and the experiments all read their parameters from
a :class:`Params`.  Validation lives here and only here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("softmax", "linear")
#: allowed fixed-point tolerances of the state evolutions (relative residual); the default is 1e-7.
TOL_RANGE = (1e-12, 1e-3)

#: Monte-Carlo samples of each expectation of the state evolutions, unless told otherwise: the
#: paper's 3e4 (App. D).  The one default of every theory entry point, task and CLI.
DEFAULT_N_MC = 30_000


def A0(Q0: float, noise: float) -> float:
    """A0 = Q0 + Delta/2 (eq. 46): the per-entry variance scale of the noisy target field z*.

    The one definition; :attr:`Params.A0` is it at the model's own Q0 and Delta, theory code
    with an effective law (Q0, Q, M) calls it with that Q0.
    """
    return Q0 + 0.5 * noise


class ParamError(ValueError):
    """A parameter is outside its allowed range; the message names it and the range."""


#: largest LoRA rank r and teacher rank r* a Params accepts (the theory may allow less: its
#: per-sample unknown has T r entries).
MAX_RANK = 64


def _rank(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParamError(f"{name} must be an integer in [1, {MAX_RANK}], got {value!r}")
    if float(value) != int(value) or not 1 <= int(value) <= MAX_RANK:
        raise ParamError(f"{name} must be an integer in [1, {MAX_RANK}], got {value!r}")
    return int(value)


def _strengths(value: Any, r_star: int) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [x for x in value.replace(",", " ").split() if x]
    try:
        items = list(value)
    except TypeError:
        raise ParamError(
            f"teacher_strengths must be {r_star} numbers > 0 (one per teacher column), got {value!r}"
        ) from None
    out = tuple(real_number("teacher_strengths", x) for x in items)
    if len(out) != r_star or not all(math.isfinite(x) and x > 0 for x in out):
        raise ParamError(
            f"teacher_strengths must be {r_star} finite numbers > 0 (one per teacher column, teacher_rank = {r_star}), "
            f"got {value!r}"
        )
    return out


def real_number(name: str, value: Any) -> float:
    """``float(value)``, or a ParamError naming ``name`` when it is not a number or is NaN (+-inf pass)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ParamError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(x):
        raise ParamError(f"{name} must be a number, got NaN")
    return x


def check_tol(tol: Any) -> float:
    """A fixed-point tolerance in TOL_RANGE (a looser one would call a far-off point converged)."""
    lo, hi = TOL_RANGE
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (lo <= tol <= hi):
        raise ParamError(f"tol must be a number in [{lo:g}, {hi:g}], got {tol!r}; the default 1e-7 is usually right")
    return float(tol)


@dataclass(frozen=True)
class Params:
    """Parameters of the two-stage model (pre-training + rank-one LoRA).

    Attributes:
        alpha: alpha, pre-training sample ratio, N = alpha D^2 (eq. 7). > 0.
        alpha_ft: alpha', fine-tuning sample ratio, N' = alpha' D (eq. 7). > 0.
        tokens: T, number of tokens per sequence. Integer >= 2.
        kappa0: kappa0, target width ratio, P0 = kappa0 D. > 0.
        kappa: kappa, student width ratio, P = kappa D. >= 1.
        noise: Delta, label-noise strength (eq. 6). >= 0.
        lam: lambda, pre-training ridge on ||W||_F^2 (eq. 2). >= 0; inf means W_hat = 0
            (the LoRA-only baseline of A.7).
        lam_ft: lambda', fine-tuning ridge on ||w||^2 (eq. 3). >= 0; inf means w_hat = 0
            (the frozen pre-training baseline of A.7).
        reuse: e = 1 when True: the fine-tuning sequences are pre-training sequences
            (with their noise); e = 0 draws fresh ones.
        activation: "softmax" (row-wise) or "linear" (sigma(x) = x / T).
        beta: recalibration of the frozen map, W_hat -> sqrt(beta) W_hat before
            fine-tuning (eq. 26). > 0; 1 means no recalibration.
        active_pool: alpha_bar', size of the candidate pool of active fine-tuning
            (Algorithm 1), N_bar' = alpha_bar' D; None means uniform fine-tuning
            data. Must be >= alpha_ft.
        lora_rank: r, rank of the LoRA update w in R^{D x r} (beyond the paper; the paper's
            model is r = 1). Integer in [1, MAX_RANK].
        teacher_rank: r*, rank of the fine-tuning teacher w* in R^{D x r*} (the paper: 1).
            Integer in [1, MAX_RANK].
        teacher_strengths: s_k, the teacher's column strengths (w*_k = s_k g_k, q0 -> diag(s_k^2));
            None means all 1. A tuple of r* finite numbers > 0.
    """

    alpha: float = 0.1
    alpha_ft: float = 3.0
    tokens: int = 3
    kappa0: float = 1.0
    kappa: float = 1.0
    noise: float = 0.5
    lam: float = 0.1
    lam_ft: float = 0.5
    reuse: bool = False
    activation: str = "softmax"
    beta: float = 1.0
    active_pool: float | None = field(default=None)
    lora_rank: int = 1
    teacher_rank: int = 1
    teacher_strengths: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in ("alpha", "alpha_ft", "kappa0", "kappa", "noise", "lam", "lam_ft", "beta"):
            set_(name, real_number(name, getattr(self, name)))
        for name in ("alpha", "alpha_ft", "kappa0", "kappa", "noise", "beta"):
            if math.isinf(getattr(self, name)):
                raise ParamError(f"{name} must be finite, got inf")
        t = self.tokens
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or float(t) != int(t):
            raise ParamError(f"tokens (T) must be an integer >= 2, got {t!r}")
        set_("tokens", int(t))
        if self.tokens < 2:
            raise ParamError(f"tokens (T) must be an integer >= 2, got {self.tokens}")
        if self.alpha <= 0:
            raise ParamError(f"alpha must be > 0 (N = alpha D^2), got {self.alpha}")
        if self.alpha_ft <= 0:
            raise ParamError(f"alpha_ft (alpha') must be > 0 (N' = alpha' D), got {self.alpha_ft}")
        if self.kappa0 <= 0:
            raise ParamError(f"kappa0 must be > 0 (P0 = kappa0 D), got {self.kappa0}")
        if self.kappa < 1:
            raise ParamError(f"kappa must be >= 1 (P = kappa D, no width bottleneck), got {self.kappa}")
        if self.noise < 0:
            raise ParamError(f"noise (Delta) must be >= 0, got {self.noise}")
        if self.lam < 0:
            raise ParamError(f"lam (lambda) must be >= 0 or inf, got {self.lam}")
        if self.lam_ft < 0:
            raise ParamError(f"lam_ft (lambda') must be >= 0 or inf, got {self.lam_ft}")
        if self.beta <= 0:
            raise ParamError(f"beta must be > 0 (W_hat -> sqrt(beta) W_hat), got {self.beta}")
        if not isinstance(self.reuse, bool):
            if self.reuse in (0, 1):
                set_("reuse", bool(self.reuse))
            else:
                raise ParamError(f"reuse (e) must be a boolean (e = 0 or 1), got {self.reuse!r}")
        if self.activation not in ACTIVATIONS:
            raise ParamError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.active_pool is not None:
            pool = real_number("active_pool", self.active_pool)
            if not (math.isfinite(pool) and pool >= self.alpha_ft):
                raise ParamError(
                    f"active_pool (alpha_bar') must be finite and >= alpha_ft = {self.alpha_ft}, got {pool}"
                )
            if self.reuse:
                raise ParamError("active_pool (active fine-tuning) is defined for e = 0 only; set reuse=False")
            set_("active_pool", pool)
        for name in ("lora_rank", "teacher_rank"):
            set_(name, _rank(name, getattr(self, name)))
        if self.teacher_strengths is not None:
            set_("teacher_strengths", _strengths(self.teacher_strengths, self.teacher_rank))

    # ----- derived quantities -------------------------------------------------
    @property
    def e(self) -> int:
        """The paper's index e (0: fresh fine-tuning sequences, 1: reused)."""
        return int(self.reuse)

    @property
    def Q0(self) -> float:
        """Q0 = D^-2 Tr S*^2 -> 1 + kappa0 (eq. 8, high-dimensional limit)."""
        return 1.0 + self.kappa0

    @property
    def A0(self) -> float:
        """A0 = Q0 + Delta/2 (eq. 46), see :func:`A0`."""
        return A0(self.Q0, self.noise)

    @property
    def q0(self) -> tuple[float, ...]:
        """The diagonal of q0 = w*^T w* / D -> diag(s_k^2) (the paper: q0 = 1)."""
        s = self.teacher_strengths or (1.0,) * self.teacher_rank
        return tuple(x * x for x in s)

    @property
    def rank_one(self) -> bool:
        """The paper's model: r = r* = 1 with unit strength."""
        return self.lora_rank == 1 and self.teacher_rank == 1 and self.q0 == (1.0,)

    @property
    def frozen(self) -> bool:
        """lam_ft = inf: no LoRA update (w_hat = 0)."""
        return math.isinf(self.lam_ft)

    @property
    def lora_only(self) -> bool:
        """lam = inf: no pre-training (W_hat = 0)."""
        return math.isinf(self.lam)

    @property
    def rho(self) -> float | None:
        """Labelling ratio of active fine-tuning, rho = N'/N_bar' = alpha'/alpha_bar'."""
        return None if self.active_pool is None else self.alpha_ft / self.active_pool

    def sizes(self, dim: int) -> dict[str, int]:
        """Finite-D sizes: D, P0, P, N, N' (and the pool size), rounded, each >= 1.

        Raises ParamError when the sizes are inconsistent (e.g. e = 1 with N' > N).
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ParamError(f"dim (D) must be an integer >= 2, got {dim!r}")
        out = {
            "D": dim,
            "P0": max(1, round(self.kappa0 * dim)),
            "P": max(1, round(self.kappa * dim)),
            "N": max(1, round(self.alpha * dim * dim)),
            "N_ft": max(1, round(self.alpha_ft * dim)),
        }
        if self.active_pool is not None:
            out["N_pool"] = max(out["N_ft"], round(self.active_pool * dim))
        if self.reuse and out["N_ft"] > out["N"]:
            raise ParamError(
                f"reuse (e = 1) needs N' <= N, got N' = alpha_ft D = {out['N_ft']} > N = alpha D^2 = {out['N']} "
                f"at dim = {dim}"
            )
        return out

    def replace(self, **changes: Any) -> Params:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Params:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ParamError(f"unknown parameter(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**dict(d))
