"""One L-BFGS engine for both stages (PyTorch L-BFGS, strong Wolfe line search).

The objective is supplied as ``value_and_grad(x) -> (value, grad)``; chunked
objectives accumulate their gradient chunk by chunk, so memory stays bounded.
Convergence is judged on the sup-norm of the gradient relative to the one at
the starting point (``max|g| <= rtol * max|g0|``, the test torch's L-BFGS itself
uses); the result always carries iterations, final gradient norm and the flag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

ValueAndGrad = Callable[[torch.Tensor], tuple[float, torch.Tensor]]


def chunked_ridge_objective(
    chunk_loss: Callable[[torch.Tensor, slice], torch.Tensor], n: int, lam: float, chunks: Iterable[slice]
) -> ValueAndGrad:
    """``x -> ((sum_mu loss_mu(x) + lam ||x||^2) / n, gradient)`` (eqs. 2-3 divided by n).

    ``chunk_loss(x, sl)`` is the differentiable sum of the per-sample losses over the samples
    ``sl``; each chunk's gradient is accumulated by its own backward pass, so memory stays
    O(chunk) beyond the data. ``chunks`` is the iterable of slices covering the n samples.
    """
    slices = list(chunks)

    def value_and_grad(x: torch.Tensor):
        xl = x.detach().requires_grad_(True)
        total = 0.0
        for sl in slices:
            part = chunk_loss(xl, sl) / n
            part.backward()
            total += float(part.detach())
        reg = lam * (xl * xl).sum() / n
        reg.backward()
        return total + float(reg.detach()), xl.grad

    return value_and_grad


@dataclass(frozen=True)
class OptimResult:
    """Outcome of one minimisation.

    Attributes:
        x: the minimiser found (detached).
        objective: objective value at ``x``.
        iterations: L-BFGS iterations.
        evaluations: objective/gradient evaluations.
        grad_norm: ``max|grad|`` at ``x``.
        grad_norm_initial: ``max|grad|`` at the start.
        converged: ``grad_norm <= rtol * grad_norm_initial`` (or the gradient vanished).
        reason: why it stopped ('gradient', 'stalled', 'max_iter', 'trivial').
    """

    x: torch.Tensor
    objective: float
    iterations: int
    evaluations: int
    grad_norm: float
    grad_norm_initial: float
    converged: bool
    reason: str


def minimise(
    value_and_grad: ValueAndGrad,
    x0: torch.Tensor,
    *,
    rtol: float = 1e-6,
    max_iter: int = 2000,
    history_size: int = 50,
    atol: float = 1e-300,
) -> OptimResult:
    """Minimise with ``torch.optim.LBFGS(line_search_fn='strong_wolfe')``, full batch, float64."""
    x = x0.detach().clone().requires_grad_(True)
    f0, g0 = value_and_grad(x.detach())
    g0n = float(g0.abs().max())
    if not g0n > atol:
        return OptimResult(x.detach(), f0, 0, 1, g0n, g0n, True, "trivial")
    tol = rtol * g0n
    n_eval = [1]

    def closure():
        f, g = value_and_grad(x.detach())
        n_eval[0] += 1
        x.grad = g
        return torch.tensor(f, dtype=x.dtype)

    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.5),
        tolerance_grad=tol,
        tolerance_change=1e-15,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    opt.step(closure)
    iters = int(opt.state[x].get("n_iter", 0))
    f, g = value_and_grad(x.detach())
    n_eval[0] += 1
    gn = float(g.abs().max())
    converged = gn <= tol
    reason = "gradient" if converged else ("max_iter" if iters >= max_iter else "stalled")
    return OptimResult(x.detach().clone(), f, iters, n_eval[0], gn, g0n, converged, reason)
