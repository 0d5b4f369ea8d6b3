"""The compiled batched Newton prox kernel (Numba); imported lazily by :mod:`hdlora.theory.newton`.

Do not import this module directly: :func:`hdlora.theory.newton.kernel` does, the first time a
prox needs it, so that a CLI call or a closed-form (linear) solve never imports numba.  All
functions are ``@njit(cache=True)``: compiled once per machine, cached on disk next to this file.
The small per-iteration helpers of :func:`newton_prox` (direction, Cholesky, norm, objective) and the two
potentials (into :func:`loss_derivatives`) are Numba-inlined (``inline="always"``): no calls with a dozen array
arguments inside the per-sample loop, the same operations in the same order.  Measured (a Fig. 1 fine-tuning
global search, 12 alternating repeats, minimum): 0.314 s -> 0.264 s for the helpers; compile time +3 s.
The per-sample loops and every function they call run without Numba's reference counting (``_LEAF``), the
full Newton step's evaluation has the potentials of T = 2, 3 inlined on stack arrays (:func:`_loss_inlined`), and for
the k of those potentials the Newton loop's own work arrays are on the stack too (:func:`_newton_on_stack`); see there.

One kernel, :func:`newton_prox`, minimises per sample

    f(x) = loss(x) + sum_i (x_i - a_i)^2 / (2 w_i),       x in R^k,

(the proximal operator of ``loss`` in the metric diag(w), anchor a), by safeguarded Newton:
Cholesky direction, saddle-free |eigenvalue| direction where the Hessian of f is not positive
definite, Armijo backtracking.  The loss, its gradient and Hessian in x are supplied per sample by
:func:`loss_derivatives`, which dispatches on ``kind`` (the potentials below); k is read from the
arrays (a compile-time constant for the k of :data:`STACK_K`, :func:`_newton_on_stack`).

Potentials (``kind``):
    PRETRAIN (0): the pre-training channel Psi of eq. 42 in the displacement x = delta = h - z~
        (k = L = T(T+1)/2; row = [z~ (L), sigma(z*) (T*T)]); loss = ||sigma(h) - sigma(z*)||_F^2.
    FINETUNE (1): the fine-tuning channel psi of eq. 63 in x = chi (k = T; row = [z - q I (T*T),
        sigma(z* + chi* chi*^T - q0 I) (T*T)]); loss = ||sigma(z - q I + chi chi^T) - Y||_F^2;
        aux[0] = d loss / d(-q) = Tr dl/dX (eq. 72).
    SEPARABLE_QUARTIC (2): a test potential of any k, loss = sum_i c_i (x_i^2 - 1)^2 (row = c, k
        entries): non-concave, separable, with a known global prox per coordinate.
    FINETUNE_RANK_R (3): the rank-r fine-tuning channel (docs/theory/rank_r.md, R.3) in x = vec(chi),
        chi in R^{T x r} row-major (k = T r, r = k // T); row = [z - tr(q) I (T*T), Y (T*T)] as FINETUNE;
        loss = ||sigma(z - tr(q) I + chi chi^T) - Y||_F^2; aux[0] = Tr dl/dX = d psi / d tr q.
``consts`` = [T, softmax (1) or linear (0)] (T is unused by SEPARABLE_QUARTIC).
"""

from __future__ import annotations

import math
from typing import Any

import llvmlite.binding as llvm
import numpy as np
from numba import literally, njit, types
from numba.core import cgutils, config, event
from numba.extending import intrinsic

#: LLVM's thresholds while this module's functions compile (LLVM's own at -O3: 300 and 250).  Unrolling: the row
#: loops of the potentials at T = 2, 3 unroll completely, so that every index into their stack arrays is a constant
#: and the arrays live in registers (:func:`_stack_t3`; 600 is the least that does at T = 3).  Inlining: the stack
#: potentials, once unrolled, are inlined by LLVM into :func:`loss_derivatives` and the Newton loop (6000 is the least
#: that does; inlined by Numba instead, the kernel took 145 s to compile from an empty cache instead of 46 s, measured
#: before the Newton loop's stack specialisations, which brought it to 70-75 s).
#: tests/theory/test_stack_potentials.py checks both in the compiled code.  They change how the code is compiled,
#: never what it computes, and apply to this module only (:class:`_CompileOptions`).
LLVM_OPTIONS = {"unroll-threshold": 1500, "inline-threshold": 12000}


class _CompileOptions(event.Listener):
    """Sets :data:`LLVM_OPTIONS` while Numba compiles a function of this module (Numba's "numba:compile" events, its
    callees compiled within), and LLVM's values at Numba's optimisation level back when it is done, so that other
    Numba code in the process compiles as it would without hdlora."""

    def __init__(self) -> None:
        self.depth = 0

    @staticmethod
    def _ours(ev: event.Event) -> bool:
        data = ev.data if isinstance(ev.data, dict) else {}
        return getattr(getattr(data.get("dispatcher"), "py_func", None), "__module__", None) == __name__

    @staticmethod
    def _set(values: dict[str, int]) -> None:
        for name, value in values.items():
            llvm.set_option("", f"-{name}={value}")

    def on_start(self, ev: event.Event) -> None:
        if self._ours(ev):
            if self.depth == 0:
                self._set(LLVM_OPTIONS)
            self.depth += 1

    def on_end(self, ev: event.Event) -> None:
        if self._ours(ev):
            self.depth -= 1
            if self.depth == 0:
                self._set(_llvm_defaults(getattr(config, "OPT", 3)))


def _llvm_defaults(opt: object) -> dict[str, int]:
    """LLVM's unroll and inline thresholds at Numba's optimisation level ``opt`` (numba.core.config.OPT, an int
    subclass, 3 for NUMBA_OPT=max; or 0-3, 'max')."""
    aggressive = opt == "max" or int(opt) > 2  # type: ignore[call-overload]
    return {"unroll-threshold": 300 if aggressive else 150, "inline-threshold": 250 if aggressive else 225}


event.register("numba:compile", _CompileOptions())

PRETRAIN = 0
FINETUNE = 1
SEPARABLE_QUARTIC = 2
FINETUNE_RANK_R = 3

#: the options of every kernel function that allocates nothing: compiled without Numba's reference counting
#: (``_nrt=False``).  With it, every call with array arguments (and every row view such as ``data[s]``) increfs
#: and decrefs each array's memory block with atomic operations: measured (replayed Newton calls of the Fig. 1
#: point), one loss evaluation through :func:`loss_derivatives` 182 ns with, 110 ns without.  Such a function
#: cannot allocate (Numba refuses to compile one that does), so the allocating entry points (:func:`newton_prox`,
#: :func:`evaluate_batch`) allocate their work arrays and hand them to a loop compiled with these options.  Only the
#: reference counting goes: the floating-point operations are the same (replayed kernel calls bit-identical,
#: docs/VALIDATION.md section 8); tests/theory/test_newton.py checks that the options stay.
_LEAF: dict[str, Any] = {"cache": True, "error_model": "numpy", "_nrt": False}


@njit(**_LEAF)
def _softmax_rows(X, P, T):
    for a in range(T):
        m = X[a, 0]
        for b in range(1, T):
            if X[a, b] > m:
                m = X[a, b]
        s = 0.0
        for b in range(T):
            P[a, b] = math.exp(X[a, b] - m)
            s += P[a, b]
        for b in range(T):
            P[a, b] = P[a, b] / s


@njit(**_LEAF)
def _sigma_residual(X, row, off, T, softmax, P, R):
    """P = sigma(X) (row-wise softmax, or X / T), R = P - Y with Y = row[off : off + T*T] (row-major); returns
    the loss ||R||_F^2 (the shared part of every potential)."""
    if softmax:
        _softmax_rows(X, P, T)
    else:
        for a in range(T):
            for b in range(T):
                P[a, b] = X[a, b] / T
    loss = 0.0
    for a in range(T):
        for b in range(T):
            r = P[a, b] - row[off + a * T + b]
            R[a, b] = r
            loss += r * r
    return loss


@njit(**_LEAF)
def _dloss_dX(P, R, T, softmax, G, expanded=False):
    """G = dl/dX of l = ||sigma(X) - Y||_F^2: softmax 2 U, U = P o (R - (P.R) 1^T); linear 2 R / T.
    ``expanded``: U computed as P o R - P o (P.R) 1^T (the pre-training channel's rounding, kept so that its numbers
    are unchanged).  Returns Tr G (= d l / d(-q) through the shift -q I: aux[0] of the fine-tuning potentials,
    eq. 72)."""
    if softmax:
        for a in range(T):
            s = 0.0
            for b in range(T):
                s += P[a, b] * R[a, b]
            if expanded:
                for b in range(T):
                    G[a, b] = 2.0 * (P[a, b] * R[a, b] - P[a, b] * s)
            else:
                for b in range(T):
                    G[a, b] = 2.0 * (P[a, b] * (R[a, b] - s))
    else:
        for a in range(T):
            for b in range(T):
                G[a, b] = (2.0 / T) * R[a, b]
    dq = 0.0
    for a in range(T):
        dq += G[a, a]
    return dq


@njit(cache=True, error_model="numpy", inline="always")  # into loss_derivatives, see there
def _pretrain_loss(x, row, T, softmax, order, g, H, X, P, R, G):
    """Psi of eq. 42 (loss part) at h = z~ + x; g, H in the L free entries (upper triangle, row-major)."""
    L = x.shape[0]
    i = 0
    for a in range(T):
        for b in range(a, T):
            v = row[i] + x[i]
            X[a, b] = v
            X[b, a] = v
            i += 1
    loss = _sigma_residual(X, row, L, T, softmax, P, R)
    if order == 0:
        return loss
    # gradient of the loss in the full T x T entries (G), then folded onto the free entries
    _dloss_dX(P, R, T, softmax, G, True)
    i = 0
    for a in range(T):
        for b in range(a, T):
            g[i] = G[a, b] + G[b, a] if a != b else G[a, a]
            i += 1
    if order < 2:
        return loss
    for p in range(L):
        for q in range(L):
            H[p, q] = 0.0
    if softmax:
        # row a: Hess l_a = 2 [diag(p (p + r - w)) - p q^T - q p^T + c p p^T], q = p (p + r), c = |p|^2 + 2 w
        for a in range(T):
            w = 0.0
            c = 0.0
            for b in range(T):
                w += P[a, b] * R[a, b]
                c += P[a, b] * P[a, b]
            c += 2.0 * w
            for b in range(T):
                ib = _free(a, b, T)
                pb = P[a, b]
                qb = pb * pb + pb * R[a, b]
                for d in range(T):
                    pd = P[a, d]
                    qd = pd * pd + pd * R[a, d]
                    hv = c * pb * pd - pb * qd - qb * pd
                    if b == d:
                        hv += pb * (pb + R[a, b] - w)
                    H[ib, _free(a, d, T)] += 2.0 * hv
    else:
        k2 = 2.0 / (T * T)
        for a in range(T):
            for b in range(T):
                ib = _free(a, b, T)
                H[ib, ib] += k2
    return loss


@njit(**_LEAF)
def _free(a, b, T):
    """Index of the free entry (min(a,b), max(a,b)) in the row-major upper triangle."""
    if a > b:
        a, b = b, a
    return a * T - (a * (a - 1)) // 2 + (b - a)


@njit(cache=True, error_model="numpy", inline="always")  # into loss_derivatives, see there
def _finetune_loss(x, row, T, softmax, order, g, H, aux, X, P, R, G):
    """psi of eq. 63 (loss part) at chi = x: X = (z - q I) + chi chi^T, loss = ||sigma(X) - Y||^2."""
    TT = T * T
    for a in range(T):
        for b in range(T):
            X[a, b] = row[a * T + b] + x[a] * x[b]
    loss = _sigma_residual(X, row, TT, T, softmax, P, R)
    if order == 0:
        return loss
    aux[0] = _dloss_dX(P, R, T, softmax, G)
    for a in range(T):
        acc = 0.0
        for b in range(T):
            acc += (G[a, b] + G[b, a]) * x[b]
        g[a] = acc
    if order < 2:
        return loss
    # Hess l = G + G^T + diag_k(chi^T h_k chi) + chi_k (h_k chi)_l + chi_l (h_l chi)_k + sum_a chi_a^2 h_a
    if softmax:
        # h_a = 2 [diag(w) - w p^T - p w^T + |p|^2 p p^T], w = p o p + u   (row a)
        # hc[a] = h_a chi, quad[a] = chi^T h_a chi, S4 = sum_a chi_a^2 h_a
        for p in range(T):
            for q in range(T):
                H[p, q] = 0.0
        for a in range(T):
            pp = 0.0
            pchi = 0.0
            wchi = 0.0
            for b in range(T):
                pab = P[a, b]
                wab = pab * pab + 0.5 * G[a, b]
                pp += pab * pab
                pchi += pab * x[b]
                wchi += wab * x[b]
            quad = 0.0
            for b in range(T):
                pab = P[a, b]
                wab = pab * pab + 0.5 * G[a, b]
                hc = 2.0 * (wab * x[b] - wab * pchi - pab * wchi + pp * pchi * pab)
                quad += hc * x[b]
                # chi_a (h_a chi)_b + chi_b (h_b chi)_a : M2[a, b] + M2[b, a]
                H[a, b] += x[a] * hc
                H[b, a] += x[a] * hc
            H[a, a] += quad
            ca = x[a] * x[a]
            for b in range(T):
                pab = P[a, b]
                wab = pab * pab + 0.5 * G[a, b]
                H[b, b] += 2.0 * ca * wab
                for d in range(T):
                    pad = P[a, d]
                    wad = pad * pad + 0.5 * G[a, d]
                    H[b, d] += 2.0 * ca * (pp * pab * pad - wab * pad - pab * wad)
        for p in range(T):
            for q in range(T):
                H[p, q] += G[p, q] + G[q, p]
    else:
        k2 = 2.0 / (T * T)
        c2 = 0.0
        for a in range(T):
            c2 += x[a] * x[a]
        for p in range(T):
            for q in range(T):
                H[p, q] = G[p, q] + G[q, p] + 2.0 * k2 * x[p] * x[q]
            H[p, p] += 2.0 * k2 * c2
    return loss


@njit(**_LEAF)
def _finetune_rank_r_loss(x, row, T, softmax, order, g, H, aux, X, P, R, G):
    """psi at rank r (docs/theory/rank_r.md, R.3, R.11) at vec(chi) = x (row-major, index a r + c; r = k // T):
    X = (z - tr(q) I) + chi chi^T, loss = ||sigma(X) - Y||_F^2; aux[0] = Tr dl/dX = d psi / d tr q.
    X is reused as the scratch of the row Hessians h_a once sigma(X) is known.  At r = 1 it equals FINETUNE."""
    k = x.shape[0]
    r = k // T
    TT = T * T
    for a in range(T):
        for b in range(T):
            acc = row[a * T + b]
            for c in range(r):
                acc += x[a * r + c] * x[b * r + c]
            X[a, b] = acc
    val = _sigma_residual(X, row, TT, T, softmax, P, R)
    if order == 0:
        return val
    aux[0] = _dloss_dX(P, R, T, softmax, G)
    for a in range(T):
        for c in range(r):
            acc = 0.0
            for b in range(T):
                acc += (G[a, b] + G[b, a]) * x[b * r + c]
            g[a * r + c] = acc
    if order < 2:
        return val
    for i in range(k):
        for j in range(k):
            H[i, j] = 0.0
    for a in range(T):
        for b in range(T):
            gs = G[a, b] + G[b, a]
            for c in range(r):
                H[a * r + c, b * r + c] += gs
    for a in range(T):
        # row Hessian h_a into X (X is no longer needed)
        if softmax:
            pp = 0.0
            for b in range(T):
                pp += P[a, b] * P[a, b]
            for b in range(T):
                wb = P[a, b] * P[a, b] + 0.5 * G[a, b]
                for e in range(T):
                    we = P[a, e] * P[a, e] + 0.5 * G[a, e]
                    hv = pp * P[a, b] * P[a, e] - wb * P[a, e] - P[a, b] * we
                    if b == e:
                        hv += wb
                    X[b, e] = 2.0 * hv
        else:
            for b in range(T):
                for e in range(T):
                    X[b, e] = 2.0 / (T * T) if b == e else 0.0
        for b in range(T):
            for kk in range(r):
                hx = 0.0  # (h_a xi)_{b kk}
                for e in range(T):
                    hx += X[b, e] * x[e * r + kk]
                for j in range(r):
                    val2 = hx * x[a * r + j]
                    H[a * r + kk, b * r + j] += val2  # (h_a xi)_bk xi_aj
                    H[b * r + j, a * r + kk] += val2  # and its transpose
                    # delta_ab (xi^T h_a xi)_{kk j}: sum over b of xi_{b kk} (h_a xi)_{b j} -- below
        for kk in range(r):
            for j in range(r):
                qd = 0.0
                for b in range(T):
                    for e in range(T):
                        qd += x[b * r + kk] * X[b, e] * x[e * r + j]
                H[a * r + kk, a * r + j] += qd
        # sum_c (h_c)_{b e} xi_ck xi_cj with c = a
        for b in range(T):
            for e in range(T):
                hbe = X[b, e]
                if hbe == 0.0:
                    continue
                for kk in range(r):
                    for j in range(r):
                        H[b * r + kk, e * r + j] += hbe * x[a * r + kk] * x[a * r + j]
    return val


@intrinsic
def _stack_array(typingctx, n, m):
    """An uninitialised C-contiguous float64 array of shape (n, m) (m = 0: a vector of length n) in the stack frame of
    the function it is compiled into; n, m literal integers.  No allocation and no reference counting: LLVM keeps
    such an array in registers once every index into it is a constant (:func:`_on_stack_finetune`)."""
    if not (isinstance(n, types.IntegerLiteral) and isinstance(m, types.IntegerLiteral)):
        return None
    shape = (n.literal_value,) if m.literal_value == 0 else (n.literal_value, m.literal_value)
    array = types.Array(types.float64, len(shape), "C")

    def codegen(context, builder, signature, args):
        item = context.get_value_type(types.float64)
        size = context.get_abi_sizeof(item)
        data = cgutils.alloca_once(builder, item, size=math.prod(shape))
        out = context.make_array(array)(context, builder)
        strides = [size * math.prod(shape[i + 1 :]) for i in range(len(shape))]
        context.populate_array(
            out,
            data=data,
            shape=[context.get_constant(types.intp, v) for v in shape],
            strides=[context.get_constant(types.intp, v) for v in strides],
            itemsize=context.get_constant(types.intp, size),
            meminfo=None,
        )
        return out._getvalue()

    return array(n, m), codegen


@njit(cache=True, error_model="numpy", inline="always")  # into _stack_t3, _stack_t2
def _on_stack_finetune(T, x, row, order, g, H, aux):
    """:func:`_finetune_loss` (softmax) at a literal T, on copies in the stack frame of chi and of the outputs, with
    the T x T work arrays there too, then the outputs of ``order`` copied out.

    The loops are the kernel's one statement of each potential.  On heap arrays (arguments, which may alias one
    another) LLVM must load and store every element at every use; on stack arrays of constant size, with the loops
    fully unrolled and every index a constant (:data:`LLVM_OPTIONS`), it keeps them all in registers.  The same
    floating-point operations in the same order, so the same numbers bit for bit (tests/theory/test_stack_potentials.py).
    This replaced the same loops unrolled by a script into 800 lines of code on named scalars, as fast (measured in
    docs/VALIDATION.md section 8); the loops on the heap arrays are 10-15 % slower."""
    xs = _stack_array(T, 0)
    gs = _stack_array(T, 0)
    Hs = _stack_array(T, T)
    a = _stack_array(1, 0)
    for i in range(T):
        xs[i] = x[i]
    loss = _finetune_loss(
        xs, row, T, True, order, gs, Hs, a, _stack_array(T, T), _stack_array(T, T), _stack_array(T, T),
        _stack_array(T, T),
    )  # fmt: skip
    _copy_out(order, gs, Hs, g, H)
    if order >= 1:
        aux[0] = a[0]
    return loss


@njit(cache=True, error_model="numpy", inline="always")  # into _stack_t3, _stack_t2
def _on_stack_pretrain(T, L, x, row, order, g, H):
    """:func:`_pretrain_loss` (softmax) at a literal T, L = T (T + 1) / 2, on the stack as :func:`_on_stack_finetune`."""
    xs = _stack_array(L, 0)
    gs = _stack_array(L, 0)
    Hs = _stack_array(L, L)
    for i in range(L):
        xs[i] = x[i]
    loss = _pretrain_loss(
        xs, row, T, True, order, gs, Hs, _stack_array(T, T), _stack_array(T, T), _stack_array(T, T),
        _stack_array(T, T),
    )  # fmt: skip
    _copy_out(order, gs, Hs, g, H)
    return loss


@njit(**_LEAF)
def _stack_t3(kind, x, row, order, g, H, aux):
    """The softmax potential ``kind`` (FINETUNE or PRETRAIN) at T = 3 on the stack (:func:`_on_stack_finetune`)."""
    if kind == FINETUNE:
        return _on_stack_finetune(3, x, row, order, g, H, aux)
    return _on_stack_pretrain(3, 6, x, row, order, g, H)


@njit(**_LEAF)
def _stack_t2(kind, x, row, order, g, H, aux):
    """As :func:`_stack_t3` at T = 2."""
    if kind == FINETUNE:
        return _on_stack_finetune(2, x, row, order, g, H, aux)
    return _on_stack_pretrain(2, 3, x, row, order, g, H)


@njit(cache=True, error_model="numpy", inline="always")  # into _on_stack_finetune, _on_stack_pretrain
def _copy_out(order, gs, Hs, g, H):
    """g = gs for order >= 1, H = Hs for order >= 2 (what the loops would have written)."""
    k = gs.shape[0]
    if order >= 1:
        for i in range(k):
            g[i] = gs[i]
    if order >= 2:
        for i in range(k):
            for j in range(k):
                H[i, j] = Hs[i, j]


@njit(cache=True, error_model="numpy")
def _token_scratch(consts):
    """The T x T work arrays X, P, R, G of :func:`loss_derivatives` (T = consts[0], at least 1)."""
    T = max(int(consts[0]), 1)
    return np.empty((T, T)), np.empty((T, T)), np.empty((T, T)), np.empty((T, T))


@njit(**_LEAF)
def loss_derivatives(kind, x, row, consts, order, g, H, aux, X, P, R, G):
    """The loss of potential ``kind`` at x (and, for order >= 1, 2, its gradient g and Hessian H).

    The softmax channels at T = 2 and 3 (the paper's figures) run the loops on arrays in the stack frame, in registers
    (:func:`_on_stack_finetune`); every other case runs them on the T x T work arrays X, P, R, G (:func:`_loop_loss`),
    the reference of tests/theory/test_stack_potentials.py.  The dispatch is :func:`_loss_inlined`, inlined here and at
    the hottest call of :func:`_newton_samples`."""
    return _loss_inlined(kind, x, row, consts, order, g, H, aux, X, P, R, G)


@njit(cache=True, error_model="numpy", inline="always")  # into loss_derivatives and the hot call of _newton_samples
def _loss_inlined(kind, x, row, consts, order, g, H, aux, X, P, R, G):
    """The one dispatch of the potentials: the softmax potentials of T = 2, 3 on the stack (:func:`_stack_t3`, which
    LLVM inlines here), every other case a call of :func:`_loop_loss`.  Inlined by Numba into :func:`loss_derivatives`
    and into the hottest call of :func:`_newton_samples` (the full Newton step's evaluation, made at every step of every
    sample), which so makes no call for the paper's settings.  Measured (replayed Newton calls of the Fig. 1 point,
    25 alternating repeats, min): pre-training 250 -> 214 ms, fine-tuning 396 -> 351 ms."""
    T = int(consts[0])
    if consts[1] != 0.0 and (kind == FINETUNE or kind == PRETRAIN):
        if T == 3:
            return _stack_t3(kind, x, row, order, g, H, aux)
        if T == 2:
            return _stack_t2(kind, x, row, order, g, H, aux)
    return _loop_loss(kind, x, row, consts, order, g, H, aux, X, P, R, G)


@njit(**_LEAF)
def _loop_loss(kind, x, row, consts, order, g, H, aux, X, P, R, G):
    """The potentials as loops over the T x T work arrays X, P, R, G (the loops inlined; any T, either activation)."""
    T = int(consts[0])
    softmax = consts[1] != 0.0
    if kind == PRETRAIN:
        return _pretrain_loss(x, row, T, softmax, order, g, H, X, P, R, G)
    if kind == FINETUNE:
        return _finetune_loss(x, row, T, softmax, order, g, H, aux, X, P, R, G)
    if kind == FINETUNE_RANK_R:
        return _finetune_rank_r_loss(x, row, T, softmax, order, g, H, aux, X, P, R, G)
    return _separable_quartic_loss(x, row, order, g, H)


@njit(**_LEAF)
def _separable_quartic_loss(x, row, order, g, H):
    k = x.shape[0]
    loss = 0.0
    for i in range(k):
        u = x[i] * x[i] - 1.0
        loss += row[i] * u * u
    if order == 0:
        return loss
    for i in range(k):
        g[i] = 4.0 * row[i] * x[i] * (x[i] * x[i] - 1.0)
    if order < 2:
        return loss
    for i in range(k):
        for j in range(k):
            H[i, j] = 0.0
        H[i, i] = row[i] * (12.0 * x[i] * x[i] - 4.0)
    return loss


@njit(**_LEAF)
def _rotate_columns(A, p, q, c, sn):
    """Columns p, q of A -> (c A_p - sn A_q, sn A_p + c A_q) (a Jacobi rotation applied on the right)."""
    for r in range(A.shape[0]):
        arp = A[r, p]
        arq = A[r, q]
        A[r, p] = c * arp - sn * arq
        A[r, q] = sn * arp + c * arq


@njit(**_LEAF)
def jacobi_eigh(A, lam, U, B):
    """Eigen-decomposition A = U diag(lam) U^T of a small symmetric matrix by cyclic Jacobi
    rotations (no allocation; B is work space), swept until the off-diagonal part is below
    1e-12 of the Frobenius norm (eigenvalue errors ~ its square) (at most 50 sweeps).  Eigenvalues unsorted."""
    k = A.shape[0]
    total = 0.0
    for i in range(k):
        for j in range(k):
            B[i, j] = A[i, j]
            U[i, j] = 1.0 if i == j else 0.0
            total += A[i, j] * A[i, j]
    for _sweep in range(50):
        off = 0.0
        for p in range(k - 1):
            for q in range(p + 1, k):
                off += B[p, q] * B[p, q]
        if not off > 1e-24 * total:
            break
        for p in range(k - 1):
            for q in range(p + 1, k):
                apq = B[p, q]
                if apq == 0.0:
                    continue
                theta = (B[q, q] - B[p, p]) / (2.0 * apq)
                if abs(theta) > 1e150:
                    t = 0.5 / theta
                else:
                    t = 1.0 / (abs(theta) + math.sqrt(theta * theta + 1.0))
                    if theta < 0.0:
                        t = -t
                c = 1.0 / math.sqrt(t * t + 1.0)
                sn = t * c
                _rotate_columns(B, p, q, c, sn)
                _rotate_columns(B.T, p, q, c, sn)  # the rows of B
                _rotate_columns(U, p, q, c, sn)
    for i in range(k):
        lam[i] = B[i, i]


@njit(cache=True, error_model="numpy", inline="always")  # into newton_prox (module docstring)
def _cholesky(A, C, pd_min, stop):
    """Lower Cholesky factor C of the symmetric A (its lower triangle written); returns True when every pivot is
    > pd_min.  At a pivot <= pd_min: ``stop``, return False at once; else the pivot is replaced by 1 and the
    factorisation goes on (False is returned at the end)."""
    k = A.shape[0]
    ok = True
    for j in range(k):
        d = A[j, j]
        for m in range(j):
            d -= C[j, m] * C[j, m]
        if d > pd_min:
            cjj = math.sqrt(d)
        else:
            ok = False
            if stop:
                return False
            cjj = 1.0
        C[j, j] = cjj
        for i in range(j + 1, k):
            acc = A[i, j]
            for m in range(j):
                acc -= C[i, m] * C[j, m]
            C[i, j] = acc / cjj
    return ok


@njit(cache=True, error_model="numpy", inline="always")  # into newton_prox (module docstring)
def _direction(Hf, gf, pd_min, floor_rel, floor_abs, C, step, tmp, lam, U, B):
    """step = -Hf^-1 gf by Cholesky when Hf is positive definite (pivots > pd_min), else the
    saddle-free direction -U |Lambda|^-1 U^T gf with |lambda| floored at floor_rel max|lambda| + floor_abs.
    Returns True when Hf is positive definite."""
    k = gf.shape[0]
    ok = _cholesky(Hf, C, pd_min, True)
    if ok:
        for j in range(k):
            acc = gf[j]
            for m in range(j):
                acc -= C[j, m] * tmp[m]
            tmp[j] = acc / C[j, j]
        for j in range(k - 1, -1, -1):
            acc = tmp[j]
            for m in range(j + 1, k):
                acc -= C[m, j] * step[m]
            step[j] = acc / C[j, j]
        for j in range(k):
            step[j] = -step[j]
        return True
    jacobi_eigh(Hf, lam, U, B)
    amax = 0.0
    for j in range(k):
        if abs(lam[j]) > amax:
            amax = abs(lam[j])
    floor = floor_rel * amax + floor_abs
    for j in range(k):
        acc = 0.0
        for m in range(k):
            acc += U[m, j] * gf[m]
        tmp[j] = acc / max(abs(lam[j]), floor)
    for m in range(k):
        acc = 0.0
        for j in range(k):
            acc += U[m, j] * tmp[j]
        step[m] = -acc
    return False


@njit(cache=True, error_model="numpy", inline="always")  # into newton_prox (module docstring)
def _norm(v, kind):
    s = 0.0
    if kind == 0:
        for j in range(v.shape[0]):
            if abs(v[j]) > s:
                s = abs(v[j])
        return s
    for j in range(v.shape[0]):
        s += v[j] * v[j]
    return math.sqrt(s)


@njit(cache=True, error_model="numpy", inline="always")  # into newton_prox (module docstring)
def _prox_objective(loss, x, a, w):
    """f(x) = loss + sum_i (x_i - a_i)^2 / (2 w_i), summed in index order."""
    f = loss
    for j in range(x.shape[0]):
        dx = x[j] - a[j]
        f += dx * dx / (2.0 * w[j])
    return f


@njit(**_LEAF)
def _to_hyperplane(x, a, w, csum):
    """x -= t 1 with t = sum_i (x_i - a_i) / w_i / sum_i 1/w_i: the minimiser of the quadratic term along 1."""
    t = 0.0
    for j in range(x.shape[0]):
        t += (x[j] - a[j]) / w[j]
    t /= csum
    for j in range(x.shape[0]):
        x[j] -= t


#: the k of the softmax channels at T = 2, 3 (the paper's figures): fine-tuning k = T, pre-training k = T (T + 1) / 2.
#: For these k :func:`newton_prox` runs the Newton loop on work arrays in the stack frame (:func:`_newton_on_stack`).
STACK_K = (2, 3, 6)


@njit(**_LEAF)
def _newton_loop(problem, outs, vecs, mats, scratch):
    """The per-sample Newton loop (:func:`_newton_samples`) on work arrays allocated by :func:`newton_prox` on the heap:
    any k.  They are separate allocations: views of one buffer were measured slower (Fig. 1 fine-tuning calls 404 ->
    579 ms), presumably since the compiler can then no longer tell that they do not overlap."""
    return _newton_samples(problem, outs, vecs, mats, scratch)


@njit(**_LEAF)
def _newton_on_stack(K, problem, outs, scratch):
    """The per-sample Newton loop (:func:`_newton_samples`) with its vectors and matrices in this function's stack
    frame, of the literal size k = K (one compiled specialisation for each K of :data:`STACK_K`).

    The same operations in the same order as on the heap (:func:`_newton_loop`), so the same numbers bit for bit
    (tests/theory/test_newton.py).  With k a constant, LLVM unrolls the loops over the unknowns (direction, Cholesky,
    line search, merging) and knows that the work arrays overlap nothing.  Measured (the 54 Newton calls of the Fig. 1
    point replayed, benchmarks/bench_newton.py): 567 -> 445 ms, docs/VALIDATION.md section 8."""
    literally(K)
    vecs = (
        _stack_array(K, 0), _stack_array(K, 0), _stack_array(K, 0), _stack_array(K, 0), _stack_array(K, 0),
        _stack_array(K, 0), _stack_array(K, 0), _stack_array(K, 0),
    )  # fmt: skip
    mats = (
        _stack_array(K, K), _stack_array(K, K), _stack_array(K, K), _stack_array(K, K), _stack_array(K, K),
        _stack_array(K, K),
    )  # fmt: skip
    return _newton_samples(problem, outs, vecs, mats, scratch)


@njit(cache=True, error_model="numpy", inline="always")  # into _newton_loop, _newton_on_stack
def _newton_samples(problem, outs, vecs, mats, scratch):
    """The per-sample loop of :func:`newton_prox`: ``problem`` its arguments (kind, x0, anchor, w, data, consts, opts,
    n_aux, ref), ``outs`` its outputs, then the work arrays: ``vecs`` eight vectors (k,), ``mats`` six matrices (k, k),
    ``scratch`` aux, auxd (n_aux,) and the token scratch X, P, R, G (T, T).  k is read from the work arrays (a constant
    when they are on the stack)."""
    kind, x0, anchor, w, data, consts, opts, n_aux, ref = problem
    out_x, out_f, out_loss, out_g, out_H, out_aux, out_res, out_conv, out_it, out_merged = outs
    x, xt, gl, gf, step, tmp, lam, gdum = vecs
    Hl, Hf, C, U, B, Hdum = mats
    aux, auxd, X, P, R, G = scratch
    n = x0.shape[0]
    k = x.shape[0]
    stop = int(opts[0])
    tol = opts[1]
    max_iter = int(opts[2])
    pd_min = opts[3]
    floor_rel = opts[4]
    floor_abs = opts[5]
    trust = opts[6]
    scale0 = opts[7]
    norm_kind = int(opts[8])
    armijo_rel = opts[9]
    n_try = int(opts[10])
    take_last = opts[11] != 0.0
    merge = opts[12] if opts.shape[0] > 12 else 0.0
    shift = opts.shape[0] > 13 and opts[13] != 0.0
    csum = 0.0
    for j in range(k):
        csum += 1.0 / w[j]
    it_max = 0
    for s in range(n):
        row = data[s]
        a = anchor[s]
        for j in range(k):
            x[j] = x0[s, j]
        if shift:
            _to_hyperplane(x, a, w, csum)
        loss = loss_derivatives(kind, x, row, consts, 2, gl, Hl, aux, X, P, R, G)
        f = _prox_objective(loss, x, a, w)
        conv = False
        merged = False
        res = np.inf
        it = 0
        rad = 0.0
        if merge > 0.0:
            rn = 0.0
            for j in range(k):
                rn += ref[s, j] * ref[s, j]
            rad = merge * (1.0 + math.sqrt(rn))
        while True:
            if stop == 0:
                res = 0.0
                for j in range(k):
                    r = abs(w[j] * gl[j] + (x[j] - a[j]))
                    if r > res:
                        res = r
                if res <= tol * scale0:
                    conv = True
                    break
            if it >= max_iter:
                break
            it += 1
            for j in range(k):
                gf[j] = gl[j] + (x[j] - a[j]) / w[j]
                for m in range(k):
                    Hf[j, m] = Hl[j, m]
                Hf[j, j] += 1.0 / w[j]
            if shift:
                tau = 0.0
                for j in range(k):
                    tau += abs(Hl[j, j])
                tau /= csum * csum
                for j in range(k):
                    for m in range(k):
                        Hf[j, m] += tau / (w[j] * w[m])
            pd = _direction(Hf, gf, pd_min, floor_rel, floor_abs, C, step, tmp, lam, U, B)
            snorm = _norm(step, norm_kind)
            xnorm = _norm(x, norm_kind)
            if shift and pd and _norm(step, 0) <= tol * scale0:
                # converged on the Newton step (the distance to the minimiser): take it and stop
                for j in range(k):
                    x[j] += step[j]
                _to_hyperplane(x, a, w, csum)
                res = _norm(step, 0)
                loss = loss_derivatives(kind, x, row, consts, 2, gl, Hl, aux, X, P, R, G)
                f = _prox_objective(loss, x, a, w)
                conv = True
                break
            if stop == 1:
                res = snorm
                if pd and snorm < tol * (1.0 + xnorm):
                    for j in range(k):
                        x[j] += step[j]
                    conv = True
                    break
            if merge > 0.0 and pd:
                d0 = 0.0
                d1 = 0.0
                for j in range(k):
                    e0 = x[j] - ref[s, j]
                    e1 = e0 + step[j]
                    d0 += e0 * e0
                    d1 += e1 * e1
                if math.sqrt(d0) <= rad and math.sqrt(d1) <= rad:
                    merged = True
                    break
            if norm_kind == 0:
                trusted = pd and snorm <= trust * (scale0 + xnorm)
            else:
                trusted = pd and snorm < trust * (scale0 + xnorm)
            slope = 0.0
            for j in range(k):
                slope += gf[j] * step[j]
            # the full step is evaluated with its derivatives (kept when it is accepted, the usual
            # case); shorter ones with the value only
            t = 1.0
            accepted = False
            have_derivs = False
            for tr in range(n_try):
                for j in range(k):
                    xt[j] = x[j] + t * step[j]
                if tr == 0:
                    lt = _loss_inlined(kind, xt, row, consts, 2, gdum, Hdum, auxd, X, P, R, G)
                    have_derivs = True
                else:
                    lt = loss_derivatives(kind, xt, row, consts, 0, gdum, Hdum, auxd, X, P, R, G)
                    have_derivs = False
                ft = _prox_objective(lt, xt, a, w)
                if (trusted and tr == 0) or ft <= f + 1e-4 * t * slope + armijo_rel * abs(f):
                    accepted = True
                    break
                if tr == n_try - 1:
                    break
                t *= 0.5
            if not accepted and not take_last:
                break  # no ascent found: stay (every further iteration would repeat this one)
            for j in range(k):
                x[j] = xt[j]
            if shift:
                _to_hyperplane(x, a, w, csum)  # the loss is unchanged: gl, Hl stay valid
            if have_derivs:
                loss = lt
                f = ft
                for j in range(k):
                    gl[j] = gdum[j]
                    for m in range(k):
                        Hl[j, m] = Hdum[j, m]
                for j in range(n_aux):
                    aux[j] = auxd[j]
                if shift:
                    f = _prox_objective(loss, x, a, w)
            else:
                loss = loss_derivatives(kind, x, row, consts, 2, gl, Hl, aux, X, P, R, G)
                f = _prox_objective(loss, x, a, w)
        if it > it_max:
            it_max = it
        for j in range(k):
            out_x[s, j] = x[j]
            out_g[s, j] = gl[j]
            for m in range(k):
                out_H[s, j, m] = Hl[j, m]
        for j in range(n_aux):
            out_aux[s, j] = aux[j]
        out_f[s] = f
        out_loss[s] = loss
        out_res[s] = res
        out_conv[s] = conv
        out_merged[s] = merged
        out_it[s] = it
    return it_max


@njit(cache=True, error_model="numpy")
def newton_prox(
    kind,
    x0,
    anchor,
    w,
    data,
    consts,
    opts,
    n_aux,
    ref,
    out_x,
    out_f,
    out_loss,
    out_g,
    out_H,
    out_aux,
    out_res,
    out_conv,
    out_it,
    out_merged,
):
    """Minimise f(x) = loss(x) + sum_i (x_i - a_i)^2 / (2 w_i) from x0, for every sample (rows).

    opts = [stop, tol, max_iter, pd_min, floor_rel, floor_abs, trust, scale0, norm_kind,
            armijo_rel, n_try, take_last]:
      stop 0 ('residual'): converged when max_i |w_i dloss/dx_i + x_i - a_i| <= tol * scale0,
          checked at every iterate before the step (out_res: that residual);
      stop 1 ('step'): converged when the Newton step at a positive-definite Hessian is below
          tol * (1 + |x|_2); that step is taken and the derivatives of the point before it are
          returned (out_res: the last step norm, inf if none);
      full step without test when the Hessian is positive definite and |step| <= trust (scale0 + |x|)
          (norm_kind 0: max-norm and '<=', 1: 2-norm and '<');
      else Armijo f(x + t s) <= f(x) + 1e-4 t g.s + armijo_rel |f(x)| for t = 1, 1/2, ... (n_try
          values); if none passes, the last is taken (take_last) or the sample stays and stops;
      merge radius opts[12] = rho > 0 (a global search start): a sample stops as *merged* (out_merged,
          not converged) when, at a positive-definite Hessian of f, both x and its Newton step x + s lie
          within rho (1 + |ref|_2) of ``ref`` (rows: a local minimiser already found): it is on its way
          to that minimiser, and solving it again would only repeat it.  rho = 0: no merging (ref unused).
      shift-invariant loss, opts[13] != 0 (the softmax pre-training channel: loss(x + c 1) = loss(x)):
          the minimiser has sum_i (x_i - a_i) / w_i = 0 exactly (the quadratic term alone fixes the
          component along 1), so x is put on that hyperplane at the start and after every step, the
          Newton matrix gets + tau c c^T (c = 1/w, tau = sum_i |d2loss_ii| / (sum_i c_i)^2), which
          lifts its eigenvalue along 1 from ~1/w (ill-conditioned when w is large) to the scale of
          the loss Hessian without changing the step on the hyperplane, and a sample also stops as
          converged when that Newton step is below tol * scale0 in max-norm (taken first): its
          distance to the minimiser, whereas the residual of stop 0 carries w x the rounding of
          dloss and cannot reach tol when w ~ 1/lam is large.
    Outputs at the point of the returned derivatives: f, loss, dloss/dx, d2loss/dx2 and aux.
    """
    k = x0.shape[1]
    X, P, R, G = _token_scratch(consts)
    na = max(n_aux, 1)
    problem = (kind, x0, anchor, w, data, consts, opts, n_aux, ref)
    outs = (out_x, out_f, out_loss, out_g, out_H, out_aux, out_res, out_conv, out_it, out_merged)
    scratch = (np.zeros(na), np.zeros(na), X, P, R, G)
    if k == 2:
        return _newton_on_stack(2, problem, outs, scratch)
    if k == 3:
        return _newton_on_stack(3, problem, outs, scratch)
    if k == 6:
        return _newton_on_stack(6, problem, outs, scratch)
    vecs = (np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k), np.empty(k))
    mats = (np.empty((k, k)), np.empty((k, k)), np.empty((k, k)), np.empty((k, k)), np.empty((k, k)), np.empty((k, k)))
    return _newton_loop(problem, outs, vecs, mats, scratch)


@njit(cache=True, error_model="numpy")
def evaluate_batch(kind, x, data, consts, order, out_g, out_H, out_aux):
    """loss_derivatives for every row of x (n, k); returns the losses (n,) (tests, benchmarks)."""
    n, k = x.shape
    X, P, R, G = _token_scratch(consts)
    out = np.empty(n)
    g, H, aux = np.empty(k), np.empty((k, k)), np.zeros(max(out_aux.shape[1], 1))
    _evaluate_loop(kind, x, data, consts, order, out_g, out_H, out_aux, g, H, aux, X, P, R, G, out)
    return out


@njit(**_LEAF)
def _evaluate_loop(kind, x, data, consts, order, out_g, out_H, out_aux, g, H, aux, X, P, R, G, out):
    """The per-sample loop of :func:`evaluate_batch`."""
    n, k = x.shape
    for s in range(n):
        out[s] = loss_derivatives(kind, x[s], data[s], consts, order, g, H, aux, X, P, R, G)
        for j in range(k):
            out_g[s, j] = g[j]
            for m in range(k):
                out_H[s, j, m] = H[j, m]
        for j in range(out_aux.shape[1]):
            out_aux[s, j] = aux[j]


@njit(cache=True, error_model="numpy")
def pretrain_post(d, g, Hl, loss, V, s, full, shift, out_psi, out_stat, out_jac, out_pd, out_rep, out_hess):
    """What the pre-training prox (eq. 42) reports at h = z~ + d, per sample (rows), fused.

    d (n, L) = h - z~; the gradient g (n, L), Hessian Hl (n, L, L) and value (n,) of the loss
    l(h) = ||sigma(h) - sigma(z*)||^2 in the free entries.
    In the normalised entries u = h / sqrt(s): A = V (-Hess_u Psi) = I + V S^1/2 Hl S^1/2, with
    Cholesky factor C (a non-positive pivot is replaced by 1 and marks the sample not positive
    definite):
        psi = -loss - sum d^2 / (2 V s)      (Psi of eq. 42 at the prox),
        jac = diag(A^-1) = sum_k (C^-1)_ki^2  (d Prox_ab / d z~_ab, for V_hat of eq. 51),
        rep = ||I - A^-1||_F^2               (the sample term of eq. 75, when ``full``),
        hess = -Hl - diag(1 / (V s))          (Hessian of Psi in h, when ``full``),
        stat = max_ab |V s_ab g_ab + d_ab| / min(1, V)  (the stationarity residual of h = z~ - V s grad l).
    ``shift`` (softmax, whose loss is invariant along 11^T, i.e. along the unit vector n = s^-1/2 / |s^-1/2|
    in u): A n = n exactly, while A ~ V on the complement, so A is ill-conditioned when V ~ 1/lam is large.
    Then V S^1/2 Hl S^1/2 is projected on the complement of n (removing its rounding along n), the
    Cholesky factor is that of A' = A + beta n n^T, beta = tr(V S^1/2 Hl S^1/2) / L (well conditioned),
    and A^-1 = A'^-1 + beta / (1 + beta) n n^T exactly; stat is also measured as the Newton step
    A^-1 r_u (r_u the residual in u, whose component along n is d.n exactly: the loss gradient has none)
    and the smaller of the two is reported: the step is the distance to the maximiser, while the
    residual carries V x the rounding of grad l.
    """
    n, L = d.shape
    r = np.sqrt(s)
    A = np.empty((L, L))
    C = np.zeros((L, L))
    Ci = np.zeros((L, L))
    nv = np.empty(L)
    Kn = np.empty(L)
    ru = np.empty(L)
    tmp = np.empty(L)
    ssum = 0.0
    for a in range(L):
        ssum += 1.0 / s[a]
    for a in range(L):
        nv[a] = 1.0 / (r[a] * math.sqrt(ssum))
    vmin = min(1.0, V)
    for j in range(n):
        acc = 0.0
        st = 0.0
        for a in range(L):
            acc += d[j, a] * d[j, a] / (2.0 * V * s[a])
            e = abs(V * s[a] * g[j, a] + d[j, a])
            if e > st:
                st = e
        out_psi[j] = -loss[j] - acc
        for a in range(L):
            for b in range(L):
                A[a, b] = V * Hl[j, a, b] * r[a] * r[b]
        beta = 0.0
        if shift:
            nKn = 0.0
            for a in range(L):
                acc = 0.0
                for b in range(L):
                    acc += A[a, b] * nv[b]
                Kn[a] = acc
                nKn += nv[a] * acc
            for a in range(L):
                beta += abs(A[a, a])
            beta /= L
            for a in range(L):
                for b in range(L):
                    A[a, b] += (nKn + beta) * nv[a] * nv[b] - Kn[a] * nv[b] - nv[a] * Kn[b]
        for a in range(L):
            A[a, a] += 1.0
        for c in range(L):
            for a in range(L):
                C[a, c] = 0.0
        out_pd[j] = _cholesky(A, C, 0.0, False)
        # lower-triangular inverse, column by column
        for c in range(L):
            for a in range(L):
                Ci[a, c] = 0.0
        for c in range(L):
            Ci[c, c] = 1.0 / C[c, c]
            for i in range(c + 1, L):
                acc = C[i, c] * Ci[c, c]
                for k in range(c + 1, i):
                    acc = acc + C[i, k] * Ci[k, c]
                Ci[i, c] = -acc / C[i, i]
        bn = beta / (1.0 + beta)
        for a in range(L):
            acc = 0.0
            for k in range(L):
                acc += Ci[k, a] * Ci[k, a]
            out_jac[j, a] = acc + bn * nv[a] * nv[a]
        if shift:
            # the Newton step A^-1 r_u, with r_u . n replaced by its exact value d/sqrt(s) . n
            rn = 0.0
            dn = 0.0
            for a in range(L):
                ru[a] = (V * s[a] * g[j, a] + d[j, a]) / r[a]
                rn += ru[a] * nv[a]
                dn += d[j, a] / r[a] * nv[a]
            for a in range(L):
                ru[a] += (dn - rn) * nv[a]
            for k in range(L):
                acc = 0.0
                for a in range(L):
                    acc += Ci[k, a] * ru[a]
                tmp[k] = acc
            sn = 0.0
            for a in range(L):
                acc = bn * nv[a] * dn
                for k in range(L):
                    acc += Ci[k, a] * tmp[k]
                e = abs(acc * r[a])
                if e > sn:
                    sn = e
            if sn < st:
                st = sn
        out_stat[j] = st / vmin
        if full:
            rep = 0.0
            for a in range(L):
                for b in range(L):
                    inv = bn * nv[a] * nv[b]  # (A^-1)_ab = sum_k Ci_ka Ci_kb + beta/(1+beta) n_a n_b
                    for k in range(L):
                        inv += Ci[k, a] * Ci[k, b]
                    e = (1.0 if a == b else 0.0) - inv
                    rep += e * e
                    out_hess[j, a, b] = -Hl[j, a, b]
                out_hess[j, a, a] -= 1.0 / (V * s[a])
            out_rep[j] = rep
