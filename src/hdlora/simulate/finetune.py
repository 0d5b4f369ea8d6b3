"""LoRA fine-tuning by ERM (eq. 3): minimise sum_mu loss_mu(w) + lam' ||w||^2, W_hat frozen.

The frozen fields ``z_frozen`` of the N' sequences are computed once, so an
evaluation costs O(N' T D r):  ``z(w) = z_frozen + chi chi^T - (||w||^2/D) I``,
``chi = X w / sqrt(D)`` (eqs. 1, 12, 15).

Rank one (the paper) keeps w a vector (D,).  Rank r (beyond the paper, issue 11): w is D x r,
``chi = X w/sqrt(D)`` is T x r, the centering is ``- tr(q) I`` with ``q = w^T w/D`` of the
current w (differentiated, :func:`hdlora.data.lora_field`) and the ridge is ``lam' ||w||_F^2``.

The problem is non-convex (sign symmetry w -> -w; at rank r the gauge w -> w O, O orthogonal):
we run an informed start at ``w = w*`` (as the paper's App. D; at rank r: w* truncated to its
first r columns, or padded with small random columns, since a zero column has zero gradient and
never moves) and ``restarts`` random starts ``w_i ~ N(0, init_scale^2)``, and keep the lowest
objective.  The objective is even in w, so the sign of the minimiser is fixed to
``m = w.w*/D >= 0``; at rank r the gauge is fixed by :func:`canonical_gauge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import Dataset, Tokens, _chunks, generator, lora_field, token_chunk
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
    """``sum_mu loss(sigma(z_frozen + chi chi^T - tr(q) I) - sigma(z*'))`` for one chunk (eq. 3);
    w a vector (rank one) or a D x r matrix."""
    _, field = lora_field(X, w)
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


def canonical_gauge(w: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """The representative ``w O`` (O orthogonal, r x r) of a rank-r LoRA in a fixed gauge.

    The model is invariant under w -> w O.  With ``m = w^T w*/D = U S V^T`` (SVD), ``w U`` has
    ``m = S V^T``: its column i is the one aligned with the i-th singular direction of m (sign: the
    largest entry of V_i in absolute value positive).  The columns beyond rank(m) (r > r*) are
    rotated among themselves so that their block of q is diagonal, in decreasing order (sign: the
    largest entry of the column positive).  A vector w (r = 1) gets the sign that makes the
    largest entry of m positive (``m >= 0`` at r* = 1, the paper's convention).
    """
    D = w.shape[0]
    ws = w_star.reshape(D, -1)
    if w.dim() == 1:
        m = w @ ws / D
        return -w if float(m[int(m.abs().argmax())]) < 0 else w
    r, rs = w.shape[1], ws.shape[1]
    m = w.T @ ws / D
    U, _, Vh = torch.linalg.svd(m, full_matrices=True)  # U: r x r, Vh: r* x r*
    k = min(r, rs)
    for i in range(k):
        if float(Vh[i, int(Vh[i].abs().argmax())]) < 0:
            U[:, i] = -U[:, i]
    out = w @ U
    if r > k:  # the columns orthogonal to the teacher directions: diagonalise their q block
        rest = out[:, k:]
        evals, evecs = torch.linalg.eigh(rest.T @ rest / D)
        rest = rest @ evecs.flip(-1)
        for j in range(rest.shape[1]):
            if float(rest[int(rest[:, j].abs().argmax()), j]) < 0:
                rest[:, j] = -rest[:, j]
        out = torch.cat([out[:, :k], rest], dim=1)
    return out


def starts(
    w_star: torch.Tensor,
    rank: int,
    g: torch.Generator,
    *,
    restarts: int,
    init_scale: float,
    informed: bool,
    pad_scale: float,
) -> list[tuple[str, torch.Tensor]]:
    """The fine-tuning starts: ``informed`` (w*, truncated to r columns or padded with
    ``pad_scale`` x N(0, 1) columns) and ``restarts`` random ``init_scale`` x N(0, 1) starts.

    At r = r* = 1 these are the paper's starts, drawn from ``g`` exactly as before the rank-r
    simulator (w* itself, then random vectors).  The padding columns are drawn before the
    random starts.
    """
    D = w_star.shape[0]
    dev, dt = w_star.device, w_star.dtype
    out: list[tuple[str, torch.Tensor]] = []
    if informed:
        if rank == 1 and w_star.dim() == 1:
            w0 = w_star.clone()
        else:
            ws = w_star.reshape(D, -1)
            w0 = ws[:, :rank].clone()
            if w0.shape[1] < rank:
                pad = pad_scale * torch.randn(D, rank - w0.shape[1], generator=g, device=dev, dtype=dt)
                w0 = torch.cat([w0, pad], dim=1)
            if rank == 1:
                w0 = w0[:, 0].contiguous()
        out.append(("informed", w0.contiguous()))  # L-BFGS views its gradient flat
    shape = (D,) if rank == 1 else (D, rank)
    out += [
        (f"random{k}", init_scale * torch.randn(*shape, generator=g, device=dev, dtype=dt)) for k in range(restarts)
    ]
    return out


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
    rank: int = 1,
    pad_scale: float = 0.05,
) -> FineTuned:
    """Minimise eq. 3 + lam' ||w||^2 from several starts; keep the lowest objective.

    ``lam_ft = inf`` gives w_hat = 0 (frozen pre-training, A.7) without optimisation.
    ``chunk``: sequences per pass chunk; default the token chunk of the data
    (:func:`hdlora.data.token_chunk`, aligned with the chunks of regenerated tokens).
    ``rank``: r, the LoRA rank (w_hat a vector at r = 1, else D x r); ``w_star`` a vector or D x r*.
    ``pad_scale``: scale of the random columns that pad the informed start when r > r*.
    """
    if data.z_frozen is None:
        raise ValueError("fine-tuning data need the frozen fields z_frozen")
    D = data.X.shape[-1]
    if chunk is None:
        chunk = data.X.chunk if isinstance(data.X, Tokens) else token_chunk(data.X.shape[1], D)
    zero = torch.zeros(*((D,) if rank == 1 else (D, rank)), dtype=data.X.dtype, device=data.X.device)
    if math.isinf(lam_ft):
        return FineTuned(zero, train_error(zero, data, sigma, loss, chunk), "frozen", {}, None)
    g = generator(seed, "finetune_init", data.X.device)
    todo = starts(w_star, rank, g, restarts=restarts, init_scale=init_scale, informed=informed, pad_scale=pad_scale)
    if not todo:
        raise ValueError("need at least one start: informed=True or restarts >= 1")
    vg = finetune_value_and_grad(data, sigma, lam_ft, loss, chunk)
    best_name, best, objectives = None, None, {}
    for name, w0 in todo:
        res = minimise(vg, w0, rtol=rtol, max_iter=max_iter)
        objectives[name] = res.objective
        if best is None or res.objective < best.objective:
            best_name, best = name, res
    assert best is not None and best_name is not None  # todo is not empty
    w = best.x
    if w.dim() == 1 and w_star.dim() == 1:
        if float(w @ w_star) < 0:  # sign symmetry w -> -w: report the representative with m >= 0
            w = -w
    else:
        w = canonical_gauge(w, w_star)
    return FineTuned(w, train_error(w, data, sigma, loss, chunk), best_name, objectives, best)
