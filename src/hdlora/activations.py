"""The activation sigma: R^{T x T} -> R^{T x T}, in one registry (eq. 1).

``softmax`` is the row-wise softmax; ``linear`` is the rescaled identity sigma(x) = x / T.
Each is defined once below, on an array namespace (:class:`_Ops`: exp, row maximum, row
sum), and given for numpy arrays and torch tensors of shape (..., T, T); T is read from
the last axis.

torch is imported on the first request of a torch flavour (the simulator's), never at
import of this module: the NumPy theory does not load torch.  The torch softmax is the
fused kernel ``torch.softmax`` of the same formula (max-shifted exponentials over the row,
normalised): building it from the generic definition agrees to a few ulps but not bit for
bit (measured: max difference 4.4e-16 on 2e5 random 3 x 3 inputs), which would move every
stored simulation; the test suite checks the two against each other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .params import ACTIVATIONS, ParamError

__all__ = ["get", "softmax_np", "linear_np", "BACKENDS"]

BACKENDS = ("torch", "numpy")


@dataclass(frozen=True)
class _Ops:
    """The array operations an activation is written in."""

    exp: Callable[[Any], Any]
    row_max: Callable[[Any], Any]  # max over the last axis, kept as an axis of length 1
    row_sum: Callable[[Any], Any]  # sum over the last axis, kept as an axis of length 1


def _softmax(ops: _Ops) -> Callable[[Any], Any]:
    """Row-wise softmax, sigma(x)_ab = exp(x_ab) / sum_c exp(x_ac), computed with the row maximum shifted out."""

    def softmax(x):
        e = ops.exp(x - ops.row_max(x))
        return e / ops.row_sum(e)

    return softmax


def _linear(ops: _Ops) -> Callable[[Any], Any]:
    """sigma(x) = x / T."""

    def linear(x):
        return x / x.shape[-1]

    return linear


#: name -> the one definition, a function of the array namespace
_DEFINITIONS: dict[str, Callable[[_Ops], Callable[[Any], Any]]] = {"softmax": _softmax, "linear": _linear}


def _np_row_reduce(ufunc: np.ufunc) -> Callable[[np.ndarray], np.ndarray]:
    """``ufunc`` reduced over the last axis, kept as an axis of length 1, as a left-to-right loop over the (few) columns:
    the same values as ``ufunc.reduce(x, axis=-1, keepdims=True)`` (NumPy also adds fewer than 8 terms left to right;
    tests/test_activations.py checks the bits), ~10x faster for the T = 2, 3 token rows (a NumPy reduction over a short
    inner axis pays a loop set-up per row)."""

    def reduce(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[-1] >= 8 or x.ndim < 2:  # pairwise summation from 8 terms on: NumPy's own
            return ufunc.reduce(x, axis=-1, keepdims=True)
        out = x[..., :1].copy()
        for k in range(1, x.shape[-1]):
            ufunc(out, x[..., k : k + 1], out=out)
        return out

    return reduce


_NUMPY_OPS = _Ops(exp=np.exp, row_max=_np_row_reduce(np.maximum), row_sum=_np_row_reduce(np.add))
_NUMPY = {name: make(_NUMPY_OPS) for name, make in _DEFINITIONS.items()}
softmax_np = _NUMPY["softmax"]
linear_np = _NUMPY["linear"]


def _torch_ops() -> _Ops:
    import torch

    return _Ops(
        exp=torch.exp,
        row_max=lambda x: torch.amax(x, dim=-1, keepdim=True),
        row_sum=lambda x: torch.sum(x, dim=-1, keepdim=True),
    )


def generic_torch(name: str) -> Callable[[Any], Any]:
    """The torch flavour built from the generic definition (the test compares the fused kernel with it)."""
    return _DEFINITIONS[name](_torch_ops())


@functools.lru_cache(maxsize=1)
def _torch_registry() -> dict[str, Callable[[Any], Any]]:
    import torch

    out = {name: make(_torch_ops()) for name, make in _DEFINITIONS.items()}
    out["softmax"] = functools.partial(torch.softmax, dim=-1)  # the fused kernel of the same formula
    return out


def get(name: str, backend: str = "torch") -> Callable[[Any], Any]:
    """The activation ``name`` ('softmax' or 'linear') for 'torch' or 'numpy'."""
    if name not in ACTIVATIONS:
        raise ParamError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    if backend == "numpy":
        return _NUMPY[name]
    if backend == "torch":
        return _torch_registry()[name]
    raise ParamError(f"backend must be one of {BACKENDS}, got {backend!r}")
