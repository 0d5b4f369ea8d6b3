"""Benchmark of the state evolution: wall time of one full theoretical point, new code beside old.

Prints one JSON object.  A "point" is ``hdlora.theory.solve``: the pre-training state evolution
(Result 4), the fine-tuning state evolution (Result 5) and the errors of Result 3, with the
default 3e4 Monte-Carlo samples, branch search and verification included.

Cases (Fig. 1 setting: alpha = 0.1, alpha' = 3, T = 3, kappa0 = kappa = 1, Delta = 0.5,
lam = 0.1, lam' = 0.5, e = 0):
  * softmax, cold start;
  * softmax, warm start from the neighbouring point lam = 0.12 (as in a sweep);
  * linear (pre-training in closed form; fine-tuning by Monte Carlo with the exact global prox
    of hdlora.theory.prox_rank_one_linear);
  * softmax at the Fig. 3 setting (T = 2, kappa0 = 0.5, alpha = 0.2, e = 1, lam = 0.3).

Every measurement runs in a fresh subprocess (cold start: nothing solved before in that
process), one BLAS/torch thread, ``--repeat`` times, alternating the new code (this checkout's
``src``) and the old code (``--base-src``, or a temporary git worktree of ``--base-rev``), so that
both see the same machine load; the minimum over the repeats is reported, with the ratio
old / new.  The compiled prox kernel is loaded (or compiled) before timing: that time is reported
separately (``kernel_warmup_s``: with the on-disk cache as found; ``kernel_compile_s_empty_cache``:
a compile from an empty cache in a throw-away directory).

``kernel_choice``: one evaluation of the fine-tuning loss with gradient and Hessian for all
3e4 samples of the softmax point (the innermost work of the prox), three ways: the Numba kernel
(a loop over samples), PyTorch on the same (n, T, T) arrays (batched tensor ops), and the NumPy
reference (token-first arrays); ``kernel_choice.eigh_choice``: the linear exact prox's eigendecomposition
of 3e4 symmetric T x T matrices, LAPACK (numpy.linalg.eigh) against the batched Jacobi rotations of
hdlora.theory.jacobi, T = 2, 3, 4.

Usage: python benchmarks/bench_theory.py [--repeat 3] [--threads 1] [--n-mc 30000]
       [--base-src DIR | --base-rev REV] [--no-base] [--cases a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the last commit before the compiled prox kernel (the default old code)
DEFAULT_BASE_REV = "81e7eed"
CASES = ("softmax_fig1_cold", "softmax_fig1_warm", "linear_fig1_cold", "softmax_fig3_reuse_cold")


def _set_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


def child(a: argparse.Namespace) -> dict:
    """Run the cases once each in this (fresh) process; returns {case: {...}}."""
    import torch

    torch.set_num_threads(a.threads)
    from hdlora import Params
    from hdlora.theory import solve

    out: dict = {"cases": {}}
    t0 = time.perf_counter()
    try:
        from hdlora.theory import newton
    except ImportError:  # the old code has no compiled kernel
        out["kernel_warmup_s"] = None
    else:
        newton.warmup()
        out["kernel_warmup_s"] = time.perf_counter() - t0
    fig1 = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
    fig3 = Params(alpha=0.2, alpha_ft=3, tokens=2, kappa0=0.5, kappa=1, noise=0.5, lam=0.3, lam_ft=0.5, reuse=True)
    cases = {
        "softmax_fig1_cold": (fig1, False),
        "softmax_fig1_warm": (fig1, True),
        "linear_fig1_cold": (fig1.replace(activation="linear"), False),
        "softmax_fig3_reuse_cold": (fig3, False),
    }
    for name in a.cases.split(","):
        p, warm = cases[name]
        init = solve(fig1.replace(lam=0.12), n_mc=a.n_mc, warn=False) if warm else None
        t = time.perf_counter()
        r = solve(p, n_mc=a.n_mc, init=init, warn=False)
        out["cases"][name] = {
            "wall_s": time.perf_counter() - t,
            "pretrain_iterations": r.pretrain_iterations,
            "finetune_iterations": r.finetune_iterations,
            "converged": r.converged,
            "finetune_test_error": r.finetune_test_error,
        }
    return out


def kernel_choice(a: argparse.Namespace) -> dict:
    """Seconds (min of 5) of one fine-tuning loss + gradient + Hessian evaluation on all samples."""
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from hdlora.activations import get as get_activation
    from hdlora.theory import finetune as F
    from hdlora.theory import newton

    newton.warmup()
    rng = np.random.default_rng(0)
    n, T = a.n_mc, 3
    Zq = rng.standard_normal((n, T, T))
    Zq = Zq + np.swapaxes(Zq, 1, 2)
    Ya = rng.standard_normal((n, T, T))
    Ya = Ya + np.swapaxes(Ya, 1, 2)
    Y = get_activation("softmax", "numpy")(Ya)
    chi = rng.standard_normal((n, T))

    def best(f):
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    K = newton.kernel()
    rows = np.concatenate([Zq.reshape(n, T * T), Y.reshape(n, T * T)], axis=1)
    consts = np.array([float(T), 1.0])
    g, H, aux = np.empty((n, T)), np.empty((n, T, T)), np.empty((n, 1))
    numba_s = best(lambda: K.evaluate_batch(1, chi, rows, consts, 2, g, H, aux))
    cz, Zt, Yt = torch.from_numpy(chi), torch.from_numpy(Zq), torch.from_numpy(Y)

    def torch_eval():  # the NumPy reference formulas of _psi_t on (n, T, T) tensors
        X = Zt + cz[:, :, None] * cz[:, None, :]
        P = torch.softmax(X, dim=2)
        R = P - Yt
        loss = (R * R).sum(dim=(1, 2))
        U = P * (R - (P * R).sum(dim=2, keepdim=True))
        G = 2.0 * U
        Gs = G + G.transpose(1, 2)
        grad = (Gs * cz[:, None, :]).sum(dim=2)
        W = P * P + U
        pp = (P * P).sum(dim=2)
        pchi = (P * cz[:, None, :]).sum(dim=2)
        wchi = (W * cz[:, None, :]).sum(dim=2)
        hc = 2.0 * (W * cz[:, None, :] - W * pchi[:, :, None] - P * wchi[:, :, None] + (pp * pchi)[:, :, None] * P)
        quad = (hc * cz[:, None, :]).sum(dim=2)
        c2 = cz * cz
        cW = c2[:, :, None] * W
        cpP = (c2 * pp)[:, :, None] * P
        WP = torch.einsum("nab,nad->nbd", cW, P)
        PP = torch.einsum("nab,nad->nbd", cpP, P)
        S4 = 2.0 * (PP - WP - WP.transpose(1, 2)) + torch.diag_embed(2.0 * cW.sum(dim=1))
        M2 = cz[:, :, None] * hc
        Hl = Gs + M2 + M2.transpose(1, 2) + S4 + torch.diag_embed(quad)
        return loss, grad, Hl

    with torch.no_grad():
        torch_s = best(torch_eval)
    Zq_t, Y_t, c_t = F._t(Zq), F._t(Y), F._t(chi)
    numpy_s = best(lambda: F._psi_t(c_t, Zq_t, Y_t, c_t, 1.0, "softmax"))
    return {
        "what": "fine-tuning loss + gradient + Hessian, all samples, softmax T = 3",
        "n": n,
        "numba_s": numba_s,
        "torch_s": torch_s,
        "numpy_reference_s": numpy_s,
        "eigh_choice": eigh_choice(a, best),
    }


def eigh_choice(a: argparse.Namespace, best) -> dict:
    """Seconds (min of 5) of the eigendecomposition of the linear exact prox (n_mc symmetric T x T matrices,
    once per fine-tuning solve): LAPACK (numpy.linalg.eigh) and the batched Jacobi of hdlora.theory.jacobi."""
    import numpy as np

    from hdlora.theory.jacobi import eigh_token_first

    out: dict = {"what": "eigendecomposition of n symmetric T x T matrices (the linear exact prox)", "n": a.n_mc}
    rng = np.random.default_rng(1)
    for T in (2, 3, 4):
        B = rng.standard_normal((a.n_mc, T, T))
        B = B + np.swapaxes(B, 1, 2)
        Bt = np.ascontiguousarray(np.moveaxis(B, 0, -1))
        out[f"T{T}"] = {
            "lapack_eigh_s": best(lambda: np.linalg.eigh(B)),
            "jacobi_s": best(lambda: eigh_token_first(Bt)),
            "jacobi_sweeps": eigh_token_first(Bt).sweeps,
        }
    return out


def _run(src: Path, a: argparse.Namespace, mode: str, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), **(env_extra or {}))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--{mode}",
        "--threads",
        str(a.threads),
        "--n-mc",
        str(a.n_mc),
        "--cases",
        a.cases,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child ({src}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-mc", type=int, default=30000)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument(
        "--base-src",
        default=os.environ.get("HDLORA_BASE_SRC"),
        help="src directory of the old code (default: a git worktree of --base-rev)",
    )
    ap.add_argument("--base-rev", default=DEFAULT_BASE_REV)
    ap.add_argument("--no-base", action="store_true", help="time the new code only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kernel-choice", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    unknown = [c for c in a.cases.split(",") if c not in CASES]
    if unknown:
        ap.exit(2, f"bench_theory: --cases {','.join(unknown)}: not a case; the cases are {','.join(CASES)}\n")
    _set_threads(a.threads)
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.warmup_only:
        from hdlora.theory import newton

        print(json.dumps({"compile_s": newton.warmup()}))
        return
    if a.kernel_choice:
        print(json.dumps(kernel_choice(a)))
        return

    new_src = ROOT / "src"
    tmp = None
    base_src = None
    if not a.no_base:
        if a.base_src:
            base_src = Path(a.base_src)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="hdlora-base-"))
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "wt"), a.base_rev],
                check=True,
                capture_output=True,
            )
            base_src = tmp / "wt" / "src"
    out: dict = {
        "benchmark": "theory point (pre-training + fine-tuning SE), new vs old code",
        "n_mc": a.n_mc,
        "threads": a.threads,
        "repeat": a.repeat,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "old_code": str(base_src),
        "load_avg_start": os.getloadavg()[0],
    }
    try:
        with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
            out["kernel_compile_s_empty_cache"] = _run(new_src, a, "warmup-only", {"NUMBA_CACHE_DIR": cache})[
                "compile_s"
            ]
        runs: dict[str, list] = {"new": [], "old": []}
        for _ in range(a.repeat):
            runs["new"].append(_run(new_src, a, "child"))
            if base_src is not None:
                runs["old"].append(_run(base_src, a, "child"))
        out["kernel_warmup_s"] = min(r["kernel_warmup_s"] for r in runs["new"])
        out["cases"] = {}
        for name in a.cases.split(","):
            row = {}
            for which in ("new", "old"):
                if not runs[which]:
                    continue
                ts = [r["cases"][name]["wall_s"] for r in runs[which]]
                last = runs[which][-1]["cases"][name]
                row[which] = {
                    "wall_s_min": min(ts),
                    "wall_s_all": ts,
                    **{
                        k: last[k]
                        for k in ("pretrain_iterations", "finetune_iterations", "converged", "finetune_test_error")
                    },
                }
            if "old" in row:
                row["speedup_old_over_new"] = row["old"]["wall_s_min"] / row["new"]["wall_s_min"]
                row["finetune_test_error_rel_diff"] = abs(
                    row["new"]["finetune_test_error"] - row["old"]["finetune_test_error"]
                ) / abs(row["old"]["finetune_test_error"])
            out["cases"][name] = row
        out["kernel_choice"] = _run(new_src, a, "kernel-choice")
    finally:
        if tmp is not None:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "wt")], capture_output=True
            )
            shutil.rmtree(tmp, ignore_errors=True)
    out["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
