"""Active fine-tuning in the simulator (Section 4.3, Algorithm 1), memory-bounded.

Algorithm 1: from a pool of N_bar' = alpha_bar' D candidate sequences, compute the
frozen pre-activation z_mu of the (recalibrated) pre-trained attention for every
candidate, rank them by the score ``||sigma(z_mu) - sigma(0)||_F^2`` (step 2) and
label the N' = rho N_bar' lowest (steps 3-4).  The comparison of Fig. 4, "N'
sequences drawn uniformly from the same pool", is the first N' candidates of the
pool (the pool is i.i.d., so its first N' are a uniform subset).

The pool is streamed in chunks and only a running set of the N' lowest scores is
kept (ties broken by pool index, so the selection equals a stable argsort of all
scores; :func:`select_lowest` is that direct path, used by the tests):

* full pipeline: chunk of tokens X (and label noise xi) -> z = beta z_hat(X) -> score;
  memory O((N' + chunk) T D) beyond the pre-trained weights;
* effective pre-training: the frozen fields (z*, z) ~ Q (eq. 13) of a candidate are
  independent of its tokens (App. A.4), so the pool needs only (z*, z), and the
  D-dimensional tokens of the N' labelled sequences are drawn afterwards: memory
  O(N' T D + chunk T^2), pools of 1e6 candidates and more (THEORY-NOTES).

In the effective mode the labelled sequences of both sets (selected and uniform)
get the *same* token draws (stream ``pool_tokens``, in label order): tokens are
independent of the frozen fields, so each set has the right law, and the paired
difference E'(uniform) - E'(active) has a smaller variance (common random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..data import (
    DTYPE,
    Dataset,
    Effective,
    Teacher,
    _chunks,
    draw_noise,
    draw_tokens,
    effective_fields,
    finetune_target,
    generator,
    gram,
    pretrain_target,
    quadratic_field,
    tokens_with_fields,
)
from ..params import ParamError


def selection_score(z: torch.Tensor, sigma: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``||sigma(z) - sigma(0)||_F^2`` per sequence (Algorithm 1, step 2); z: (n, T, T) -> (n,)."""
    T = z.shape[-1]
    s0 = sigma(torch.zeros(1, T, T, dtype=z.dtype, device=z.device))
    return ((sigma(z) - s0) ** 2).sum(dim=(-1, -2))


def select_lowest(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Direct path: pool indices of the ``n_keep`` lowest scores (stable: ties by index), in pool order."""
    if not (1 <= n_keep <= scores.shape[0]):
        raise ParamError(f"n_keep must be in [1, {scores.shape[0]}], got {n_keep}")
    order = torch.sort(scores, stable=True).indices[:n_keep]
    return torch.sort(order).values


@dataclass
class _Running:
    """The n_keep lowest scores seen so far, with their pool indices and payload rows, in pool order."""

    n_keep: int
    scores: torch.Tensor | None = None
    index: torch.Tensor | None = None
    payload: dict | None = None

    def update(self, scores: torch.Tensor, start: int, payload: dict) -> None:
        idx = torch.arange(start, start + scores.shape[0], device=scores.device)
        if self.scores is not None:
            # scores, index and payload are always set together
            assert self.index is not None and self.payload is not None
            scores = torch.cat([self.scores, scores])
            idx = torch.cat([self.index, idx])
            payload = {k: torch.cat([self.payload[k], v]) for k, v in payload.items()}
        if scores.shape[0] > self.n_keep:
            # candidates are in pool order, so a stable sort breaks ties by pool index
            keep = torch.sort(torch.sort(scores, stable=True).indices[: self.n_keep]).values
            scores, idx = scores[keep], idx[keep]
            payload = {k: v[keep] for k, v in payload.items()}
        self.scores, self.index, self.payload = scores, idx, payload


def select_lowest_stream(
    chunks: Iterable[tuple[torch.Tensor, dict]], n_keep: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict | None, int, float]:
    """Memory-bounded path: ``chunks`` yields ``(scores, payload)`` in pool order.

    Returns ``(index, scores, payload, n_pool, score_sum)``: the pool indices of the
    ``n_keep`` lowest scores (pool order), their scores and payload rows, the pool
    size and the sum of all scores (index, scores, payload are None only for an empty pool with
    n_keep <= 0).
    """
    run = _Running(int(n_keep))
    start, total = 0, 0.0
    for scores, payload in chunks:
        run.update(scores, start, payload)
        start += scores.shape[0]
        total += float(scores.sum())
    if start < n_keep:
        raise ParamError(f"the pool has {start} candidates, fewer than n_keep = {n_keep}")
    return run.index, run.scores, run.payload, start, total


@dataclass(frozen=True)
class PoolSelection:
    """The two fine-tuning sets drawn from one candidate pool.

    Attributes:
        active: the N' sequences of Algorithm 1 (lowest scores), frozen fields set (beta applied).
        uniform: the first N' candidates of the same pool (uniform subset), frozen fields set.
        active_z_star, uniform_z_star: the frozen part of the target (z* of eq. 10, with the
            label noise), (N', T, T), for the measured effective noise.
        index: pool indices of the selected candidates.
        scores: their scores; score_pool_mean: mean score over the whole pool.
        n_pool: N_bar'.
    """

    active: Dataset
    uniform: Dataset
    active_z_star: torch.Tensor
    uniform_z_star: torch.Tensor
    index: torch.Tensor
    scores: torch.Tensor
    score_pool_mean: float
    n_pool: int


def _check_sizes(n_pool: int, n_keep: int) -> None:
    if not (1 <= n_keep <= n_pool):
        raise ParamError(f"active fine-tuning needs 1 <= N' <= N_bar', got N' = {n_keep}, N_bar' = {n_pool}")


def effective_pool(
    n_pool: int,
    n_keep: int,
    T: int,
    eff: Effective,
    Delta: float,
    beta: float,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    teacher: Teacher,
    seed: int,
    device: str | torch.device = "cpu",
    chunk: int = 1 << 16,
    storage: str = "float64",
) -> PoolSelection:
    """Algorithm 1 on an effective pre-training: pool of (z*, z) ~ Q (eq. 13), scored on beta z.

    Only the fields of the pool are drawn (chunked, stream ``pool``); the tokens of the
    labelled sequences are drawn afterwards (stream ``pool_tokens``, shared by both sets),
    kept as ``storage`` (see :func:`hdlora.data.tokens_with_fields`).
    """
    _check_sizes(n_pool, n_keep)
    g = generator(seed, "pool", device)
    first: dict[str, list] = {"z_star": [], "z": []}
    n_first = [0]

    def chunks() -> Iterator[tuple[torch.Tensor, dict]]:
        for sl in _chunks(n_pool, chunk):
            z_star, z = effective_fields(sl.stop - sl.start, T, eff, Delta, g, device)
            z = beta * z
            if n_first[0] < n_keep:
                take = min(n_keep - n_first[0], z.shape[0])
                first["z_star"].append(z_star[:take])
                first["z"].append(z[:take])
                n_first[0] += take
            yield selection_score(z, sigma), {"z_star": z_star, "z": z}

    index, scores, payload, n, total = select_lowest_stream(chunks(), n_keep)
    # _check_sizes gave n_keep >= 1, so the selection is set
    assert index is not None and scores is not None and payload is not None
    X, G, chi_field = tokens_with_fields(
        n_keep, T, teacher.D, generator(seed, "pool_tokens", device), device, storage, teacher.w_star
    )
    zero = torch.zeros(n_keep, T, T, dtype=DTYPE, device=device)

    def dataset(z_star, z):
        return Dataset(X, zero, z_star + chi_field, G, z_frozen=z)

    u_star, u_z = torch.cat(first["z_star"]), torch.cat(first["z"])
    return PoolSelection(
        dataset(payload["z_star"], payload["z"]),
        dataset(u_star, u_z),
        payload["z_star"],
        u_star,
        index,
        scores,
        total / n,
        n,
    )


def full_pool(
    n_pool: int,
    n_keep: int,
    T: int,
    Delta: float,
    beta: float,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    teacher: Teacher,
    W_hat: torch.Tensor | None,
    seed: int,
    device: str | torch.device = "cpu",
    chunk: int = 4096,
) -> PoolSelection:
    """Algorithm 1 with a real pre-trained map: stream the pool (tokens X, noise xi) in chunks,
    score ``beta z_hat(X)`` (eqs. 11, 26) and keep only the X, xi of the selected and of the first N'.
    """
    _check_sizes(n_pool, n_keep)
    D = teacher.D
    g = generator(seed, "pool", device)
    tr_hat = None if W_hat is None else float((W_hat * W_hat).sum()) / math.sqrt(W_hat.shape[1])
    first: dict[str, list] = {"X": [], "xi": [], "z": []}
    n_first = [0]

    def chunks() -> Iterator[tuple[torch.Tensor, dict]]:
        for sl in _chunks(n_pool, chunk):
            c = sl.stop - sl.start
            X = draw_tokens(c, T, D, g, device)
            xi = draw_noise(c, T, Delta, g, device)
            if W_hat is None:
                z = torch.zeros(c, T, T, dtype=DTYPE, device=device)
            else:
                assert tr_hat is not None  # set whenever W_hat is
                z = beta * quadratic_field(X, W_hat, tr_hat)
            if n_first[0] < n_keep:
                take = min(n_keep - n_first[0], c)
                for k, v in (("X", X), ("xi", xi), ("z", z)):
                    first[k].append(v[:take])
                n_first[0] += take
            yield selection_score(z, sigma), {"X": X, "xi": xi, "z": z}

    index, scores, payload, n, total = select_lowest_stream(chunks(), n_keep)
    # _check_sizes gave n_keep >= 1, so the selection is set
    assert index is not None and scores is not None and payload is not None

    def dataset(X, xi, z):
        z_star = pretrain_target(X, xi, teacher)
        return Dataset(X, xi, finetune_target(X, z_star, teacher), gram(X), z_frozen=z), z_star

    act, act_star = dataset(payload["X"], payload["xi"], payload["z"])
    uni, uni_star = dataset(*(torch.cat(first[k]) for k in ("X", "xi", "z")))
    return PoolSelection(act, uni, act_star, uni_star, index, scores, total / n, n)


def delta_eff_measured(z_star: torch.Tensor, z: torch.Tensor) -> float:
    """Measured effective noise of a fine-tuning set: the mean over sequences and over the T^2
    entries of ``(z - z*)_ab^2 / (1 + delta_ab)`` (the quantity of eqs. 25, 28 and 99-105;
    z is the frozen field actually used, i.e. after the recalibration).  A second moment
    (not centred), as in :func:`hdlora.theory.effective.delta_eff_from_fields`: that is what
    enters the fine-tuning loss."""
    T = z.shape[-1]
    s = 1.0 + torch.eye(T, dtype=z.dtype, device=z.device)
    return float((((z - z_star) ** 2) / s).mean())
