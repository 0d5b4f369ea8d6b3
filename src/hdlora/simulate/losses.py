"""Per-sample losses of the simulator (eqs. 2-3, 29-30).

With ``B = sigma(z) - sigma(z*)`` the sequence-to-sequence loss of one sample is
``D^-1 ||B X||_F^2 = Tr(B G B^T)`` with ``G = X X^T / D`` (eq. 29), so the outputs
``y`` are never formed.  The attention-matrix loss (eq. 30) is ``||B||_F^2``; the
two agree up to O(1/D) since ``G -> I_T``.
"""

from __future__ import annotations

import torch

from ..params import ParamError

LOSSES = ("sequence", "attention")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ParamError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def per_sample(B: torch.Tensor, G: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Loss of each sample, shape (n,): ``Tr(B G B^T)`` (eq. 2, 29) or ``||B||_F^2`` (eq. 30)."""
    if loss == "sequence":
        if G is None:
            raise ValueError("the sequence loss needs the Gram matrices G")
        return ((B @ G) * B).sum(dim=(-1, -2))
    return (B * B).sum(dim=(-1, -2))
