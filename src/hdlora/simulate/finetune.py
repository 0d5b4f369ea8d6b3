"""Rank-one LoRA fine-tuning by ERM (eq. 3): minimise sum_mu loss_mu(w) + lam' ||w||^2, W_hat frozen.

The frozen fields ``z_frozen`` of the N' sequences are computed once, so an
evaluation costs O(N' T D):  ``z(w) = z_frozen + chi chi^T - (||w||^2/D) I``,
``chi = X w / sqrt(D)`` (eqs. 1, 12, 15).

The problem is non-convex (rank one, sign symmetry w -> -w): we run an informed
start at ``w = w*`` (as the paper's App. D) and ``restarts`` random starts
``w_i ~ N(0, init_scale^2)``, and keep the lowest objective.  The objective is
even in w, so the sign of the minimiser is fixed to ``m = w.w*/D >= 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import Dataset, Tokens, _chunks, generator, rank_one_field, token_chunk
from .losses import per_sample
from .optim import OptimResult, ValueAndGrad, chunked_ridge_objective, minimise


def _frozen(data: Dataset) -> torch.Tensor:
    if data.z_frozen is None:
        raise ValueError("fine-tuning data need the frozen fields z_frozen")
    return data.z_frozen


def finetune_loss_sum(
    w: torch.Tensor,
    X: torch.Tensor,
    z_frozen: torch.Tensor,
    sigma_target: torch.Tensor,
    G: torch.Tensor | None,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    loss: str,
) -> torch.Tensor:
    """``sum_mu loss(sigma(z_frozen + chi chi^T - q I) - sigma(z*'))`` for one chunk (eq. 3)."""
    _, field = rank_one_field(X, w)
    return per_sample(sigma(z_frozen + field) - sigma_target, G, loss).sum()


def finetune_value_and_grad(
    data: Dataset, sigma: Callable[[torch.Tensor], torch.Tensor], lam_ft: float, loss: str, chunk: int
) -> ValueAndGrad:
    """``w -> ((sum_mu loss_mu + lam' ||w||^2)/N', gradient)``."""
    n = data.n
    sigma_target = sigma(data.z_star)
    G = data.G if loss == "sequence" else None
    z_frozen = _frozen(data)

    def chunk_loss(w: torch.Tensor, sl: slice) -> torch.Tensor:
        return finetune_loss_sum(
            w, data.X[sl], z_frozen[sl], sigma_target[sl], None if G is None else G[sl], sigma, loss
        )

    return chunked_ridge_objective(chunk_loss, n, lam_ft, _chunks(n, chunk))


@dataclass(frozen=True)
class FineTuned:
    """Result of fine-tuning: w_hat (zeros when lam' = inf), the train loss per sample, the
    winning start and every start's final objective, and the optimiser record of the winner."""

    w: torch.Tensor
    train_error: float
    winner: str
    objectives: dict
    optim: OptimResult | None


def train_error(
    w: torch.Tensor, data: Dataset, sigma: Callable[[torch.Tensor], torch.Tensor], loss: str, chunk: int
) -> float:
    total = 0.0
    z_frozen = _frozen(data)
    sigma_target = sigma(data.z_star)
    with torch.no_grad():
        for sl in _chunks(data.n, chunk):
            G = data.G[sl] if loss == "sequence" else None
            total += float(finetune_loss_sum(w, data.X[sl], z_frozen[sl], sigma_target[sl], G, sigma, loss))
    return total / data.n


def finetune(
    data: Dataset,
    w_star: torch.Tensor,
    *,
    lam_ft: float,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    loss: str,
    seed: int,
    restarts: int = 2,
    init_scale: float = 0.5,
    rtol: float = 1e-6,
    max_iter: int = 1000,
    chunk: int | None = None,
    informed: bool = True,
) -> FineTuned:
    """Minimise eq. 3 + lam' ||w||^2 from several starts; keep the lowest objective.

    ``lam_ft = inf`` gives w_hat = 0 (frozen pre-training, A.7) without optimisation.
    ``chunk``: sequences per pass chunk; default the token chunk of the data
    (:func:`hdlora.data.token_chunk`, aligned with the chunks of regenerated tokens).
    """
    if data.z_frozen is None:
        raise ValueError("fine-tuning data need the frozen fields z_frozen")
    D = data.X.shape[-1]
    if chunk is None:
        chunk = data.X.chunk if isinstance(data.X, Tokens) else token_chunk(data.X.shape[1], D)
    zero = torch.zeros(D, dtype=data.X.dtype, device=data.X.device)
    if math.isinf(lam_ft):
        return FineTuned(zero, train_error(zero, data, sigma, loss, chunk), "frozen", {}, None)
    g = generator(seed, "finetune_init", data.X.device)
    starts = [("informed", w_star.clone())] if informed else []
    starts += [
        (f"random{k}", init_scale * torch.randn(D, generator=g, device=data.X.device, dtype=data.X.dtype))
        for k in range(restarts)
    ]
    if not starts:
        raise ValueError("need at least one start: informed=True or restarts >= 1")
    vg = finetune_value_and_grad(data, sigma, lam_ft, loss, chunk)
    best_name, best, objectives = None, None, {}
    for name, w0 in starts:
        res = minimise(vg, w0, rtol=rtol, max_iter=max_iter)
        objectives[name] = res.objective
        if best is None or res.objective < best.objective:
            best_name, best = name, res
    assert best is not None and best_name is not None  # starts is not empty
    w = best.x
    if float(w @ w_star) < 0:  # sign symmetry w -> -w: report the representative with m >= 0
        w = -w
    return FineTuned(w, train_error(w, data, sigma, loss, chunk), best_name, objectives, best)
