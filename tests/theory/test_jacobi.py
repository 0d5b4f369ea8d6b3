"""Batched Jacobi eigendecomposition of small symmetric matrices (hdlora.theory.jacobi) against LAPACK."""

import numpy as np
import pytest

from hdlora.theory.jacobi import eigh_token_first


def _stack(n, T, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, T, T))
    A = A + np.swapaxes(A, 1, 2)
    A[:10] = 2.0 * np.eye(T)  # a multiple of the identity (already diagonal: identity rotations)
    A[10:20] = np.eye(T) + 1e-9 * A[10:20]  # nearly degenerate eigenvalues
    A[20:30] = np.diag(np.arange(T, dtype=float))  # diagonal
    A[30:40] *= 1e6  # large entries: the tolerance is relative to each matrix
    A[40:50] *= 1e-8
    A[50] = 0.0
    return A


@pytest.mark.parametrize("T", [2, 3, 4, 5])
def test_jacobi_matches_lapack(T):
    """Eigenvalues equal numpy.linalg.eigh's to 1e-14 ||A||_F (after sorting), V diag(w) V^T reconstructs A and
    V is orthonormal to 1e-14, for random, diagonal, degenerate, nearly degenerate, large, small and zero matrices."""
    A = _stack(2000, T, seed=T)
    r = eigh_token_first(np.ascontiguousarray(np.moveaxis(A, 0, -1)))
    assert r.converged and r.unconverged.size == 0 and r.residual <= 1e-15
    w0 = np.linalg.eigvalsh(A)
    scale = np.sqrt((A * A).sum(axis=(1, 2)))[:, None]
    assert np.all(np.abs(np.sort(r.w, axis=0).T - w0) <= 1e-14 * scale)
    V = np.moveaxis(r.V, -1, 0)
    recon = np.einsum("nij,jn,nkj->nik", V, r.w, V)
    assert np.all(np.abs(recon - A) <= 1e-14 * scale[:, :, None])
    assert np.abs(np.einsum("nij,nik->njk", V, V) - np.eye(T)).max() <= 1e-14
    # already diagonal matrices are returned exactly (every rotation is the identity)
    assert np.array_equal(r.w[:, 20:30], np.broadcast_to(np.arange(T, dtype=float)[:, None], (T, 10)))
    assert np.array_equal(r.V[:, :, 20:30], np.broadcast_to(np.eye(T)[:, :, None], (T, T, 10)))


def test_two_by_two_takes_one_rotation():
    r = eigh_token_first(np.ascontiguousarray(np.moveaxis(_stack(500, 2, seed=9), 0, -1)))
    assert r.sweeps == 1 and r.converged


def test_unconverged_matrices_are_reported():
    """With too few sweeps the matrices still off-diagonal are named (never passed off as converged); diagonal
    ones are not."""
    A = _stack(300, 4, seed=1)
    At = np.ascontiguousarray(np.moveaxis(A, 0, -1))
    r = eigh_token_first(At, max_sweeps=1, lapack_fallback=False)
    assert not r.converged and r.residual > 1e-15
    assert 0 < r.unconverged.size < 300 and not np.isin(np.arange(20, 30), r.unconverged).any()
    r0 = eigh_token_first(np.ascontiguousarray(np.moveaxis(A[20:30], 0, -1)), max_sweeps=0)
    assert r0.converged and r0.sweeps == 0
    # with the fallback (the default) those matrices are LAPACK's decomposition: exact again
    f = eigh_token_first(At, max_sweeps=1)
    assert f.converged and f.n_lapack == r.unconverged.size
    w0, U0 = np.linalg.eigh(A[r.unconverged])
    np.testing.assert_array_equal(f.w[:, r.unconverged], w0.T)
    np.testing.assert_array_equal(f.V[:, :, r.unconverged], np.moveaxis(U0, 0, -1))


def test_bad_shape():
    with pytest.raises(ValueError, match=r"\(T, T, n\)"):
        eigh_token_first(np.zeros((3, 2, 5)))
