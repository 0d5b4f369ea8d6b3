"""The activation registry (hdlora.activations): one definition per sigma, NumPy and torch flavours."""

import subprocess
import sys

import numpy as np
import pytest

from hdlora import ParamError, activations


def _x(seed=0, n=500, T=3):
    return np.random.default_rng(seed).normal(scale=3.0, size=(n, T, T))


def test_numpy_softmax_rows_are_probabilities_and_shift_invariant():
    x = _x()
    p = activations.get("softmax", "numpy")(x)
    assert np.all(p > 0)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(activations.get("softmax", "numpy")(x + 7.0 * np.ones((1, 3, 1))), p, atol=1e-15)
    big = activations.get("softmax", "numpy")(x + 800.0)  # no overflow: the row maximum is shifted out
    assert np.all(np.isfinite(big))


def test_linear_is_x_over_T():
    x = _x(T=4)
    assert np.array_equal(activations.get("linear", "numpy")(x), x / 4)


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_torch_flavour_agrees_with_the_numpy_one_and_the_generic_definition(name):
    torch = pytest.importorskip("torch")
    x = _x(1)
    t = torch.from_numpy(x)
    fused = activations.get(name, "torch")(t).numpy()
    generic = activations.generic_torch(name)(t).numpy()
    ref = activations.get(name, "numpy")(x)
    np.testing.assert_allclose(fused, generic, rtol=0, atol=4 * np.finfo(float).eps)
    np.testing.assert_allclose(fused, ref, rtol=0, atol=4 * np.finfo(float).eps)
    if name == "linear":
        assert np.array_equal(generic, ref)


def test_bad_name_or_backend():
    with pytest.raises(ParamError, match="activation"):
        activations.get("relu", "numpy")
    with pytest.raises(ParamError, match="backend"):
        activations.get("softmax", "jax")


def test_theory_does_not_import_torch():
    code = (
        "import sys, hdlora.activations, hdlora.theory, hdlora.theory.bayes, hdlora.theory.applications, "
        "hdlora.theory.errors; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 8, 11])
def test_numpy_row_reductions_are_bit_identical_to_numpy_reduce(T):
    """The column-loop row max/sum of the NumPy softmax give the same bits as NumPy's own reductions (fewer than 8
    terms are added left to right by NumPy too; from 8 on NumPy's pairwise sum is used), hence the same softmax."""
    from hdlora.activations import _NUMPY_OPS

    rng = np.random.default_rng(T)
    x = rng.standard_normal((257, T, T)) * 10.0 ** rng.uniform(-3, 3, (257, 1, 1))
    x[0, 0, -1] = np.nan
    got_max, got_sum = _NUMPY_OPS.row_max(x), _NUMPY_OPS.row_sum(x)
    assert got_max.shape == got_sum.shape == (257, T, 1)
    np.testing.assert_array_equal(got_max, np.max(x, axis=-1, keepdims=True))
    np.testing.assert_array_equal(got_sum, np.sum(x, axis=-1, keepdims=True))
    ok = np.isfinite(x).all(axis=(1, 2))
    ref = np.exp(x - np.max(x, axis=-1, keepdims=True))
    ref = ref / np.sum(ref, axis=-1, keepdims=True)
    np.testing.assert_array_equal(activations.get("softmax", "numpy")(x)[ok], ref[ok])
