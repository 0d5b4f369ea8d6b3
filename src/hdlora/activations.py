"""The activation sigma: R^{T x T} -> R^{T x T}, in one registry (eq. 1).

``softmax`` is the row-wise softmax; ``linear`` is the rescaled identity
sigma(x) = x / T.  Each is given for torch tensors and numpy arrays of shape
(..., T, T); T is read from the last axis.
"""
from __future__ import annotations

import numpy as np
import torch

from .params import ACTIVATIONS, ParamError


def softmax_torch(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def linear_torch(x: torch.Tensor) -> torch.Tensor:
    return x / x.shape[-1]


def softmax_np(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def linear_np(x: np.ndarray) -> np.ndarray:
    return x / x.shape[-1]


_TORCH = {"softmax": softmax_torch, "linear": linear_torch}
_NUMPY = {"softmax": softmax_np, "linear": linear_np}


def get(name: str, backend: str = "torch"):
    """The activation ``name`` ('softmax' or 'linear') for 'torch' or 'numpy'."""
    if name not in ACTIVATIONS:
        raise ParamError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    if backend == "torch":
        return _TORCH[name]
    if backend == "numpy":
        return _NUMPY[name]
    raise ParamError(f"backend must be 'torch' or 'numpy', got {backend!r}")
