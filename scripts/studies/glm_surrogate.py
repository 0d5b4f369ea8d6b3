"""GLM surrogate vs real attention pre-training (docs/studies/pretrain_Q_gaussian_equivalence.md).

One seed, one D, one activation, at the paper's Fig. 1 pre-training point.  Modes:
  real   the library's attention pre-training (attention loss, eq. 30);
  sur    identical except the fields: an independent Gaussian sensing matrix per sample and pair a <= b,
         with the attention field's mean and variance (the theory's Gaussian-field description, eqs. 45-47);
  indep  rank-one token fields as in attention, but fresh tokens for every pair (no token shared in a row).
usage: python scripts/studies/glm_surrogate.py MODE ACT D SEED1 SEED2 ...   (one JSON line per seed)
Memory of 'sur': N L D(D+1)/2 float64 = 0.24 GB at D = 100, 1.2 GB at D = 150."""

import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

torch.set_num_threads(1)
from hdlora import activations
from hdlora.data import DTYPE, draw_noise, draw_teacher, generator, pretrain_dataset
from hdlora.params import Params
from hdlora.simulate.metrics import order_parameters
from hdlora.simulate.optim import minimise
from hdlora.simulate.pretrain import pretrain

RTOL = float(os.environ.get("RTOL", "1e-6"))


def params(act):
    return Params(
        alpha=0.1, alpha_ft=1.0, tokens=3, kappa0=1.0, kappa=1.0, noise=0.5, lam=0.1, lam_ft=math.inf, activation=act
    )


def sur_design(N, T, D, seed):
    """Independent sensing 'matrices' in upper-triangle coordinates of a symmetric S.
    For S symmetric: off-diag pair (a<b), G iid N(0,1): <G,S> = sum_i G_ii S_ii + sum_{i<j} (G_ij+G_ji) S_ij
      -> coefficients g_ii ~ N(0,1), g_ij ~ N(0,2) on u = (S_ii, S_ij (i<j)).
    diagonal (a=b), G = (A+A^T)/sqrt2: <G,S> = sqrt2 <A,S> -> g_ii ~ N(0,2), g_ij ~ N(0,4).
    field z_ab = (g . u) / D, so Var z_ab = ||S||_F^2/D^2 = Q (a<b), 2Q (a=b), mean 0.
    Returns Gm (N, L, K) and a (L,) vector marking diagonal pairs."""
    iu = torch.triu_indices(D, D)
    diag_mask = (iu[0] == iu[1]).to(DTYPE)
    L = T * (T + 1) // 2
    pairs = [(a, b) for a in range(T) for b in range(a, T)]
    g = torch.Generator()
    g.manual_seed(1_000_003 * seed + 77 * D + 5)
    K = iu.shape[1]
    Gm = torch.randn(N, L, K, generator=g, dtype=DTYPE)
    scale_off = torch.where(diag_mask > 0, torch.tensor(1.0, dtype=DTYPE), torch.tensor(math.sqrt(2.0), dtype=DTYPE))
    isdiag = torch.tensor([a == b for a, b in pairs])
    scale = torch.where(isdiag[:, None], math.sqrt(2.0) * scale_off[None, :], scale_off[None, :])  # (L,K)
    Gm *= scale[None]
    return Gm, iu, pairs


def to_sym(zL, pairs, T):
    n = zL.shape[0]
    z = zL.new_zeros(n, T, T)
    for l, (a, b) in enumerate(pairs):
        z[:, a, b] = zL[:, l]
        if a != b:
            z[:, b, a] = zL[:, l]
    return z


def run_sur(p, D, seed, sigma):
    s = p.sizes(D)
    N, T, P, P0 = s["N"], p.tokens, s["P"], s["P0"]
    teacher = draw_teacher(D, P0, seed)
    Gm, iu, pairs = sur_design(N, T, D, seed)
    L = len(pairs)
    K = iu.shape[1]
    Gflat = Gm.reshape(N * L, K)
    S_star = teacher.W_star @ teacher.W_star.T / math.sqrt(P0)
    u_star = S_star[iu[0], iu[1]]
    xi = draw_noise(N, T, p.noise, generator(seed, "pretrain_data"), "cpu")
    z_star = to_sym((Gflat @ u_star).reshape(N, L) / D, pairs, T) + xi
    target = sigma(z_star)
    lam = p.lam

    def vg(W):
        Wl = W.detach().requires_grad_(True)
        S = Wl @ Wl.T / math.sqrt(P)
        u = S[iu[0], iu[1]]
        z = to_sym((Gflat @ u).reshape(N, L) / D, pairs, T)
        B = sigma(z) - target
        obj = ((B * B).sum() + lam * (Wl * Wl).sum()) / N
        obj.backward()
        return float(obj.detach()), Wl.grad

    g = generator(seed, "pretrain_init")
    W0 = torch.randn(D, P, generator=g, dtype=DTYPE)
    res = minimise(vg, W0, rtol=RTOL, max_iter=5000)
    with torch.no_grad():
        S = res.x @ res.x.T / math.sqrt(P)
        z = to_sym((Gflat @ S[iu[0], iu[1]]).reshape(N, L) / D, pairs, T)
        B = sigma(z) - target
        terr = float((B * B).sum()) / N
    out = order_parameters(res.x, teacher)
    out.update(
        train_error=terr,
        objective=res.objective,
        converged=res.converged,
        iters=res.iterations,
        grad=res.grad_norm,
        grad0=res.grad_norm_initial,
    )
    return out


def run_real(p, D, seed, sigma):
    s = p.sizes(D)
    N, T, P, P0 = s["N"], p.tokens, s["P"], s["P0"]
    teacher = draw_teacher(D, P0, seed)
    pre = pretrain_dataset(N, T, p.noise, teacher, seed)
    pt = pretrain(pre, width=P, lam=p.lam, sigma=sigma, loss="attention", seed=seed, rtol=RTOL, max_iter=5000)
    out = order_parameters(pt.W, teacher)
    o = pt.optim
    out.update(
        train_error=pt.train_error,
        objective=o.objective,
        converged=o.converged,
        iters=o.iterations,
        grad=o.grad_norm,
        grad0=o.grad_norm_initial,
    )
    return out


def fields(U, V, isdiag, W, D):
    P = W.shape[1]
    trS = (W * W).sum() / math.sqrt(P)
    return ((U @ W) * (V @ W)).sum(-1) / (D * math.sqrt(P)) - isdiag * trS / D


def run_indep(p, D, seed, sigma):
    s = p.sizes(D)
    N, T, P, P0 = s["N"], p.tokens, s["P"], s["P0"]
    teacher = draw_teacher(D, P0, seed)
    pairs = [(a, b) for a in range(T) for b in range(a, T)]
    L = len(pairs)
    isdiag = torch.tensor([float(a == b) for a, b in pairs], dtype=DTYPE)
    g = torch.Generator()
    g.manual_seed(2_000_003 * seed + 91 * D + 7)
    U = torch.randn(N, L, D, generator=g, dtype=DTYPE)
    V = torch.randn(N, L, D, generator=g, dtype=DTYPE)
    V[:, isdiag > 0] = U[:, isdiag > 0]
    xi = draw_noise(N, T, p.noise, generator(seed, "pretrain_data"), "cpu")
    target = sigma(to_sym(fields(U, V, isdiag, teacher.W_star, D), pairs, T) + xi)

    def vg(W):
        Wl = W.detach().requires_grad_(True)
        B = sigma(to_sym(fields(U, V, isdiag, Wl, D), pairs, T)) - target
        obj = ((B * B).sum() + p.lam * (Wl * Wl).sum()) / N
        obj.backward()
        return float(obj.detach()), Wl.grad

    W0 = torch.randn(D, P, generator=generator(seed, "pretrain_init"), dtype=DTYPE)
    res = minimise(vg, W0, rtol=RTOL, max_iter=5000)
    with torch.no_grad():
        B = sigma(to_sym(fields(U, V, isdiag, res.x, D), pairs, T)) - target
        terr = float((B * B).sum()) / N
    out = order_parameters(res.x, teacher)
    out.update(
        train_error=terr,
        objective=res.objective,
        converged=res.converged,
        iters=res.iterations,
        grad=res.grad_norm,
        grad0=res.grad_norm_initial,
    )
    return out


if __name__ == "__main__":
    mode, act, D = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runners = {"real": run_real, "sur": run_sur, "indep": run_indep}
    if mode not in runners:
        sys.exit(f"MODE must be one of {sorted(runners)}, got {mode!r}")
    p = params(act)
    sigma = activations.get(act, "torch")
    for seed in map(int, sys.argv[4:]):
        t0 = time.time()
        r = runners[mode](p, D, seed, sigma)
        r.update(mode=mode, act=act, D=D, seed=seed, wall=time.time() - t0)
        print(json.dumps(r), flush=True)
