"""One batched Newton prox solver for the output channels of both stages (eqs. 16/41 and 64).

Both channels are proximal operators of a per-sample loss,

    x_prox = argmin_x  loss(x) + sum_i (x_i - a_i)^2 / (2 w_i),            x in R^k,

with k = L = T(T+1)/2 for the pre-training Psi (eq. 42: x = h - z~, a = 0, w = V s_ab), k = T for
the fine-tuning psi (eq. 63: x = chi, a = chi~, w = v), and k = T r for a rank-r LoRA.  The potentials
supply the loss, its gradient and Hessian per sample; this module supplies the rest, once: the
Newton direction (Cholesky, saddle-free |eigenvalue| fallback), the Armijo line search, the
stopping rule, the per-sample loop (compiled, :mod:`hdlora.theory._newton_numba`) and the result
(:class:`ProxResult`).  The global search over several starts (multi-start, kept maximum,
verification) stays with each stage, which knows its starts.

The compiled kernel is imported on first use only (:func:`kernel`): importing
:mod:`hdlora.theory` or solving a closed-form (linear) point never imports numba.  Compilation
is cached on disk; :func:`warmup` compiles (or loads) it and :data:`COMPILE_SECONDS` records the
time that took in this process.

Why Numba (benchmarks/bench_theory.py ``kernel_choice``, 3e4 samples, T = 3, 1 thread, 2-core
machine under load ~4-5): one evaluation of the fine-tuning loss with gradient and Hessian took
0.011 s as a Numba loop over samples, 0.009 s as the NumPy token-first reference and 0.035 s as
PyTorch batched tensor ops on the same arrays (PyTorch rejected).  One evaluation is about as fast
in Numba as in NumPy; the gain is in fusing the whole Newton iteration per sample (no active-set
gathers, no temporaries, per-sample line search and fallback): softmax Fig. 1 point 5.12 s (old)
-> 3.69 s (new), min of 3 in the same run, docs/benchmarks/bench_theory.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .heap import keep_freed_memory

__all__ = [
    "ProxResult",
    "NewtonRule",
    "PRETRAIN",
    "FINETUNE",
    "FINETUNE_RANK_R",
    "kernel",
    "warmup",
    "compile_seconds",
    "minimise",
]

#: potential ids of the kernel (see :mod:`hdlora.theory._newton_numba`)
PRETRAIN = 0
FINETUNE = 1
SEPARABLE_QUARTIC = 2  # a test potential of any k (see the kernel module)
FINETUNE_RANK_R = 3  # the rank-r fine-tuning channel, k = T r (docs/theory/rank_r.md)

_KERNEL: Any = None
_COMPILE_SECONDS: float | None = None


def kernel() -> Any:
    """The compiled kernel module (imports numba, compiles or loads the on-disk cache, once).  The first call also
    keeps the memory its callers free in the heap (:func:`hdlora.theory.heap.keep_freed_memory`)."""
    global _KERNEL
    if _KERNEL is None:
        from . import _newton_numba

        keep_freed_memory()
        _KERNEL = _newton_numba
    return _KERNEL


def warmup() -> float:
    """Compile (or load from the disk cache) every specialisation the solvers use; returns the
    seconds spent (0 after the first call).  The benchmarks call it before timing."""
    global _COMPILE_SECONDS
    if _COMPILE_SECONDS is not None:
        return 0.0
    t0 = time.perf_counter()
    for kind, T, k in ((PRETRAIN, 2, 3), (FINETUNE, 2, 2)):
        for rule in (NewtonRule.pretrain(1e-10, 5, 1.0), NewtonRule.finetune(1e-9, 5, 1.0)):
            n_row = T * T + (k if kind == PRETRAIN else T * T)
            minimise(
                kind,
                np.zeros((1, k)),
                np.zeros((1, k)),
                np.ones(k),
                np.zeros((1, n_row)),
                T,
                True,
                rule,
                n_aux=1 if kind == FINETUNE else 0,
            )
    # the pre-training prox's report (the kernel's pretrain_post), through its one caller, so with that caller's argument
    # types.  Not here: evaluate_batch, which no solver calls (prox called directly with the linear activation, tests,
    # benchmarks); it compiles at its first use (15 s from an empty cache)
    from .prox import prox

    prox(np.zeros((1, 3)), np.zeros((1, 3)), 1.0, "softmax")
    _COMPILE_SECONDS = time.perf_counter() - t0
    return _COMPILE_SECONDS


def compile_seconds() -> float | None:
    """Seconds :func:`warmup` took in this process (None before it ran)."""
    return _COMPILE_SECONDS


@dataclass(frozen=True)
class NewtonRule:
    """Stopping rule, line search and fallback constants of :func:`minimise` (see the kernel).

    The two stages keep the constants they were validated with (so their fixed points do not move):
    :meth:`pretrain` stops on the stationarity residual, :meth:`finetune` on the Newton step size.
    """

    stop: int  # 0: residual max|w dloss + x - a| <= tol scale0; 1: step < tol (1 + |x|)
    tol: float
    max_iter: int
    pd_min: float  # Cholesky pivots must exceed this
    floor_rel: float  # saddle-free fallback: |lambda| >= floor_rel max|lambda| + floor_abs
    floor_abs: float
    trust: float  # full step without test when |step| (<=|<) trust (scale0 + |x|)
    scale0: float
    norm_kind: int  # 0: max-norm, '<=';  1: 2-norm, '<'
    armijo_rel: float  # Armijo slack, relative to |f|
    n_try: int  # step lengths 1, 1/2, ... tried
    take_last: bool  # no Armijo step: take the last one (True) or stay and stop (False)
    shift_invariant: bool = False  # loss(x + c 1) = loss(x): Newton on the hyperplane (see the kernel)

    @classmethod
    def pretrain(cls, tol: float, max_iter: int, V: float, shift_invariant: bool = False) -> NewtonRule:
        """Pre-training (eq. 42): residual of h = z~ - V s grad l(h) below tol min(1, V).

        ``shift_invariant`` (softmax: sigma(h + c 11^T) = sigma(h)): the component of h - z~ along
        11^T is removed analytically and a sample also stops when its Newton step is below
        tol min(1, V) (the residual above carries V x rounding and cannot reach tol when V ~ 1/lam).
        """
        scale = min(1.0, V)
        return cls(0, tol, max_iter, 0.0, 1e-8, 1e-300, 1e-6, scale, 0, 4e-16, 35, True, shift_invariant)

    @classmethod
    def finetune(cls, xtol: float, max_steps: int, v: float) -> NewtonRule:
        """Fine-tuning (eq. 63): Newton step below xtol (1 + |chi|) at a negative-definite Hessian."""
        return cls(1, xtol, max_steps, 1e-300, 0.0, 1e-3 / v, 1e-3, 1.0, 1, 1e-14, 40, False)

    def as_array(self) -> np.ndarray:
        return np.array(
            [
                self.stop,
                self.tol,
                self.max_iter,
                self.pd_min,
                self.floor_rel,
                self.floor_abs,
                self.trust,
                self.scale0,
                self.norm_kind,
                self.armijo_rel,
                self.n_try,
                float(self.take_last),
            ],
            dtype=np.float64,
        )


@dataclass(frozen=True)
class NewtonOutput:
    """Raw per-sample output of :func:`minimise` (rows = samples)."""

    x: np.ndarray  # (n, k) final iterate
    f: np.ndarray  # (n,) objective loss + prior at the point of the derivatives below
    loss: np.ndarray  # (n,)
    grad: np.ndarray  # (n, k) d loss / dx
    hess: np.ndarray  # (n, k, k) d2 loss / dx2
    aux: np.ndarray  # (n, n_aux) potential-specific (fine-tuning: Tr dl/dX)
    residual: np.ndarray  # (n,)
    converged: np.ndarray  # (n,) bool
    iterations: int  # max over samples
    merged: np.ndarray  # (n,) bool: stopped on the way to ``ref`` (see :func:`minimise`)


def minimise(
    kind: int,
    x0: np.ndarray,
    anchor: np.ndarray,
    w: np.ndarray,
    data: np.ndarray,
    T: int,
    softmax: bool,
    rule: NewtonRule,
    *,
    n_aux: int = 0,
    ref: np.ndarray | None = None,
    merge_radius: float = 1e-2,
) -> NewtonOutput:
    """Run the compiled Newton kernel on every row: min_x loss_kind(x; data) + sum (x - anchor)^2 / (2 w).

    ``ref`` (n, k): a minimiser already found per sample (a global search's first start); a row whose
    iterate, at a positive-definite Hessian, comes with its Newton step within ``merge_radius`` (1 + |ref|)
    of it stops there as ``merged`` (not converged, its f not a minimum): it would end at ``ref``.
    """
    K = kernel()
    x0 = np.ascontiguousarray(x0, dtype=np.float64)
    n, k = x0.shape
    # x, f, loss, g, H, aux, residual, converged, iterations, merged (the kernel's outputs, in its order)
    outs = (
        np.empty((n, k)),
        np.empty(n),
        np.empty(n),
        np.empty((n, k)),
        np.empty((n, k, k)),
        np.empty((n, max(n_aux, 1))),
        np.empty(n),
        np.empty(n, dtype=np.bool_),
        np.empty(n, dtype=np.int64),
        np.zeros(n, dtype=np.bool_),
    )
    consts = np.array([float(T), 1.0 if softmax else 0.0])
    opts = rule.as_array()
    if ref is None:
        ref = np.zeros((1, 1))
        opts = np.append(opts, [0.0, float(rule.shift_invariant)])
    else:
        ref = np.ascontiguousarray(ref, dtype=np.float64)
        if ref.shape != (n, k) or not merge_radius > 0:
            raise ValueError(f"ref must have shape {(n, k)} and merge_radius be > 0")
        opts = np.append(opts, [merge_radius, float(rule.shift_invariant)])
    a, w_, d = (np.ascontiguousarray(u, dtype=np.float64) for u in (anchor, w, data))
    it = K.newton_prox(kind, x0, a, w_, d, consts, opts, n_aux, ref, *outs)
    x, f, loss, g, H, aux, res, conv, _its, merged = outs
    return NewtonOutput(x, f, loss, g, H, aux[:, :n_aux], res, conv, int(it), merged)


@dataclass(frozen=True)
class ProxResult:
    """The prox of one output channel for n samples (eq. 16/41 for Psi, eq. 64 for psi).

    Attributes:
        x: (n, k) the maximiser kept (pre-training: the upper triangle of h; fine-tuning: chi).
        value: (n,) the potential there (Psi of eq. 42 or psi of eq. 63).
        hessian: (n, k, k) Hessian of the potential at x (None when not asked for).
        residual: (n,) pre-training: the stationarity residual (see :func:`hdlora.theory.prox.prox`);
            fine-tuning: the last Newton step size (the error of x is ~ its square).
        converged: (n,) per sample: the Newton iteration met its tolerance (pre-training: also at
            a negative-definite Hessian, a maximum).
        iterations: Newton iterations (pre-training: summed over the starts; fine-tuning: 0).
        n_not_max: samples whose Hessian at x is not negative definite (saddle).
        n_start_changed: samples where a start other than the first gave the kept maximum.
        extra: stage-specific derived quantities: pre-training ``delta`` (h - z~), ``jacobian_diag``
            (d Prox / d z~, diagonal), ``replicon`` (sample term of eq. 75, or None); fine-tuning
            ``C`` (eq. 66), ``dpsi_dq`` (eq. 72).
    """

    x: np.ndarray
    value: np.ndarray
    hessian: np.ndarray | None
    residual: np.ndarray
    converged: np.ndarray
    iterations: int
    n_not_max: int = 0
    n_start_changed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    @property
    def n_failed(self) -> int:
        return int(np.size(self.converged) - np.count_nonzero(self.converged))

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)
