"""Benchmark of the finite-D simulator: wall time and peak memory of the full pipeline (one seed).

Prints one JSON object.  Each case runs in its own subprocess, whose peak resident memory is read
with ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (tracemalloc does not see torch allocations);
on a GPU ``torch.cuda.max_memory_allocated`` is reported as well.

Cases:
  * Fig. 1 setting (alpha = 0.1, alpha' = 3, T = 3, kappa0 = kappa = 1, Delta = 0.5, lam = 0.1,
    lam' = 0.5, softmax, e = 0) at D in {100, 150, 300} on CPU;
  * Fig. 3 setting (T = 2, kappa0 = 0.5, kappa = 1, Delta = 0.5, alpha = 0.2, alpha' = 3, e = 1,
    lam = 0.3, lam' = 0.5) at D = 1000 on CUDA (skipped, with the reason, when CUDA is absent);
  * ``--memory-check``: D = 1000, T = 2, alpha = 0.2 (N = 200,000) pre-training set plus one
    loss/gradient evaluation on CPU, to show it fits 24 GiB.

  * ``--storage-dim D``: effective pre-training (Fig. 2, alpha' = 10, T = 3) at D with the fine-tuning
    tokens kept as float64, float32 or regenerated each pass: peak memory, seconds per L-BFGS iteration;
  * ``--effective-dim 10000``: the same at the paper's D = 10^4 (3e9 token values) with the storage chosen
    automatically for the memory available; on CPU, and on CUDA when present.

Usage: python benchmarks/bench_simulate.py [--dims 100 150 300] [--threads N] [--memory-check] [--skip-gpu]
       [--storage-dim 1500] [--effective-dim 10000] [--iters 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
cfg = json.loads(sys.argv[1])
if cfg.get("threads"):
    torch.set_num_threads(cfg["threads"])
from hdlora import Params
out = {"case": cfg["case"], "dim": cfg["dim"], "device": cfg["device"], "threads": torch.get_num_threads()}
t0 = time.perf_counter()
if cfg["mode"] == "pipeline":
    from hdlora.simulate import run_seed
    r = run_seed(Params(**cfg["params"]), cfg["dim"], 0, device=cfg["device"])
    keep = ("pretrain_iterations", "pretrain_grad_norm", "pretrain_converged", "finetune_iterations",
            "finetune_grad_norm", "finetune_converged", "finetune_winner", "pretrain_test_error",
            "finetune_test_error", "overlap", "Q", "M")
    out.update({k: r[k] for k in keep})
elif cfg["mode"] == "effective":  # effective pre-training fine-tuning set + a few L-BFGS iterations
    from hdlora import activations, resources
    from hdlora.data import Effective, draw_teacher, effective_finetune_dataset
    from hdlora.simulate.finetune import finetune_value_and_grad
    from hdlora.simulate.optim import minimise
    p = Params(**cfg["params"]); s = p.sizes(cfg["dim"]); T, D = p.tokens, s["D"]
    est = resources.simulate_estimate(p, D, device=cfg["device"], effective=True, restarts=0,
                                      token_storage=cfg["storage"])
    storage = est.choices["token_storage"]
    out.update({"N_ft": s["N_ft"], "token_values": s["N_ft"] * T * D, "token_storage": storage,
                "estimate_GiB": est.bytes / 2**30, "estimate_parts": est.parts})
    eff = Effective(**cfg["effective"])
    teacher = draw_teacher(D, 0, 0, cfg["device"])
    ft = effective_finetune_dataset(s["N_ft"], T, p.noise, eff, teacher, 0, cfg["device"], storage=storage)
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()
    out["data_seconds"] = time.perf_counter() - t0
    out["peak_rss_GiB_after_data"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out), file=sys.stderr, flush=True)    # partial record, kept if the case times out
    from hdlora.data import token_chunk
    vg = finetune_value_and_grad(ft, activations.get(p.activation), p.lam_ft, "sequence", token_chunk(T, D))
    vg(teacher.w_star)   # warm-up evaluation (not timed)
    t1 = time.perf_counter()
    res = minimise(vg, 0.5 * teacher.w_star, rtol=1e-14, max_iter=cfg["iters"])
    if cfg["device"].startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t1
    out.update({"lbfgs_iterations": res.iterations, "evaluations": res.evaluations, "lbfgs_seconds": dt,
                "seconds_per_iteration": dt / max(1, res.iterations),
                "seconds_per_evaluation": dt / max(1, res.evaluations), "objective": res.objective})
else:  # memory check: data set + one loss/gradient evaluation
    from hdlora import activations
    from hdlora.data import draw_teacher, pretrain_dataset, generator
    from hdlora.simulate.pretrain import pretrain_value_and_grad, default_chunk
    p = Params(**cfg["params"]); s = p.sizes(cfg["dim"])
    teacher = draw_teacher(s["D"], s["P0"], 0)
    data = pretrain_dataset(s["N"], p.tokens, p.noise, teacher, 0)
    out["data_seconds"] = time.perf_counter() - t0
    out["N"] = s["N"]
    out["data_GiB"] = sum(t.numel() * t.element_size() for t in (data.X, data.xi, data.z_star, data.G)) / 2**30
    W = torch.randn(s["D"], s["P"], generator=generator(0, "pretrain_init"), dtype=torch.float64)
    t1 = time.perf_counter()
    f, g = pretrain_value_and_grad(data, activations.get(p.activation), p.lam, "sequence",
                                   default_chunk(p.tokens, s["P"]))(W)
    out["loss_grad_seconds"] = time.perf_counter() - t1
    out["objective"] = f
out["wall_seconds"] = time.perf_counter() - t0
out["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
if cfg["device"].startswith("cuda"):
    out["peak_cuda_GiB"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(out))
"""

FIG1 = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
FIG3 = dict(alpha=0.2, alpha_ft=3, tokens=2, kappa0=0.5, kappa=1, noise=0.5, lam=0.3, lam_ft=0.5, reuse=True)
#: Fig. 2 effective pre-training at its largest alpha' (alpha' = 10, T = 3, softmax, Delta = 0, kappa0 = 0.5).
FIG2_EFF = dict(alpha=0.1, alpha_ft=10.0, tokens=3, kappa0=0.5, kappa=1, noise=0.0, lam=0.1, lam_ft=0.5)
FIG2_LAW = {"Q0": 1.5, "Q": 1.5, "M": 1.0}  # Q = Q0 = 1 + kappa0, M = 1 (Fig. 2's law)


def _case(cfg: dict) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=cfg.get("timeout")
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        partial = [ln for ln in err.splitlines() if ln.startswith("{")]
        rec = json.loads(partial[-1]) if partial else {"case": cfg["case"], "dim": cfg["dim"]}
        rec["timed_out_after_s"] = cfg.get("timeout")
        return rec
    if proc.returncode != 0:
        return {"case": cfg["case"], "dim": cfg["dim"], "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="*", default=[100, 150, 300], help="Fig. 1 pipeline dims (none: skip)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch default). Default 1: on the shared 2-core machine 2 threads "
        "were 6x slower (OpenMP oversubscription in L-BFGS's many small vector ops)",
    )
    ap.add_argument("--memory-check", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    ap.add_argument(
        "--storage-dim",
        type=int,
        default=0,
        help="effective mode, alpha' = 10: time per L-BFGS iteration with the tokens kept as float64, "
        "float32 and regenerated, at this D (e.g. 1500); 0: skip",
    )
    ap.add_argument(
        "--effective-dim",
        type=int,
        default=0,
        help="effective mode, alpha' = 10, T = 3 at this D (the paper's 10000) with the automatic token "
        "storage: peak memory and seconds per L-BFGS iteration on CPU (and CUDA when present); 0: skip",
    )
    ap.add_argument("--iters", type=int, default=3, help="L-BFGS iterations timed in the effective cases")
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per effective case; on timeout the partial record (data set built, peak RSS) is kept",
    )
    args = ap.parse_args(argv)
    import torch

    results = []
    eff = dict(
        mode="effective",
        params=FIG2_EFF,
        effective=FIG2_LAW,
        iters=args.iters,
        threads=args.threads,
        timeout=args.timeout,
    )
    if args.storage_dim:
        for storage in ("float64", "float32", "regenerate"):
            results.append(
                _case(dict(eff, case="effective_storage", dim=args.storage_dim, device="cpu", storage=storage))
            )
            print(json.dumps(results[-1]), file=sys.stderr)
    if args.effective_dim:
        results.append(_case(dict(eff, case="effective_fig2", dim=args.effective_dim, device="cpu", storage="auto")))
        print(json.dumps(results[-1]), file=sys.stderr)
        if torch.cuda.is_available() and not args.skip_gpu:
            results.append(
                _case(dict(eff, case="effective_fig2", dim=args.effective_dim, device="cuda", storage="auto"))
            )
        else:
            results.append(
                {
                    "case": "effective_fig2",
                    "dim": args.effective_dim,
                    "device": "cuda",
                    "skipped": "--skip-gpu" if args.skip_gpu else "CUDA not available on this machine",
                }
            )
    for D in args.dims:
        results.append(
            _case(dict(case="fig1", mode="pipeline", dim=D, device="cpu", params=FIG1, threads=args.threads))
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.skip_gpu or not args.dims:
        results.append({"case": "fig3", "dim": 1000, "skipped": "--skip-gpu" if args.skip_gpu else "no --dims"})
    elif torch.cuda.is_available():
        results.append(
            _case(dict(case="fig3", mode="pipeline", dim=1000, device="cuda", params=FIG3, threads=args.threads))
        )
    else:
        results.append({"case": "fig3", "dim": 1000, "skipped": "CUDA not available on this machine"})
    if args.memory_check:
        results.append(
            _case(
                dict(
                    case="memory_check",
                    mode="memory",
                    dim=1000,
                    device="cpu",
                    params=dict(FIG3, reuse=False),
                    threads=args.threads,
                )
            )
        )
    print(json.dumps({"benchmark": "simulate", "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
