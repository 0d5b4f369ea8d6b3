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

Usage: python benchmarks/bench_simulate.py [--dims 100 150 300] [--threads N] [--memory-check] [--skip-gpu]
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


def _case(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": cfg["case"], "dim": cfg["dim"], "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="*", default=[100, 150, 300])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch default). Default 1: on the shared 2-core machine 2 threads "
                         "were 6x slower (OpenMP oversubscription in L-BFGS's many small vector ops)")
    ap.add_argument("--memory-check", action="store_true")
    ap.add_argument("--skip-gpu", action="store_true")
    args = ap.parse_args(argv)
    import torch
    results = []
    for D in args.dims:
        results.append(_case(dict(case="fig1", mode="pipeline", dim=D, device="cpu", params=FIG1,
                                   threads=args.threads)))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.skip_gpu:
        results.append({"case": "fig3", "dim": 1000, "skipped": "--skip-gpu"})
    elif torch.cuda.is_available():
        results.append(_case(dict(case="fig3", mode="pipeline", dim=1000, device="cuda", params=FIG3,
                                  threads=args.threads)))
    else:
        results.append({"case": "fig3", "dim": 1000, "skipped": "CUDA not available on this machine"})
    if args.memory_check:
        results.append(_case(dict(case="memory_check", mode="memory", dim=1000, device="cpu",
                                  params=dict(FIG3, reuse=False), threads=args.threads)))
    print(json.dumps({"benchmark": "simulate", "torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
