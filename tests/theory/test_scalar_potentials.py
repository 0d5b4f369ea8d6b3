"""The generated scalar softmax potentials of the prox kernel (hdlora.theory._newton_numba, T = 2, 3) against its loops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hdlora.theory import newton

ROOT = Path(__file__).resolve().parents[2]


def test_the_generated_region_is_what_the_generator_writes():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_scalar_potentials.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


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
def test_scalar_potentials_equal_the_loop_potentials_bit_for_bit(kind, T):
    """Same loss, gradient, Hessian and Tr dl/dX bits as the loops (the kernel's reference and the T != 2, 3 path),
    at orders 0, 1, 2; the untouched outputs of lower orders are left alone as by the loops."""
    from hdlora.theory import _newton_numba as K

    rng = np.random.default_rng(100 * kind + T)
    xs, rows = _rows(kind, T, 150, rng)
    k = xs.shape[1]
    X, P, R, G = (np.empty((T, T)) for _ in range(4))
    scalar = getattr(K, f"_{'pretrain' if kind == newton.PRETRAIN else 'finetune'}_loss_t{T}")
    for x, row in zip(xs, rows):
        for order in (0, 1, 2):
            g1, H1, a1 = np.full(k, 7.0), np.full((k, k), 7.0), np.full(1, 7.0)
            g2, H2, a2 = g1.copy(), H1.copy(), a1.copy()
            if kind == newton.PRETRAIN:
                l1 = K._pretrain_loss(x, row, T, True, order, g1, H1, X, P, R, G)
                l2 = scalar(x, row, order, g2, H2)
            else:
                l1 = K._finetune_loss(x, row, T, True, order, g1, H1, a1, X, P, R, G)
                l2 = scalar(x, row, order, g2, H2, a2)
            assert np.float64(l1).tobytes() == np.float64(l2).tobytes()
            for u, v in ((g1, g2), (H1, H2), (a1, a2)):
                assert u.tobytes() == v.tobytes()


def test_the_kernel_dispatches_softmax_T2_T3_to_the_scalar_potentials_and_keeps_the_loops_elsewhere():
    """evaluate_batch (the kernel's dispatch) gives the scalar potentials' numbers at T = 2, 3 and the loops' at T = 4."""
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
