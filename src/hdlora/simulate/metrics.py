"""Order parameters measured on the weights (eqs. 8-9) and test errors (eqs. 4, 5, 83).

Test errors are averaged over ``n_test`` (= 10 D) fresh samples, generated and
evaluated chunk by chunk (no test set is held in memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..data import (
    DTYPE,
    Effective,
    Teacher,
    _chunks,
    draw_noise,
    draw_tokens,
    effective_fields,
    generator,
    lora_field,
    quadratic_field,
    token_chunk,
)
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
    Q0 = trace_S2(teacher.W_star) / D**2
    if W_hat is None:
        return {"Q0": Q0, "Q": 0.0, "M": 0.0}
    return {"Q0": Q0, "Q": trace_S2(W_hat) / D**2, "M": trace_S_S(W_hat, teacher.W_star) / D**2}


def rank_one_parameters(w: torch.Tensor, w_star: torch.Tensor) -> dict:
    """q, m, q0 (eq. 9) and the overlap o_w = |w.w*| / (||w|| ||w*||) (0 when w = 0)."""
    D = w.shape[0]
    q, m, q0 = float(w @ w) / D, float(w @ w_star) / D, float(w_star @ w_star) / D
    overlap = abs(m) / math.sqrt(q * q0) if q > 0 and q0 > 0 else 0.0
    return {"q": q, "m": m, "q0": q0, "overlap": overlap}


#: numerical rank of a LoRA w: singular values of w/sqrt(D) below this fraction of the largest are dropped
RANK_RTOL = 1e-3


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def numerical_basis(w: torch.Tensor, rtol: float = RANK_RTOL) -> torch.Tensor:
    """Orthonormal basis (D x k) of span(w): left singular vectors of w/sqrt(D) whose singular
    values are at least ``rtol`` times the largest (k = 0 when w = 0)."""
    D = w.shape[0]
    U, S, _ = torch.linalg.svd(_matrix(w) / math.sqrt(D), full_matrices=False)
    if S.numel() == 0 or not float(S[0]) > 0:
        return U[:, :0]
    return U[:, S >= rtol * S[0]]


def rank_r_parameters(w: torch.Tensor, w_star: torch.Tensor) -> dict:
    """Invariants of a rank-r LoRA w (D x r, or a vector) against a rank-r* teacher (issue 11).

    q = w^T w/D (r x r), m = w^T w*/D (r x r*), q0 = w*^T w*/D (r* x r*).  Returns the scalars
    ``q`` = tr q, ``m`` = ||m||_F, ``q0`` = tr q0, ``overlap`` = ||m||_F / sqrt(||q||_F ||q0||_F)
    (the paper's o_w at rank one; 0 when w = 0), the lists ``q_eigenvalues`` (descending),
    ``m_singular_values`` (descending, min(r, r*)), ``principal_cosines`` (cosines of the principal
    angles between span(w), numerical rank by :data:`RANK_RTOL`, and span(w*); descending;
    empty when w = 0), ``w_singular_values`` (of w/sqrt(D)), ``numerical_rank`` and the matrices
    ``q_matrix``, ``m_matrix``, ``q0_matrix`` as nested lists.  All invariant under w -> w O.
    """
    D = w.shape[0]
    W, Ws = _matrix(w), _matrix(w_star)
    q, m, q0 = W.T @ W / D, W.T @ Ws / D, Ws.T @ Ws / D
    nq, nm, nq0 = (float(torch.linalg.matrix_norm(a)) for a in (q, m, q0))
    overlap = nm / math.sqrt(nq * nq0) if nq > 0 and nq0 > 0 else 0.0
    basis = numerical_basis(W)
    star = numerical_basis(Ws)
    cos = torch.linalg.svdvals(basis.T @ star) if basis.shape[1] and star.shape[1] else W.new_zeros(0)
    return {
        "q": float(torch.trace(q)),
        "m": nm,
        "q0": float(torch.trace(q0)),
        "overlap": overlap,
        "q_eigenvalues": torch.linalg.eigvalsh(q).flip(0).tolist(),
        "m_singular_values": torch.linalg.svdvals(m).tolist(),
        "principal_cosines": cos.clamp(max=1.0).tolist(),
        "w_singular_values": torch.linalg.svdvals(W / math.sqrt(D)).tolist(),
        "numerical_rank": int(basis.shape[1]),
        "q_matrix": q.tolist(),
        "m_matrix": m.tolist(),
        "q0_matrix": q0.tolist(),
    }


def lora_parameters(w: torch.Tensor, w_star: torch.Tensor) -> dict:
    """The order parameters reported for a LoRA: at r = r* = 1 exactly :func:`rank_one_parameters`
    (q, signed m, q0, o_w) plus the rank-r lists; otherwise :func:`rank_r_parameters`."""
    out = rank_r_parameters(w, w_star)
    if w.dim() == 1 and w_star.dim() == 1:
        out.update(rank_one_parameters(w, w_star))
    return out


def test_errors(
    *,
    teacher: Teacher,
    W_hat: torch.Tensor | None,
    w_hat: torch.Tensor,
    beta: float,
    T: int,
    Delta: float,
    n_test: int,
    seed: int,
    sigma: Callable[[torch.Tensor], torch.Tensor],
    loss: str,
    effective: Effective | None = None,
    chunk: int = 4096,
) -> dict:
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
    sums = {
        "pretrain_test_error": 0.0,
        "recalibrated_test_error": 0.0,
        "finetune_test_error": 0.0,
        "forgetting_error": 0.0,
    }
    if effective is None:
        g_pre, g_ft = generator(seed, "pretrain_test", device), generator(seed, "finetune_test", device)
        tr_hat = None if W_hat is None else float((W_hat * W_hat).sum()) / math.sqrt(W_hat.shape[1])
    else:
        g_pre = generator(seed, "effective_pretrain_test", device)
        g_ft = generator(seed, "effective_finetune_test", device)
    D = teacher.D
    # tokens are drawn in sub-blocks of at most ~2^24 numbers (the same draws as one block of
    # `chunk` sequences) and reduced at once to T x T fields: memory O(2^24 + chunk T^2) at any D
    sub = token_chunk(T, max(D, 1 if W_hat is None else W_hat.shape[1]))

    def token_fields(g, c, w_list, quad):
        """Draw c sequences of tokens in sub-blocks; return G and the rank-one fields of each w in
        w_list (and the quadratic fields of the target / pre-trained map when ``quad``)."""
        G = torch.empty(c, T, T, dtype=DTYPE, device=device)
        ranks = [torch.empty_like(G) for _ in w_list]
        q_star = torch.empty_like(G) if quad else None
        q_hat = torch.zeros_like(G) if quad else None
        for b in _chunks(c, sub):
            X = draw_tokens(b.stop - b.start, T, D, g, device)
            G[b] = X @ X.transpose(-1, -2) / D
            for r, w in zip(ranks, w_list):
                r[b] = lora_field(X, w)[1]
            if quad:
                q_star[b] = quadratic_field(X, teacher.W_star, teacher.trace_S_star)
                if W_hat is not None:
                    q_hat[b] = quadratic_field(X, W_hat, tr_hat)
        return G, ranks, q_star, q_hat

    def fields(g, c, w_list):
        """(G, rank-one fields of w_list, z*, z_hat) of c fresh pre-training samples."""
        if effective is None:
            G, ranks, q_star, z = token_fields(g, c, w_list, True)
            xi = draw_noise(c, T, Delta, g, device)
            z_star = q_star + xi
        else:
            z_star, z = effective_fields(c, T, effective, Delta, g, device)
            G, ranks, _, _ = token_fields(g, c, w_list, False)
        return (G if loss == "sequence" else None), ranks, z_star, z

    with torch.no_grad():
        for sl in _chunks(n_test, chunk):
            c = sl.stop - sl.start
            # pre-training test data: E, E(beta), E''
            G, (lora,), z_star, z = fields(g_pre, c, [w_hat])
            s_star = sigma(z_star)
            sums["pretrain_test_error"] += float(per_sample(sigma(z) - s_star, G, loss).sum())
            sums["recalibrated_test_error"] += float(per_sample(sigma(beta * z) - s_star, G, loss).sum())
            sums["forgetting_error"] += float(per_sample(sigma(beta * z + lora) - s_star, G, loss).sum())
            # fresh fine-tuning test data: E'
            G, (chi_star, lora), z_star, z = fields(g_ft, c, [teacher.w_star, w_hat])
            target = z_star + chi_star
            pred = beta * z + lora
            sums["finetune_test_error"] += float(per_sample(sigma(pred) - sigma(target), G, loss).sum())
    return {k: v / n_test for k, v in sums.items()}
