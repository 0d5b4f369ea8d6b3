"""Fixed Gaussian samples (hdlora.theory.sampling): shapes, determinism, moments of the law Q (eq. 13, 47)."""

from __future__ import annotations

import numpy as np
import pytest

from hdlora.theory.sampling import from_sym, frozen_fields, s_ab, standard_normals, to_sym, upper_indices


@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_symmetric_storage_round_trip(T):
    L = T * (T + 1) // 2
    a, b = upper_indices(T)
    assert len(a) == L and np.all(a <= b)
    v = np.random.default_rng(1).standard_normal((4, L))
    m = to_sym(v, T)
    assert m.shape == (4, T, T) and np.array_equal(m, np.swapaxes(m, -1, -2))
    assert np.array_equal(from_sym(m), v)
    assert np.array_equal(s_ab(T), 1.0 + (a == b))


@pytest.mark.parametrize("method", ["mc", "qmc"])
def test_standard_normals_fixed_by_seed_and_standard(method):
    x = standard_normals(4096, 3, seed=5, method=method)
    assert np.array_equal(x, standard_normals(4096, 3, seed=5, method=method))
    assert not np.array_equal(x, standard_normals(4096, 3, seed=6, method=method))
    tol = 4 / np.sqrt(4096) if method == "mc" else 0.01  # QMC is far more accurate
    assert np.all(np.abs(x.mean(0)) < tol)
    assert np.all(np.abs(x.var(0) - 1) < 3 * tol)


def test_standard_normals_bad_input():
    with pytest.raises(ValueError, match="n >= 1"):
        standard_normals(0, 2)
    with pytest.raises(ValueError, match="method"):
        standard_normals(10, 2, method="sobol")


def test_frozen_fields_have_the_covariance_of_eq_13():
    T, A0, Q, M = 3, 1.3, 0.9, 0.7
    f = frozen_fields(200_000, T, A0, Q, M, seed=3)
    s = s_ab(T)
    zs, z = f["z_star"], f["z"]
    # E z*^2 = s A0, E z^2 = s Q, E z* z = s M, entry by entry (variance (1 + delta_ab) x)
    for got, want in ((zs * zs, A0), (z * z, Q), (zs * z, M)):
        mean = got.mean(0)
        se = got.std(0) / np.sqrt(len(got))
        assert np.all(np.abs(mean - s * want) < 5 * se)
    # distinct entries are independent
    c = np.corrcoef(zs.T)
    assert np.max(np.abs(c - np.eye(len(s)))) < 0.02


def test_frozen_fields_degenerate_and_invalid_laws():
    f = frozen_fields(100, 2, 2.0, 0.5, 1.0, seed=0)  # B = Q - M^2/A0 = 0: z proportional to z*
    assert np.allclose(f["z"], 0.5 * f["z_star"])
    with pytest.raises(ValueError, match="not positive"):
        frozen_fields(100, 2, 1.0, 0.5, 1.0)  # Q < M^2/A0
    with pytest.raises(ValueError, match="A0"):
        frozen_fields(100, 2, 0.0, 0.5, 0.0)
