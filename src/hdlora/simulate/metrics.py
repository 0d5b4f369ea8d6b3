"""Order parameters measured on the weights (eqs. 8-9) and test errors (eqs. 4, 5, 83).

Test errors are averaged over ``n_test`` (= 10 D) fresh samples, generated and
evaluated chunk by chunk (no test set is held in memory).
"""
from __future__ import annotations

import math

import torch

from ..data import (Effective, Teacher, _chunks, draw_noise, draw_tokens, effective_fields, generator,
                    quadratic_field, rank_one_field)
from .losses import per_sample


def trace_S2(W: torch.Tensor) -> float:
    """``Tr S^2`` for ``S = W W^T / sqrt(P)``: ``||W^T W||_F^2 / P`` (no D x D product)."""
    WtW = W.T @ W
    return float((WtW * WtW).sum()) / W.shape[1]


def trace_S_S(W1: torch.Tensor, W2: torch.Tensor) -> float:
    """``Tr S1 S2 = ||W1^T W2||_F^2 / sqrt(P1 P2)``."""
    C = W1.T @ W2
    return float((C * C).sum()) / math.sqrt(W1.shape[1] * W2.shape[1])


def order_parameters(W_hat: torch.Tensor | None, teacher: Teacher) -> dict:
    """Q0, Q, M (eq. 8) of S_hat = W W^T/sqrt(P), S* = W* W*^T/sqrt(P0); W_hat None means 0."""
    D = teacher.D
    Q0 = trace_S2(teacher.W_star) / D ** 2
    if W_hat is None:
        return {"Q0": Q0, "Q": 0.0, "M": 0.0}
    return {"Q0": Q0, "Q": trace_S2(W_hat) / D ** 2, "M": trace_S_S(W_hat, teacher.W_star) / D ** 2}


def rank_one_parameters(w: torch.Tensor, w_star: torch.Tensor) -> dict:
    """q, m, q0 (eq. 9) and the overlap o_w = |w.w*| / (||w|| ||w*||) (0 when w = 0)."""
    D = w.shape[0]
    q, m, q0 = float(w @ w) / D, float(w @ w_star) / D, float(w_star @ w_star) / D
    overlap = abs(m) / math.sqrt(q * q0) if q > 0 and q0 > 0 else 0.0
    return {"q": q, "m": m, "q0": q0, "overlap": overlap}


def test_errors(*, teacher: Teacher, W_hat: torch.Tensor | None, w_hat: torch.Tensor, beta: float,
                T: int, Delta: float, n_test: int, seed: int, sigma, loss: str,
                effective: Effective | None = None, chunk: int = 4096) -> dict:
    """Test errors on fresh samples (eqs. 4, 5, 83), mean per sample.

    Returns:
        pretrain_test_error: E (eq. 4), pre-trained model (beta = 1, w = 0) on pre-training data.
        recalibrated_test_error: E of the recalibrated frozen map sqrt(beta) W_hat (= E when beta = 1).
        finetune_test_error: E' (eq. 5), fine-tuned model (sqrt(beta) W_hat, w_hat) on fresh
            fine-tuning data.
        forgetting_error: E'' (eq. 83), fine-tuned model on the pre-training test data.

    In the effective mode ``(z*, z)`` are drawn from Q (eq. 13) instead of being computed
    from X, S* and S_hat (z already is the pre-trained field; beta scales it).
    """
    device = w_hat.device
    sums = {"pretrain_test_error": 0.0, "recalibrated_test_error": 0.0,
            "finetune_test_error": 0.0, "forgetting_error": 0.0}
    if effective is None:
        g_pre, g_ft = generator(seed, "pretrain_test", device), generator(seed, "finetune_test", device)
        tr_hat = None if W_hat is None else float((W_hat * W_hat).sum()) / math.sqrt(W_hat.shape[1])
    else:
        g_pre = generator(seed, "effective_pretrain_test", device)
        g_ft = generator(seed, "effective_finetune_test", device)
    D = teacher.D

    def fields(g, c):
        """(X, z*, z_hat) of c fresh pre-training samples."""
        if effective is None:
            X = draw_tokens(c, T, D, g, device)
            xi = draw_noise(c, T, Delta, g, device)
            z_star = quadratic_field(X, teacher.W_star, teacher.trace_S_star) + xi
            z = torch.zeros_like(z_star) if W_hat is None else quadratic_field(X, W_hat, tr_hat)
        else:
            z_star, z = effective_fields(c, T, effective, Delta, g, device)
            X = draw_tokens(c, T, D, g, device)
        return X, z_star, z

    with torch.no_grad():
        for sl in _chunks(n_test, chunk):
            c = sl.stop - sl.start
            # pre-training test data: E, E(beta), E''
            X, z_star, z = fields(g_pre, c)
            G = (X @ X.transpose(-1, -2) / D) if loss == "sequence" else None
            s_star = sigma(z_star)
            sums["pretrain_test_error"] += float(per_sample(sigma(z) - s_star, G, loss).sum())
            sums["recalibrated_test_error"] += float(per_sample(sigma(beta * z) - s_star, G, loss).sum())
            lora = rank_one_field(X, w_hat)[1]
            sums["forgetting_error"] += float(per_sample(sigma(beta * z + lora) - s_star, G, loss).sum())
            # fresh fine-tuning test data: E'
            X, z_star, z = fields(g_ft, c)
            G = (X @ X.transpose(-1, -2) / D) if loss == "sequence" else None
            target = z_star + rank_one_field(X, teacher.w_star)[1]
            pred = beta * z + rank_one_field(X, w_hat)[1]
            sums["finetune_test_error"] += float(per_sample(sigma(pred) - sigma(target), G, loss).sum())
    return {k: v / n_test for k, v in sums.items()}
