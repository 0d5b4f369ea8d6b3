"""The prox kernel's softmax potentials at T = 2, 3 on stack arrays (hdlora.theory._newton_numba) against its loops on
heap arrays."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from hdlora.theory import newton


def _rows(kind, T, n, rng):
    """Rows of the kernel's potentials: a mix of moderate and saturating arguments, and exact ties of a row's entries."""
    Y = rng.dirichlet(np.ones(T), size=(n, T)).reshape(n, T * T)
    if kind == newton.PRETRAIN:
        L = T * (T + 1) // 2
        z = rng.standard_normal((n, L)) * rng.choice([0.3, 3.0, 40.0], size=(n, 1))
        x = rng.standard_normal((n, L)) * rng.choice([0.0, 0.5, 5.0], size=(n, 1))
        z[:5] = 1.0  # all entries equal: ties at every row maximum
        x[:5] = 0.0
        return x, np.concatenate([z, Y], axis=1)
    zq = rng.standard_normal((n, T, T))
    zq = (zq + np.swapaxes(zq, 1, 2)) * rng.choice([0.3, 3.0, 40.0], size=(n, 1, 1))
    x = rng.standard_normal((n, T)) * rng.choice([0.0, 0.7, 6.0], size=(n, 1))
    zq[:5] = 0.5
    x[:5] = 0.0
    return x, np.concatenate([zq.reshape(n, T * T), Y], axis=1)


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("kind", [newton.PRETRAIN, newton.FINETUNE])
def test_stack_potentials_equal_the_heap_loops_bit_for_bit(kind, T):
    """Same loss, gradient, Hessian and Tr dl/dX bits as the loops on heap work arrays (the path of every other T and
    of the linear activation), at orders 0, 1, 2; the outputs a lower order does not write are left alone."""
    from hdlora.theory import _newton_numba as K

    rng = np.random.default_rng(100 * kind + T)
    xs, rows = _rows(kind, T, 150, rng)
    k = xs.shape[1]
    # T and k are compile-time constants of these closures, as in the kernel's dispatch
    if kind == newton.PRETRAIN:
        on_stack = njit(lambda x, row, order, g, H, a: K._on_stack_pretrain(T, k, x, row, order, g, H))
    else:
        on_stack = njit(lambda x, row, order, g, H, a: K._on_stack_finetune(T, x, row, order, g, H, a))
    X, P, R, G = (np.empty((T, T)) for _ in range(4))
    consts = np.array([float(T), 1.0])
    for x, row in zip(xs, rows):
        for order in (0, 1, 2):
            g1, H1, a1 = np.full(k, 7.0), np.full((k, k), 7.0), np.full(1, 7.0)
            g2, H2, a2 = g1.copy(), H1.copy(), a1.copy()
            l1 = K._loop_loss(kind, x, row, consts, order, g1, H1, a1, X, P, R, G)  # the heap loops
            l2 = on_stack(x, row, order, g2, H2, a2)
            assert np.float64(l1).tobytes() == np.float64(l2).tobytes()
            for u, v in ((g1, g2), (H1, H2), (a1, a2)):
                assert u.tobytes() == v.tobytes()
            g3, H3, a3 = np.full(k, 7.0), np.full((k, k), 7.0), np.full(1, 7.0)
            l3 = K.loss_derivatives(kind, x, row, consts, order, g3, H3, a3, X, P, R, G)  # the dispatch
            assert np.float64(l1).tobytes() == np.float64(l3).tobytes()
            for u, v in ((g1, g3), (H1, H3), (a1, a3)):
                assert u.tobytes() == v.tobytes()


def test_the_kernel_dispatch_gives_the_loops_numbers_at_every_T():
    """evaluate_batch (the kernel's dispatch: the stack path at T = 2, 3, the heap loops at T = 4) gives the heap loops'
    numbers."""
    from hdlora.theory import _newton_numba as K

    rng = np.random.default_rng(5)
    for T in (2, 3, 4):
        x, rows = _rows(newton.FINETUNE, T, 40, rng)
        g, H, aux = np.empty((40, T)), np.empty((40, T, T)), np.empty((40, 1))
        loss = K.evaluate_batch(newton.FINETUNE, x, rows, np.array([float(T), 1.0]), 2, g, H, aux)
        X, P, R, G = (np.empty((T, T)) for _ in range(4))
        for s in range(40):
            g1, H1, a1 = np.empty(T), np.empty((T, T)), np.empty(1)
            ref = K._finetune_loss(x[s], rows[s], T, True, 2, g1, H1, a1, X, P, R, G)
            assert loss[s] == ref and np.array_equal(g[s], g1) and np.array_equal(H[s], H1) and aux[s, 0] == a1[0]


def _fresh_llvm_ir(fn, *args):
    """LLVM IR of the kernel function ``fn`` compiled anew (the cached one cannot be inspected) for ``args``: a new
    dispatcher of its Python function, with the kernel's options but without the disk cache."""
    from hdlora.theory import _newton_numba as K

    fresh = njit(**{**K._LEAF, "cache": False})(fn.py_func)
    fresh(*args)
    (ir,) = fresh.inspect_llvm().values()
    return fresh, ir.split("\ndefine ")[1]  # the function itself (then its wrappers)


def test_the_stack_arrays_live_in_registers_and_the_stack_potentials_are_inlined():
    """What the stack path is for, in the compiled code: at T = 3 no stack array is left in memory (the unrolling of
    LLVM_OPTIONS), and loss_derivatives calls neither the stack potentials nor anything else for them (the inlining)."""
    import re

    from hdlora.theory import _newton_numba as K

    x, row = _rows(newton.FINETUNE, 3, 1, np.random.default_rng(0))
    args = (newton.FINETUNE, x[0], row[0], 2, np.empty(3), np.empty((3, 3)), np.empty(1))
    _, body = _fresh_llvm_ir(K._stack_t3, *args)
    assert re.findall(r"= alloca \[\d+ x double\]", body) == []
    assert body.count("fmul") > 300  # the unrolled arithmetic is there
    X = np.empty((3, 3))
    _, body = _fresh_llvm_ir(
        K.loss_derivatives, newton.FINETUNE, x[0], row[0], np.array([3.0, 1.0]), 2, *args[4:], X, X.copy(), X.copy(),
        X.copy(),
    )  # fmt: skip
    called = re.findall(r"call [^@]*@(\S+?)\(", body)
    assert not [c for c in called if "_stack_t" in c or "_on_stack" in c or "_sigma_residual" in c]
    assert re.findall(r"= alloca \[\d+ x double\]", body) == []


def test_the_llvm_options_apply_to_the_kernel_compiles_only(monkeypatch):
    from numba.core import config

    if int(config.OPT) != 3:
        pytest.skip("the defaults set back depend on NUMBA_OPT; checked at Numba's default 3")
    """LLVM_OPTIONS are set for a compile of a kernel function and LLVM's defaults set back after it; a compile of any
    other function sets nothing."""
    from hdlora.theory import _newton_numba as K

    calls = []
    monkeypatch.setattr(K.llvm, "set_option", lambda name, opt: calls.append(opt))
    njit(lambda v: v + 1.0)(1.0)
    assert calls == []
    njit(**{**K._LEAF, "cache": False})(K._free.py_func)(0, 1, 3)
    high = [f"-{k}={v}" for k, v in K.LLVM_OPTIONS.items()]
    assert calls[: len(high)] == high
    assert calls[len(high) :] == ["-unroll-threshold=300", "-inline-threshold=250"]  # LLVM's at Numba's default -O3
    assert K._llvm_defaults(2) == {"unroll-threshold": 150, "inline-threshold": 225}
    assert K._llvm_defaults("max") == K._llvm_defaults(3) == K._llvm_defaults(config.OPT)
