"""Pre-training by ERM (eq. 2): minimise sum_mu loss_mu(W) + lam ||W||_F^2 over W in R^{D x P}.

The objective handed to L-BFGS is divided by N (same minimiser, O(1) values);
it is evaluated in chunks of sequences, each chunk's gradient accumulated, so
memory is O(chunk T P) beyond the data.

For kappa >= 1 the minimisers depend on W only through S = W W^T / sqrt(P) and
``lam ||W||_F^2 = lam sqrt(P) Tr S``, so a student of width P = D with ridge
``lam sqrt(kappa)`` has the same minimisers in S as one of width P = kappa D
(THEORY-NOTES, "Cheaper but equivalent computations"); ``reduce_width=True``
in :func:`hdlora.simulate.run` uses it (checked by a test).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import Dataset, _chunks, generator, quadratic_field
from .losses import per_sample
from .optim import OptimResult, ValueAndGrad, chunked_ridge_objective, minimise


def default_chunk(T: int, width: int, budget: int = 1 << 24) -> int:
    """Sequences per chunk so that the (chunk, T, width) intermediates stay ~``budget`` numbers."""
    return max(1, budget // (T * max(width, 1)))


def pretrain_loss_sum(
    W: torch.Tensor,
    X: torch.Tensor,
    sigma_target: torch.Tensor,
    G: torch.Tensor | None,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    loss: str,
) -> torch.Tensor:
    """``sum_mu loss(sigma(z_mu(W)) - sigma(z*_mu))`` for one chunk (eq. 2), differentiable in W.

    ``z(W) = X S X^T / D - delta_ab Tr(S)/D`` with ``S = W W^T / sqrt(P)`` (eqs. 34-35).
    """
    trace_S = (W * W).sum() / math.sqrt(W.shape[1])
    z = quadratic_field(X, W, trace_S)
    return per_sample(sigma(z) - sigma_target, G, loss).sum()


@dataclass(frozen=True)
class Pretrained:
    """Result of pre-training: the weights, the train loss per sample and the optimiser record."""

    W: torch.Tensor | None
    train_error: float
    lam: float
    optim: OptimResult | None


def pretrain_value_and_grad(
    data: Dataset, sigma: Callable[[torch.Tensor], torch.Tensor], lam: float, loss: str, chunk: int
) -> ValueAndGrad:
    """``W -> ((sum_mu loss_mu + lam ||W||^2)/N, gradient)``, chunked."""
    N = data.n
    sigma_target = sigma(data.z_star)
    G = data.G if loss == "sequence" else None

    def chunk_loss(W: torch.Tensor, sl: slice) -> torch.Tensor:
        return pretrain_loss_sum(W, data.X[sl], sigma_target[sl], None if G is None else G[sl], sigma, loss)

    return chunked_ridge_objective(chunk_loss, N, lam, _chunks(N, chunk))


def train_error(
    W: torch.Tensor | None, data: Dataset, sigma: Callable[[torch.Tensor], torch.Tensor], loss: str, chunk: int
) -> float:
    """Mean per-sample train loss (Result 3 convention); ``W = None`` means W_hat = 0."""
    sigma_target = sigma(data.z_star)
    total = 0.0
    with torch.no_grad():
        for sl in _chunks(data.n, chunk):
            if W is None:
                z = torch.zeros_like(data.z_star[sl])
            else:
                z = quadratic_field(data.X[sl], W, (W * W).sum() / math.sqrt(W.shape[1]))
            G = data.G[sl] if loss == "sequence" else None
            total += float(per_sample(sigma(z) - sigma_target[sl], G, loss).sum())
    return total / data.n


def pretrain(
    data: Dataset,
    *,
    width: int,
    lam: float,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    loss: str,
    seed: int,
    rtol: float = 1e-5,
    max_iter: int = 3000,
    init_scale: float = 1.0,
    chunk: int | None = None,
) -> Pretrained:
    """Minimise eq. 2 + lam ||W||_F^2 from a random init ``W_ij ~ N(0, init_scale^2)``.

    ``lam = inf`` means W_hat = 0 (no optimisation; returned as ``W=None``).
    """
    T, D = data.X.shape[1], data.X.shape[2]
    chunk = chunk or default_chunk(T, width)
    if math.isinf(lam):
        return Pretrained(None, train_error(None, data, sigma, loss, chunk), lam, None)
    g = generator(seed, "pretrain_init", data.X.device)
    W0 = init_scale * torch.randn(D, width, generator=g, device=data.X.device, dtype=data.X.dtype)
    res = minimise(pretrain_value_and_grad(data, sigma, lam, loss, chunk), W0, rtol=rtol, max_iter=max_iter)
    return Pretrained(res.x, train_error(res.x, data, sigma, loss, chunk), lam, res)
