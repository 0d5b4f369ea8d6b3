"""Every GPU check of the simulator in one script (under 8 minutes on an H200); prints and writes JSON.

Checks, each in its own subprocess (own CUDA context, peak memory, time limit):

1. ``fig3_d1000``: the Fig. 3 full pipeline (T = 2, kappa0 = 0.5, kappa = 1, Delta = 0.5, alpha = 0.2,
   alpha' = 3, e = 1, lam = 0.3, lam' = 0.5, softmax) at D = 1000, one seed, float64, against the
   60 s target (``within_target``);
2. ``effective_d10000_float64``: a D = 10^4 effective fine-tuning point (Fig. 2 setting: alpha' = 10,
   T = 3, kappa0 = 0.5, Delta = 0, lam' = 0.5, law Q = Q0 = 1.5, M = 1): 3e9 token values, one
   seed, the informed start only (restarts = 0), with its test sets of 10 D sequences;
3. ``effective_d10000_float32`` and ``effective_d10000_tf32``: the same point computed in float32
   (``hdlora.data.DTYPE`` switched; every draw is made in float64 and rounded, so the draws are
   the same as in check 2), without and with TF32 matrix products; the JSON gives the difference
   of E' (finetune_test_error) and of o_w (overlap) to float64, next to the Monte-Carlo scale
   (the difference between two seeds is not measured here: see the standard errors of the
   simulate benchmarks).

Where no GPU is present it says so on stdout and exits 0 (nothing written).

Output: the JSON is printed and written to ``$OUT/bench_gpu.json`` when ``$OUT`` is set, else to
``--output`` (default docs/benchmarks/bench_gpu.json).

Usage: python benchmarks/bench_gpu.py [--budget-s 460] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
cfg = json.loads(sys.argv[1])
import torch
torch.backends.cuda.matmul.allow_tf32 = bool(cfg.get("tf32"))
torch.backends.cudnn.allow_tf32 = bool(cfg.get("tf32"))
if cfg["dtype"] == "float32":
    import hdlora.data, hdlora.simulate.active, hdlora.simulate.metrics
    for mod in (hdlora.data, hdlora.simulate.active, hdlora.simulate.metrics):
        mod.DTYPE = torch.float32
    _randn = torch.randn
    def randn(*size, dtype=None, **kw):   # same draws as float64, rounded
        if dtype == torch.float32:
            return _randn(*size, dtype=torch.float64, **kw).to(torch.float32)
        return _randn(*size, dtype=dtype, **kw)
    torch.randn = randn
from hdlora import Params
from hdlora.simulate import run_seed
dev = cfg.get("device", "cuda")
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
torch.zeros(1, device=dev)
sync()
t0 = time.perf_counter()
kw = {"token_storage": "float64"} if cfg["dtype"] == "float32" else {}
r = run_seed(Params(**cfg["params"]), cfg["dim"], 0, device=dev, effective=cfg.get("effective"),
             restarts=cfg.get("restarts", 2), **kw)
sync()
wall = time.perf_counter() - t0
keep = ("finetune_test_error", "overlap", "forgetting_error", "pretrain_test_error", "finetune_train_error",
        "pretrain_iterations", "pretrain_converged", "finetune_iterations", "finetune_converged", "finetune_grad_norm",
        "finetune_winner", "Q", "M", "q", "m", "token_storage")
out = {k: (None if isinstance(r.get(k), float) and r[k] != r[k] else r.get(k)) for k in keep}   # NaN -> null
out.update({"wall_seconds": wall, "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "dtype": cfg["dtype"], "tf32": bool(cfg.get("tf32")), "device": dev})
if dev == "cuda":
    out.update({"peak_cuda_GiB": torch.cuda.max_memory_allocated() / 2**30, "gpu": torch.cuda.get_device_name(0)})
print(json.dumps(out, default=str))
"""

FIG3 = dict(alpha=0.2, alpha_ft=3.0, tokens=2, kappa0=0.5, kappa=1.0, noise=0.5, lam=0.3, lam_ft=0.5, reuse=True)
FIG2_EFF = dict(alpha=0.1, alpha_ft=10.0, tokens=3, kappa0=0.5, kappa=1.0, noise=0.0, lam=0.1, lam_ft=0.5)
FIG2_LAW = {"Q0": 1.5, "Q": 1.5, "M": 1.0}
TARGET_FIG3_S = 60.0

CASES = [
    ("fig3_d1000", dict(params=FIG3, dim=1000, dtype="float64"), 150),
    (
        "effective_d10000_float64",
        dict(params=FIG2_EFF, dim=10_000, dtype="float64", effective=FIG2_LAW, restarts=0),
        110,
    ),
    (
        "effective_d10000_float32",
        dict(params=FIG2_EFF, dim=10_000, dtype="float32", effective=FIG2_LAW, restarts=0),
        80,
    ),
    (
        "effective_d10000_tf32",
        dict(params=FIG2_EFF, dim=10_000, dtype="float32", tf32=True, effective=FIG2_LAW, restarts=0),
        80,
    ),
]


def run_case(name: str, cfg: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"case": name, "error": f"timed out after {timeout:g} s", "seconds": time.perf_counter() - t0}
    if p.returncode != 0:
        return {
            "case": name,
            "error": (p.stderr.strip().splitlines() or ["?"])[-1],
            "returncode": p.returncode,
            "stderr_tail": p.stderr[-2000:],
            "seconds": time.perf_counter() - t0,
        }
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    rec["case"] = name
    rec["process_seconds"] = time.perf_counter() - t0
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=460.0, help="stop starting new checks after this many seconds")
    ap.add_argument("--output", default=os.path.join("docs", "benchmarks", "bench_gpu.json"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no GPU present (torch.cuda.is_available() is False); nothing to run")
        return 0
    t_start = time.perf_counter()
    results = []
    for name, cfg, timeout in CASES:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            results.append({"case": name, "skipped": f"time budget of {args.budget_s:g} s spent"})
            continue
        rec = run_case(name, cfg, min(timeout, left))
        results.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
    by = {r["case"]: r for r in results}
    summary: dict = {}
    f3 = by.get("fig3_d1000", {})
    if "wall_seconds" in f3:
        summary["fig3_d1000_seconds"] = f3["wall_seconds"]
        summary["fig3_within_60s_target"] = f3["wall_seconds"] <= TARGET_FIG3_S
    ref = by.get("effective_d10000_float64", {})
    for variant in ("effective_d10000_float32", "effective_d10000_tf32"):
        v = by.get(variant, {})
        if "finetune_test_error" in ref and "finetune_test_error" in v:
            summary[variant] = {
                "delta_finetune_test_error": v["finetune_test_error"] - ref["finetune_test_error"],
                "delta_overlap": v["overlap"] - ref["overlap"],
                "speedup_vs_float64": ref["wall_seconds"] / v["wall_seconds"],
            }
    doc = {
        "benchmark": "gpu",
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "total_seconds": time.perf_counter() - t_start,
        "summary": summary,
        "results": results,
    }
    text = json.dumps(doc, indent=2, default=str)
    print(text)
    path = os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT") else args.output
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
