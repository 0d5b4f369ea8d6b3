"""Rank-r LoRA on a rank-r* task: the fine-tuning state evolution (beyond the paper).

Derivation: ``docs/theory/rank_r.md`` (the matrix generalisation of App. A.5, eqs. 61-72, and of the
replicon, eq. 78).  Student w in R^{D x r}, teacher w* in R^{D x r*}; order parameters
q = w^T w / D (r x r), m = w^T w* / D (r x r*), v (r x r), q0 = w*^T w* / D (r* x r*), conjugates
m_hat (r x r*), q_hat, v_hat (r x r).  Per sample, the output channel is the prox over chi in R^{T x r} of

    psi(chi) = -|| sigma(z - tr(q) I + chi chi^T) - sigma(z* + chi* chi*^T - tr(q0) I) ||_F^2
               - 1/2 tr[(chi - chi_tilde) v^{-1} (chi - chi_tilde)^T],
    chi_tilde = chi* q0^{-1} m^T + zeta S^{1/2},   S = q - m q0^{-1} m^T   (symmetric square root),

with the rows of chi* ~ N(0, q0), of zeta ~ N(0, I_r), independent.  The loss depends on chi only
through chi chi^T, so in the eigenbasis of v = U diag(d) U^T (xi = chi U) the prox is a prox with a
*diagonal* metric (weight d_k on column k): the form of the generic kernel,
min_x loss(x) + sum_i (x_i - a_i)^2 / (2 w_i), x = vec(xi) in R^{T r}.

The per-sample prox is :func:`hdlora.theory.prox_rank_r.prox_rank_r` (the compiled Newton kernel, potential
FINETUNE_RANK_R, from several starts).  The branches by rank(m) and the wiring into ``hdlora.theory.solve``
are in :mod:`hdlora.theory.solve_rank_r`.

The update (direct form, the default of the rank-one code): with g = (chi_prox - chi_tilde) v^{-1},
F = E[zeta^T g], Y_S the solution of S^{1/2} Y_S + Y_S S^{1/2} = sym(F) (Frechet derivative of the
square root),

    m_hat = alpha' (E[g^T chi*] - 2 Y_S m) q0^{-1},
    v_hat = -2 alpha' (Y_S + E[d psi / d tr q] I_r),
    q_hat = alpha' E[g^T g],
    v = (2 lam' I + v_hat)^{-1},  m = v m_hat q0,  q = v (m_hat q0 m_hat^T + q_hat) v.

('stein' form: m_hat = alpha' (v^{-1} E[chi^T chi*] - v^{-1} E[C_T] v^{-1} m) q0^{-1},
v_hat = -alpha' E[Gamma_T] - 2 alpha' E[d psi/d tr q] I, Gamma_T = v^{-1} C_T v^{-1} - T v^{-1},
C_T the token partial trace of C = -(Hess psi)^{-1}.)  At r = r* = 1, q0 = 1 these are exactly
the rank-one eqs. 67-72 of :func:`hdlora.theory.finetune._state_update`.

Gauge: the model is invariant under w -> w O.  The sampled update map is not exactly covariant
(zeta is a fixed sample), so iterating on raw matrices drifts slowly along the orbit.  Every output of
the update map is rotated to a canonical gauge (:func:`canonical_gauge`: the leading block of m
symmetric positive semidefinite, q diagonal on the complement of the range of m), and the damped
iteration (:func:`hdlora.theory.fixed_point.iterate`) runs on the entries of the gauge-fixed matrices.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..activations import get as get_activation
from ..params import A0 as _A0
from ..params import ParamError, Params, check_tol
from . import effective as _effective
from . import engine as _engine
from .finetune import _check_fields, _law_args, _se
from .order_parameters import FinetuneDiagnostics
from .prox_rank_r import MAX_PROX_DIM, prox_rank_r
from .sampling import frozen_fields, standard_normals, to_sym

__all__ = [
    "sqrtm_psd",
    "sqrtm_frechet",
    "ridge_channel",
    "canonical_gauge",
    "output_channel",
    "replicon_map",
    "linear_test_error",
    "RankRResult",
    "invariants",
    "default_init",
    "solve_finetune_rank_r",
]


# ----------------------------------------------------------------------------------------
# matrix functions
# ----------------------------------------------------------------------------------------
def sqrtm_psd(S: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues, round-off, clipped to 0)."""
    S = 0.5 * (S + S.T)
    lam, U = np.linalg.eigh(S)
    return (U * np.sqrt(np.maximum(lam, 0.0))) @ U.T


def sqrtm_frechet(S: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Frechet derivative of S -> S^{1/2} in the direction E: the solution X of the Sylvester equation
    S^{1/2} X + X S^{1/2} = E (in the eigenbasis of S: X_ij = E_ij / (s_i + s_j), s = sqrt(eig S)).
    Also the adjoint of that derivative (the Sylvester operator is self-adjoint)."""
    lam, U = np.linalg.eigh(0.5 * (S + S.T))
    s = np.sqrt(np.maximum(lam, 0.0))
    denom = np.maximum(s[:, None] + s[None, :], 1e-300)
    return U @ ((U.T @ E @ U) / denom) @ U.T


def ridge_channel(
    mhat: np.ndarray, qhat: np.ndarray, vhat: np.ndarray, lam_ft: float, q0: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The input channel of the ridge penalty lam' ||w||_F^2 in closed form (docs/theory/rank_r.md, sec. 5):
    v = (2 lam' I + v_hat)^{-1}, m = v m_hat q0, q = v (m_hat q0 m_hat^T + q_hat) v.

    Returns (m, q, v); v = None when 2 lam' I + v_hat is not positive definite (no fixed point there)."""
    r = vhat.shape[0]
    A = 2.0 * lam_ft * np.eye(r) + 0.5 * (vhat + vhat.T)
    if np.linalg.eigvalsh(A).min() <= 0:
        return None, None, None
    v = np.linalg.inv(A)
    v = 0.5 * (v + v.T)
    m = v @ mhat @ q0
    q = v @ (mhat @ q0 @ mhat.T + qhat) @ v
    return m, 0.5 * (q + q.T), v


def canonical_gauge(
    m: np.ndarray, q: np.ndarray, v: np.ndarray, rel_tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rotate (m, q, v) -> (O^T m, O^T q O, O^T v O), O orthogonal r x r, into the canonical gauge:
    A = m E^T (E = the r x r* matrix with ones on the diagonal: the first min(r, r*) columns of m) has
    O^T A symmetric positive semidefinite on its range; on the complement (dimension r - rank A: r > r*
    or a rank-deficient m) q is diagonal with decreasing entries, each basis vector signed so that its
    largest coupling q_{i j} (else v_{i j}) to the range directions i is positive (largest component
    positive when there is no range).  Degenerate eigenvalues of q on the complement leave the gauge
    there undetermined (a limitation of this prototype).
    Returns (m, q, v, O).  At r = 1: O = sign(m) (1 when m = 0)."""
    r, rs = m.shape
    A = np.zeros((r, r))
    k0 = min(r, rs)
    A[:, :k0] = m[:, :k0]
    U, s, Vt = np.linalg.svd(A)
    V = Vt.T
    smax = s.max() if s.size else 0.0
    k = int(np.sum(s > rel_tol * max(smax, 1e-300))) if smax > 0 else 0
    if k < r:
        # complement in the student space: N0 = U[:, k:], ordered by the eigenvalues of q there
        N0 = U[:, k:]
        lam, Z = np.linalg.eigh(N0.T @ q @ N0)
        Z = Z[:, ::-1]
        N = N0 @ Z
        Rk = U[:, :k] @ V[:, :k].T  # the range part of O (invariant under the SVD's sign choices)
        for j in range(N.shape[1]):  # sign: the largest coupling to the range, in canonical coordinates
            for c in (Rk.T @ q @ N[:, j], Rk.T @ v @ N[:, j], N[:, j]):
                if c.size and np.abs(c).max() > 1e-12 * (1.0 + np.abs(q).max()):
                    if c[np.argmax(np.abs(c))] < 0:
                        N[:, j] = -N[:, j]
                    break
        # complement in the canonical coordinates: standard basis vectors least in span(V_k), Gram-Schmidt
        Vk = V[:, :k]
        P = np.eye(r) - Vk @ Vk.T
        order = np.argsort(-np.linalg.norm(P, axis=0), kind="stable")[: r - k]
        Vc, _ = np.linalg.qr(P[:, np.sort(order)])
        for j in range(Vc.shape[1]):  # keep e_j -> e_j where the complement is a standard basis vector
            if Vc[np.argmax(np.abs(Vc[:, j])), j] < 0:
                Vc[:, j] = -Vc[:, j]
        Uf = np.concatenate([U[:, :k], N], axis=1)
        Vf = np.concatenate([Vk, Vc], axis=1)
    else:
        Uf, Vf = U, V
    O = Uf @ Vf.T
    mq = O.T @ m
    qq = O.T @ q @ O
    vv = O.T @ v @ O
    return mq, 0.5 * (qq + qq.T), 0.5 * (vv + vv.T), O


# ----------------------------------------------------------------------------------------
# replicon (docs/theory/rank_r.md, sec. 10)
# ----------------------------------------------------------------------------------------
def _sym_basis(r: int) -> np.ndarray:
    """Orthonormal basis of the symmetric r x r matrices, as columns of an (r^2, r(r+1)/2) array."""
    cols = []
    for i in range(r):
        for j in range(i, r):
            E = np.zeros((r, r))
            if i == j:
                E[i, i] = 1.0
            else:
                E[i, j] = E[j, i] = 1.0 / math.sqrt(2.0)
            cols.append(E.reshape(-1))
    return np.array(cols).T


def replicon_map(hess_f: np.ndarray, d: np.ndarray, alpha_ft: float) -> tuple[float, np.ndarray]:
    """Spectral radius of K -> alpha' v E[tr_T(Gamma (I_T x K) Gamma^T)] v on symmetric r x r K, in the
    eigenbasis of v (v = diag(d); a conjugation leaves the spectrum unchanged).  Gamma = d g_out / d chi_tilde
    = W^{-1} C W^{-1} - W^{-1}, W = I_T x diag(d), C = (Hess of -psi)^{-1}.  At r = 1: alpha' E||C/v - I||_F^2
    = alpha' E||(v Hess psi)^{-1} + I||_F^2 (eq. 78).  Returns (radius, the r(r+1)/2 square matrix of the map)."""
    n, k, _ = hess_f.shape
    r = d.size
    T = k // r
    wi = 1.0 / np.tile(d, T)
    C = np.linalg.inv(hess_f)
    Gam = wi[None, :, None] * C * wi[None, None, :] - np.diag(wi)[None]
    Gb = Gam.reshape(n, T, r, T, r)
    # sum_{a,b} Gamma_ab (x) Gamma_ab, averaged: (r^2, r^2) acting on row-major vec K
    Mk = np.einsum("nakbj,nalbi->klji", Gb, Gb).reshape(r * r, r * r) / n
    # K -> Gamma K Gamma^T : (Gamma K Gamma^T)_{kl} = sum_{j,i} G_kj K_ji G_li -> index (k,l),(j,i)
    Dd = np.kron(np.diag(d), np.diag(d))
    M = alpha_ft * Dd @ Mk
    B = _sym_basis(r)
    Ms = B.T @ M @ B
    return float(np.max(np.abs(np.linalg.eigvals(Ms)))), Ms


def linear_test_error(T: int, delta_eff: float, q: np.ndarray, m: np.ndarray, q0: np.ndarray) -> float:
    """E' for sigma(x) = x / T at rank r (docs/theory/rank_r.md, sec. 9, R.13):
    (T^2 + T)(Delta_eff + ||q0||_F^2 + ||q||_F^2 - 2 ||m||_F^2) / T^2; at r = 1 the rank-one closed form."""
    return (T * T + T) * (delta_eff + np.sum(q0 * q0) + np.sum(q * q) - 2.0 * np.sum(m * m)) / T**2


# ----------------------------------------------------------------------------------------
# output channel: the conjugates from the per-sample prox (docs/theory/rank_r.md, secs. 6-7)
# ----------------------------------------------------------------------------------------
def output_channel(
    m: np.ndarray,
    q: np.ndarray,
    v: np.ndarray,
    chi_star: np.ndarray,
    zeta: np.ndarray,
    Zb: np.ndarray,
    Y: np.ndarray,
    q0: np.ndarray,
    alpha_ft: float,
    activation: str,
    *,
    Y_arg: np.ndarray | None = None,
    warm: np.ndarray | None = None,
    form: str = "direct",
    global_search: bool = True,
    n_random: int = 2,
    xtol: float = 1e-9,
) -> dict[str, Any]:
    """The conjugates (m_hat, q_hat, v_hat) at (m, q, v) from the prox of every sample.

    chi_star (n, T, r*) rows ~ N(0, q0); zeta (n, T, r) rows ~ N(0, I); Zb (n, T, T) the frozen
    student argument beta z; Y (n, T, T) the target sigma(z* + chi* chi*^T - tr(q0) I).
    Also returns the sampled output free entropy ``phi_out`` = E max psi and its derivatives
    ``dphi_dm`` (r x r*), ``dphi_dq`` (r x r, symmetric: d phi = tr(dphi_dq dq)), ``dphi_dv``, in the
    direct form (the stationarity of the sampled free entropy: m_hat = alpha' dphi_dm,
    v_hat = -2 alpha' dphi_dq, q_hat = 2 alpha' dphi_dv).
    """
    n, T, r = zeta.shape
    q0i = np.linalg.inv(q0)
    S = q - m @ q0i @ m.T
    Sh = sqrtm_psd(S)
    ct = chi_star @ q0i @ m.T + zeta @ Sh  # chi_tilde
    Zq = Zb - np.trace(q) * np.eye(T)
    p = prox_rank_r(
        ct, Zq, Y, v, activation, Y_arg=Y_arg, warm=warm, global_search=global_search, n_random=n_random, xtol=xtol
    )
    chi = p["chi"]
    vi = np.linalg.inv(v)
    g = (chi - ct) @ vi  # g_out
    Egg = np.einsum("nak,naj->kj", g, g) / n
    Edq = float(p["dq"].mean())  # E d psi / d tr q
    F = np.einsum("nak,naj->kj", zeta, g) / n  # E[zeta^T g]
    Ys = sqrtm_frechet(S, 0.5 * (F + F.T))
    dphi_dm = (np.einsum("nak,naj->kj", g, chi_star) / n - 2.0 * Ys @ m) @ q0i
    dphi_dq = Ys + Edq * np.eye(r)
    out = {
        "phi_out": float(p["psi"].mean()),
        "dphi_dm": dphi_dm,
        "dphi_dq": dphi_dq,
        "dphi_dv": 0.5 * Egg,
        "qhat": alpha_ft * Egg,
        "prox": p,
        "chi_tilde": ct,
    }
    if form == "direct":
        out["mhat"] = alpha_ft * dphi_dm
        out["vhat"] = -2.0 * alpha_ft * dphi_dq
    else:  # Stein form: Gaussian integration by parts on zeta and chi*
        U = p["U"]
        Cx = np.linalg.inv(p["hess_f"]).reshape(n, T, r, T, r)
        CT = U @ (np.einsum("nakaj->kj", Cx) / n) @ U.T  # E[C_T]
        out["mhat"] = alpha_ft * (vi @ np.einsum("nak,naj->kj", chi, chi_star) / n - vi @ CT @ vi @ m) @ q0i
        out["vhat"] = -alpha_ft * (vi @ CT @ vi - T * vi) - 2.0 * alpha_ft * Edq * np.eye(r)
    return out


# ----------------------------------------------------------------------------------------
# state evolution
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankRResult(FinetuneDiagnostics):
    """Fixed point of the rank-r fine-tuning state evolution, and the errors there.

    Matrices as nested lists: q (r x r), m (r x r*), v (r x r), q0 (r* x r*), conjugates.  Invariants:
    tr_q, m_fro (||m||_F), overlap = ||m||_F / sqrt(||q||_F ||q0||_F), eig_q (descending), sv_m (descending),
    principal_cosines (cosines of the principal angles between span(w) and span(w*), on the numerical range of
    w: eigenvalues of q below 1e-6 x the largest, i.e. singular values of w / sqrt(D) below 1e-3 x the largest,
    dropped), rank_m (singular values of m above 1e-3 sqrt(||q||_F ||q0||_F)).
    Errors: E' (R.12), L' (eq. 20 at rank r), E'' (eq. 84 at rank r); objective = alpha' L' + lam' tr q (the
    training objective per D at the fixed point, which ranks the branches).
    Prox diagnostics: prox_failed (Newton not converged), prox_not_max (not a local maximum), prox_uncertified
    (linear sigma: no certificate of global optimality, R.16; None for softmax).
    """

    r: int
    r_star: int
    q: list
    m: list
    v: list
    q0: list
    qhat: list
    mhat: list
    vhat: list
    tr_q: float
    m_fro: float
    overlap: float
    eig_q: list
    sv_m: list
    principal_cosines: list
    rank_m: int
    finetune_test_error: float
    finetune_train_error: float
    forgetting_error: float
    objective: float
    prox_uncertified: int | None

    @property
    def replica_stable(self) -> bool:
        return bool(self.replicon_finetune < 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "replica_stable": self.replica_stable}


def _pack(m, q, v):
    r, rs = m.shape
    st = {}
    for i in range(r):
        for j in range(rs):
            st[f"m_{i}_{j}"] = float(m[i, j])
    for name, A in (("q", q), ("v", v)):
        for i in range(r):
            for j in range(i, r):
                st[f"{name}_{i}_{j}"] = float(A[i, j])
    return st


def _unpack(st, r, rs):
    m = np.array([[st[f"m_{i}_{j}"] for j in range(rs)] for i in range(r)])
    q, v = np.zeros((r, r)), np.zeros((r, r))
    for name, A in (("q", q), ("v", v)):
        for i in range(r):
            for j in range(i, r):
                A[i, j] = A[j, i] = st[f"{name}_{i}_{j}"]
    return m, q, v


def _in_domain(st: Mapping[str, float], r: int, rs: int, q0: np.ndarray) -> bool:
    """The domain of the rank-r state evolution: v positive definite and S = q - m q0^-1 m^T positive
    semidefinite (chi_tilde has a real noise part).  An accelerated step of the fixed-point engine that
    leaves it is rejected (the prox needs v > 0), a damped one shortened."""
    m, q, v = _unpack(st, r, rs)
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(q)) and np.all(np.isfinite(v))):
        return False
    S = q - m @ np.linalg.solve(q0, m.T)
    return bool(
        np.linalg.eigvalsh(v).min() > 0 and np.linalg.eigvalsh(0.5 * (S + S.T)).min() >= -1e-12 * (1 + abs(np.trace(q)))
    )


def invariants(q: np.ndarray, m: np.ndarray, q0: np.ndarray) -> dict[str, Any]:
    """tr q, ||m||_F, the overlap ||m||_F / sqrt(||q||_F ||q0||_F), eig q, sv m, the principal-angle cosines and
    rank(m) (see :class:`RankRResult`)."""
    lam, U = np.linalg.eigh(0.5 * (q + q.T))
    lam, U = lam[::-1], U[:, ::-1]
    sv = np.linalg.svd(m, compute_uv=False)
    qf, q0f, mf = float(np.linalg.norm(q)), float(np.linalg.norm(q0)), float(np.linalg.norm(m))
    keep = lam > 1e-6 * max(lam[0], 1e-300)
    cos: list = []
    if keep.any() and lam[0] > 0:
        B = (U[:, keep] / np.sqrt(lam[keep])).T @ m @ np.linalg.inv(sqrtm_psd(q0))
        cos = np.clip(np.linalg.svd(B, compute_uv=False), 0.0, 1.0).tolist()
    scale = math.sqrt(qf * q0f)
    return {
        "tr_q": float(np.trace(q)),
        "m_fro": mf,
        "overlap": mf / scale if qf > 0 else 0.0,
        "eig_q": lam.tolist(),
        "sv_m": sv.tolist(),
        "principal_cosines": cos,
        "rank_m": int(np.sum(sv > 1e-3 * scale)) if qf > 0 else 0,
    }


def _draw_rank_r(n: int, T: int, q: np.ndarray, m: np.ndarray, q0: np.ndarray, seed: int):
    """(chi*, chi) with rows ~ N(0, [[q0, m^T], [m, q]]) i.i.d. over tokens (R.12); at r = r* = 1 the rank-one draw
    of :func:`hdlora.theory.errors.finetune_losses`."""
    r, rs = m.shape
    x = standard_normals(n, T * (rs + r), seed, purpose="test_rank_one")
    g = x[:, : T * rs].reshape(n, rs, T).transpose(0, 2, 1)
    u = x[:, T * rs :].reshape(n, r, T).transpose(0, 2, 1)
    cs = g @ sqrtm_psd(q0)
    q0i = np.linalg.inv(q0)
    return cs, cs @ q0i @ m.T + u @ sqrtm_psd(q - m @ q0i @ m.T)


def _test_errors(params: Params, q, m, q0, law, Zs, Zb, seed: int, n_test: int | None, n: int) -> dict[str, Any]:
    """E' (R.12) and E'' (eq. 84 at rank r) at (q, m): closed forms for sigma(x) = x/T when the law (Q0, Q, M) is
    known (R.13, R.13b), else Monte Carlo on fresh test fields of the law (or on the given fields, e = 0 without it)."""
    T, act, beta = params.tokens, params.activation, params.beta
    if law is not None:
        Q0, Q, M = law
        if act == "linear":
            d_eff = _effective.delta_eff_of_A0(_A0(Q0, params.noise), beta**2 * Q, beta * M)
            return {
                "finetune_test_error": linear_test_error(T, d_eff, q, m, q0),
                "forgetting_error": (T * T + T) * (d_eff + float(np.sum(q * q))) / T**2,
                "se": {"finetune_test_error": 0.0, "forgetting_error": 0.0},
            }
        f = frozen_fields(n_test or n, T, _A0(Q0, params.noise), beta**2 * Q, beta * M, seed=seed, purpose="test")
        Zs, Zb = to_sym(f["z_star"], T), to_sym(f["z"], T)
    sigma = get_activation(act, "numpy")
    cs, ch = _draw_rank_r(Zs.shape[0], T, q, m, q0, seed)
    eye = np.eye(T)
    pred = sigma(Zb + ch @ np.swapaxes(ch, 1, 2) - np.trace(q) * eye)
    ft = np.sum((pred - sigma(Zs + cs @ np.swapaxes(cs, 1, 2) - np.trace(q0) * eye)) ** 2, axis=(1, 2))
    fg = np.sum((pred - sigma(Zs)) ** 2, axis=(1, 2))
    return {
        "finetune_test_error": float(ft.mean()),
        "forgetting_error": float(fg.mean()),
        "se": {"finetune_test_error": _se(ft), "forgetting_error": _se(fg)},
    }


def default_init(params: Params, q0: np.ndarray) -> dict[str, np.ndarray]:
    """Cold start: m = 0.5 E diag(q0)^{1/2} (S = q - m q0^{-1} m^T = 0.25 on the leading block), q = 0.5 I,
    v = I / (2 lam' + alpha' T) (the rank-one cold start of :func:`hdlora.theory.finetune.solve_finetune` at r = 1)."""
    r, rs = params.lora_rank, q0.shape[0]
    m0 = np.zeros((r, rs))
    for i in range(min(r, rs)):
        m0[i, i] = 0.5 * math.sqrt(q0[i, i])
    return {"m": m0, "q": 0.5 * np.eye(r), "v": np.eye(r) / (2.0 * params.lam_ft + params.alpha_ft * params.tokens)}


def solve_finetune_rank_r(
    params: Params,
    z_star: np.ndarray,
    z: np.ndarray,
    *,
    q0: np.ndarray | None = None,
    Q0: float | None = None,
    Q: float | None = None,
    M: float | None = None,
    seed: int = 0,
    tol: float = 1e-7,
    max_iter: int = 400,
    mixing: float = 0.8,
    init: Mapping[str, np.ndarray] | None = None,
    form: str = "direct",
    n_random: int = 2,
    xtol: float = 1e-9,
    n_test: int | None = None,
) -> RankRResult:
    """Rank-r fine-tuning state evolution (docs/theory/rank_r.md) on given frozen fields (z*, z) (upper triangles
    (n, L), before recalibration, as :func:`hdlora.theory.finetune.solve_finetune` takes them), and the errors.

    Args:
        params: r = ``params.lora_rank``, r* = ``params.teacher_rank``, q0 = diag(``params.q0``) unless ``q0``.
        q0: (r*, r*) symmetric positive definite teacher overlap (overrides the strengths; a general q0).
        Q0: the pre-training test law Q (eq. 13): Q0.  Q0, Q, M are needed for e = 1 (the test errors use Q, not
            R); for e = 0 the given fields are the test fields when omitted (as
            :func:`hdlora.theory.finetune.solve_finetune`).
        Q: the same law's Q.
        M: the same law's M.
        seed: seed of chi*, zeta (standard_normals(n, T (r* + r), seed): at r = r* = 1 the rank-one draw) and of the
            test samples (named streams 'finetune', 'test_rank_one', 'test', as the rank-one code).
        tol: tolerance of :func:`hdlora.theory.fixed_point.iterate`, on the gauge-fixed entries.
        max_iter: iteration budget (all rounds together).
        mixing: damping of :func:`hdlora.theory.fixed_point.iterate`.
        init: {'m', 'q', 'v'} matrices (default :func:`default_init`).
        form: 'direct' (default) or 'stein' (docs/theory/rank_r.md, sec. 7).
        n_random: random starts of the global search of the prox.
        xtol: Newton step tolerance of the prox.
        n_test: Monte-Carlo samples of the softmax test errors (default n).

    The prox starts from chi_tilde at the first call and from the previous prox after; the global search
    (:func:`hdlora.theory.prox_rank_r.search_starts`) runs at the fixed point, where a change of basin restarts the
    iteration (up to 3 rounds), as the rank-one solver does (``restart_every = 0``).
    """
    t0 = time.perf_counter()
    if form not in ("direct", "stein"):
        raise ParamError(f"form must be 'direct' or 'stein', got {form!r}")
    tol = check_tol(tol)
    T = params.tokens
    r, r_star = params.lora_rank, params.teacher_rank
    if T * r > MAX_PROX_DIM:
        raise ParamError(
            f"lora_rank * tokens must be <= {MAX_PROX_DIM} (the rank-r prox's per-sample dimension), got "
            f"{r} * {T} = {T * r}; lower --lora-rank"
        )
    act = params.activation
    sigma = get_activation(act, "numpy")
    q0 = np.diag(np.asarray(params.q0, dtype=np.float64)) if q0 is None else np.asarray(q0, dtype=np.float64)
    if q0.shape != (r_star, r_star) or np.linalg.eigvalsh(0.5 * (q0 + q0.T)).min() <= 0:
        raise ParamError(f"q0 must be a symmetric positive definite (r*, r*) = ({r_star}, {r_star}) matrix")
    q0h = sqrtm_psd(q0)
    z_star, z = _check_fields(z_star, z, T)
    n = z_star.shape[0]
    law = _law_args(params, Q0, Q, M, required=params.reuse)
    beta = params.beta
    if law is not None and not params.reuse:
        delta_eff = _effective.delta_eff_beta(law[0], law[1], law[2], params.noise, beta)  # eqs. 25-26
    else:  # e = 1: Var(beta z - z*) over the train fields (eq. 27 for linear sigma)
        delta_eff = _effective.delta_eff_from_fields(z_star, z, beta)[0]
    x = standard_normals(n, T * (r_star + r), seed, purpose="finetune")
    chi_star = x[:, : T * r_star].reshape(n, r_star, T).transpose(0, 2, 1) @ q0h  # rows ~ N(0, q0)
    zeta = x[:, T * r_star :].reshape(n, r, T).transpose(0, 2, 1)  # rows ~ N(0, I_r)
    Zs = to_sym(z_star, T)
    Zb = beta * to_sym(z, T)
    eye = np.eye(T)
    Y_arg = Zs + chi_star @ np.swapaxes(chi_star, 1, 2) - np.trace(q0) * eye
    Y = sigma(Y_arg)
    ap, lam_ft = params.alpha_ft, params.lam_ft
    st0 = default_init(params, q0) if init is None else {k: np.asarray(init[k], dtype=np.float64) for k in "mqv"}
    start = _pack(*canonical_gauge(st0["m"], st0["q"], st0["v"])[:3])
    names = tuple(start)
    lo = np.full(len(names), -np.inf)
    hi = np.full(len(names), np.inf)
    for i, k in enumerate(names):
        d0, a_, b_ = k.split("_")
        if d0 in ("q", "v") and a_ == b_:
            lo[i], hi[i] = 1e-12, 1e6
        elif d0 == "m":
            lo[i], hi[i] = -1e3, 1e3

    def evaluate(x: np.ndarray, carry: Mapping[str, Any], full: bool):
        """F(x) projected onto the box, the next carry, aux; ``full``: with the global prox search."""
        m, q, v = _unpack(dict(zip(names, x.tolist())), r, r_star)
        try:
            out = output_channel(
                m,
                q,
                v,
                chi_star,
                zeta,
                Zb,
                Y,
                q0,
                ap,
                act,
                Y_arg=Y_arg,
                warm=carry["chi"],
                form=form,
                global_search=full,
                n_random=n_random,
                xtol=xtol,
            )
            m_new, q_new, v_new = ridge_channel(out["mhat"], out["qhat"], out["vhat"], lam_ft, q0)
        except FloatingPointError:
            return np.full(len(names), math.nan), carry, {}
        if m_new is None or q_new is None or v_new is None:  # 2 lam' I + v_hat not positive definite: no fixed point
            return np.full(len(names), math.nan), carry, {}
        m_new, q_new, v_new, O = canonical_gauge(m_new, q_new, v_new)
        new = _pack(m_new, q_new, v_new)
        fx = np.clip(np.array([new[k] for k in names]), lo, hi)
        aux = {
            "mhat": O.T @ out["mhat"],
            "qhat": O.T @ out["qhat"] @ O,
            "vhat": O.T @ out["vhat"] @ O,
            "prox": out["prox"],
            "chi_prox": out["prox"]["chi"],
        }
        return fx, {**carry, "chi": out["prox"]["chi"] @ O}, aux

    def update(x: np.ndarray, carry: Mapping[str, Any]):
        fx, nxt, aux = evaluate(x, carry, carry["check"])
        return fx, {**nxt, "check": False, "last_res": _engine.residual(fx, x)}, aux

    def verify(x: np.ndarray, carry: Mapping[str, Any]):
        """The global prox search at a candidate: the map changed if it moved a sample and F(x) beyond tol."""
        fx, nxt, aux = evaluate(x, carry, True)
        if not aux:
            return carry, False
        # no sample moved: the same map, whose residual at x the engine has just measured
        res = carry["last_res"] if aux["prox"]["n_changed"] == 0 else _engine.residual(fx, x)
        nxt = {**nxt, "check": False, "verified": (x.copy(), res, aux), "n_verify": carry["n_verify"] + 1}
        return nxt, aux["prox"]["n_changed"] > 0 and not res <= tol

    stage = _engine.Stage(
        init=lambda _p, _s: {"chi": None, "check": False, "n_verify": 0, "last_res": math.inf},
        update=update,
        verify=verify,
        domain=lambda x: (
            bool(np.all(np.isfinite(x)) and np.all(x >= lo) and np.all(x <= hi))
            and _in_domain(dict(zip(names, x.tolist())), r, r_star, q0)
        ),
        names=names,
        name="rank-r fine-tuning state evolution",
    )
    x0 = np.clip(np.array([start[k] for k in names], dtype=np.float64), lo, hi)
    br = _engine.solve_one(stage, x0, tol=tol, max_iter=max(max_iter, 1), mixing=mixing)
    # a start outside the domain returns before init: the fresh carry
    x, carry = br.x, (br.carry if br.carry is not None else stage.init(params, None))
    verified = carry.get("verified")
    if verified is not None and np.array_equal(verified[0], x):
        _, res_final, aux = verified
    else:  # not converged (or stopped at once): the global search at the returned point, for the diagnostics
        fx, carry, aux = evaluate(x, carry, True)
        res_final = _engine.residual(fx, x) if aux else math.nan
        carry = {**carry, "n_verify": carry["n_verify"] + 1}
    converged = bool(br.status != _engine.NOT_CONVERGED and res_final <= tol)
    iterations = br.iterations + carry["n_verify"]
    history = br.history
    m, q, v = _unpack(dict(zip(names, x.tolist())), r, r_star)
    nan = math.nan
    if aux:
        p = aux["prox"]
        rep, _ = replicon_map(p["hess_f"], p["d"], ap)
        chi = aux["chi_prox"]
        train = np.sum((sigma(Zb - np.trace(q) * eye + chi @ np.swapaxes(chi, 1, 2)) - Y) ** 2, axis=(1, 2))
        L_train, L_se = float(train.mean()), _se(train)
        hats = [np.asarray(aux[k]).tolist() for k in ("qhat", "mhat", "vhat")]
        diag = (int((~p["converged"]).sum()), int(p["n_not_max"]))
        unc = None if p["certified"] is None else int((~p["certified"]).sum())
    else:
        rep, L_train, L_se, hats, diag, unc = nan, nan, nan, [[], [], []], (n, n), None
    test = _test_errors(params, q, m, q0, law, Zs, Zb, seed, n_test, n)
    inv = invariants(q, m, q0)
    return RankRResult(
        r=r,
        r_star=r_star,
        q=q.tolist(),
        m=m.tolist(),
        v=v.tolist(),
        q0=q0.tolist(),
        qhat=hats[0],
        mhat=hats[1],
        vhat=hats[2],
        **inv,
        finetune_test_error=test["finetune_test_error"],
        finetune_train_error=L_train,
        forgetting_error=test["forgetting_error"],
        objective=ap * L_train + lam_ft * inv["tr_q"],
        replicon_finetune=float(rep),
        delta_eff=float(delta_eff),
        converged=converged,
        residual=float(res_final),
        iterations=iterations,
        n_mc=n,
        prox_failed=diag[0],
        prox_not_max=diag[1],
        prox_uncertified=unc,
        mc_se={"finetune_train_error": L_se, **test["se"]},
        wall_time=time.perf_counter() - t0,
        history=history,
    )
