"""Size and time of a run, estimated before anything is allocated, and checked against the memory available.

Pure functions of the parameters (no torch import at module level): a run is refused with one
line (:class:`ResourceError`, a :class:`hdlora.params.ParamError`, so the CLI exits with
status 2) when its estimate exceeds what the machine can give, and ``--dry-run`` prints the
estimate and stops.

Memory available (:func:`available_memory`): the minimum of ``MemAvailable`` of
``/proc/meminfo``, the cgroup limit minus its usage (cgroup v2 ``memory.max`` /
``memory.current``, or v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``, walking up
the process's cgroup path) and ``HDLORA_MEMORY_LIMIT`` (bytes, or with a unit: ``8GiB``,
``500MB``) when set; on ``--device cuda`` the free GPU memory (``torch.cuda.mem_get_info``).

The estimates (:func:`simulate_estimate`, :func:`theory_estimate`, :func:`task_estimate`) count
the arrays a run holds at its peak, beyond the interpreter and its imported modules:

* simulation (per seed; seeds run one after the other): the teacher, the pre-training set
  (N x T x D tokens plus N x T x T fields), the L-BFGS state (``history_size`` = 50 pairs of
  vectors of the size of W), the fine-tuning set (N' x T x D tokens unless reused, as float64,
  float32 or regenerated, see :data:`hdlora.data.TOKEN_STORAGE`), the chunk temporaries and the
  streamed test set; at LoRA rank r (teacher rank r*) the fine-tuning weights are D x r, their
  L-BFGS state 2 x 50 vectors of D r numbers, the starts D r each, the token passes T x r;
* state evolution: O(n_mc T^2) Monte-Carlo samples (with the active pool n_mc / rho).

The byte counts are a model of the code, checked by tests that run small cases in a
subprocess (peak RSS within 1.2 x estimate + the interpreter's base); the times are rough
(flop counts at a calibrated rate, with the usual number of L-BFGS iterations) and are given
to order of magnitude only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .params import ParamError, Params

F64 = 8
F32 = 4
#: Bytes of one saved CPU torch generator state (mt19937: 5056 bytes).
GENERATOR_STATE = 5056
#: L-BFGS history pairs (hdlora.simulate.optim.minimise).
HISTORY = 50
#: Numbers per token chunk (hdlora.data.TOKEN_CHUNK_NUMBERS) and per pre-training chunk.
CHUNK_NUMBERS = 1 << 24
#: Rough rates for the expected time, one unloaded CPU thread (a busy shared machine is several
#: times slower; a GPU ~30x faster): dense float64 matrix products (pre-training, test fields),
#: float64 token passes of the rank-one fine-tuning (memory bound), normal draws.
CPU_FLOPS = 2.0e10
TOKEN_PASS_PER_S = 2.0e8
RNG_PER_S = 5.0e7
GPU_SPEEDUP = 30.0
#: Cost of a float32 token pass relative to float64 (cast per chunk), measured in one run of
#: benchmarks/bench_simulate.py --storage-dim 1500 (docs/benchmarks/bench_simulate_effective.json):
#: 4.84 s vs 2.11 s per evaluation; regenerating was 16.1 s (7.6x).
FLOAT32_PASS_COST = 2.3
#: Usual L-BFGS evaluations (pre-training; each fine-tuning start).
PRETRAIN_EVALS = 100
FINETUNE_EVALS = 50
#: Resident memory torch adds on its first computations (kernels, autograd engine, thread pools,
#: allocator caches) beyond importing it: measured 138 MiB on a D = 10 simulation (peak RSS of a
#: subprocess minus that of one importing the same modules).
TORCH_RUNTIME = 140 * 2**20
#: Fraction of the available memory a run may plan to use (the rest: allocator slack, other processes).
USABLE_FRACTION = 0.85


class ResourceError(ParamError):
    """A run that would not fit the memory available (one line: estimate, limit, time, way out)."""


# --------------------------------------------------------------------------- units
def fmt_bytes(n: float) -> str:
    """``1.5 GiB``-style text."""
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "forever"
    if s < 90:
        return f"{s:.2g} s"
    if s < 5400:
        return f"{s / 60:.2g} min"
    if s < 2 * 86400:
        return f"{s / 3600:.2g} h"
    if s < 3 * 365 * 86400:
        return f"{s / 86400:.3g} days"
    return f"{s / (365 * 86400):.3g} years"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``'8GiB'``, ``'500 MB'``, ``'1e9'`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ParamError(f"HDLORA_MEMORY_LIMIT must be a size such as 8GiB or 500MB, got {text!r}")
    try:
        v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    except ValueError:
        raise ParamError(f"HDLORA_MEMORY_LIMIT must be a size such as 8GiB or 500MB, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ParamError(f"HDLORA_MEMORY_LIMIT must be a positive size, got {text!r}")
    return int(v)


def parse_count(text: str) -> int:
    """A sample count from the command line: an integer, also written as 1e9 or 3e4 (argparse type)."""
    import argparse

    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer count such as 30000 or 3e4, got {text!r}") from None
    if not math.isfinite(v) or v != int(v):
        raise argparse.ArgumentTypeError(f"expected an integer count such as 30000 or 3e4, got {text!r}")
    return int(v)


# --------------------------------------------------------------------------- memory available
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None when unreadable)."""
    text = _read(path)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * (1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1)
    return None


def _as_limit(text: str | None) -> int | None:
    if text is None or text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return v if 0 < v < 2**60 else None  # v1 "unlimited" is a huge number


def cgroup_headroom(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> tuple[int, str] | None:
    """Smallest ``limit - usage`` over the process's memory cgroup and its ancestors (v2 or v1).

    Returns ``(bytes, description)``, or None when no limit is set or readable.
    """
    text = _read(proc_cgroup) or ""
    v2_path, v1_path = None, None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    candidates: list[tuple[str, str, str]] = []  # (dir, limit file, usage file)

    def walk(base: str, path: str | None, limit: str, usage: str) -> None:
        rel = (path or "/").strip("/")
        while True:
            d = os.path.join(base, rel) if rel else base
            candidates.append((d, limit, usage))
            if not rel:
                break
            rel = os.path.dirname(rel)

    if os.path.exists(os.path.join(root, "memory.max")) or v2_path is not None:
        walk(root, v2_path, "memory.max", "memory.current")
    v1 = os.path.join(root, "memory")
    if os.path.isdir(v1):
        walk(v1, v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes")
    best: tuple[int, str] | None = None
    for d, lim_name, use_name in candidates:
        limit = _as_limit(_read(os.path.join(d, lim_name)))
        if limit is None:
            continue
        usage = _as_limit(_read(os.path.join(d, use_name))) or 0
        room = max(0, limit - usage)
        if best is None or room < best[0]:
            best = (room, f"cgroup {lim_name} {fmt_bytes(limit)} - usage {fmt_bytes(usage)}")
    return best


def available_memory(
    *,
    meminfo: str = "/proc/meminfo",
    cgroup_root: str = "/sys/fs/cgroup",
    proc_cgroup: str = "/proc/self/cgroup",
    env: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Memory this process may still allocate: ``(bytes, where the number comes from)``.

    The minimum of MemAvailable, the cgroup headroom (v1 or v2) and ``HDLORA_MEMORY_LIMIT``.
    """
    env = os.environ if env is None else env
    options: list[tuple[int, str]] = []
    m = meminfo_available(meminfo)
    if m is not None:
        options.append((m, "MemAvailable"))
    c = cgroup_headroom(cgroup_root, proc_cgroup)
    if c is not None:
        options.append(c)
    if env.get("HDLORA_MEMORY_LIMIT"):
        options.append((parse_bytes(env["HDLORA_MEMORY_LIMIT"]), "HDLORA_MEMORY_LIMIT"))
    if not options:
        return 2**62, "unknown (no /proc/meminfo, no cgroup limit)"
    return min(options)


def gpu_memory(device: str = "cuda") -> tuple[int, str] | None:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device if ":" in str(device) else "cuda"))
    return int(free), f"free GPU memory of {device}"


# --------------------------------------------------------------------------- estimates
@dataclass(frozen=True)
class Estimate:
    """Peak bytes of a run beyond the interpreter (``parts`` sum to ``bytes``), where they live
    (``device``), a rough expected time, and the choices made (e.g. the token storage)."""

    what: str
    parts: dict
    device: str = "cpu"
    seconds: float = 0.0
    choices: dict = field(default_factory=dict)
    host_bytes: int = 0  # bytes on the host when the run itself lives on a GPU

    @property
    def bytes(self) -> int:
        return int(sum(self.parts.values()))

    def biggest(self, k: int = 2) -> str:
        items = sorted(self.parts.items(), key=lambda kv: -kv[1])[:k]
        return ", ".join(f"{name} {fmt_bytes(v)}" for name, v in items if v > 0)

    def to_dict(self) -> dict:
        return {
            "what": self.what,
            "bytes": self.bytes,
            "memory": fmt_bytes(self.bytes),
            "device": self.device,
            "parts": {k: int(v) for k, v in self.parts.items()},
            "seconds": self.seconds,
            "time": fmt_seconds(self.seconds),
            **({"choices": dict(self.choices)} if self.choices else {}),
        }


def _is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def token_chunk(T: int, D: int, cap: int = 1 << 16) -> int:
    """Same as :func:`hdlora.data.token_chunk` (kept here so this module needs no torch)."""
    c = min(cap, CHUNK_NUMBERS // max(1, T * D))
    return max(16, c - c % 16)


def token_bytes(n: int, T: int, D: int, storage: str) -> int:
    """Bytes kept for n x T x D tokens in ``storage``."""
    if storage == "float64":
        return F64 * n * T * D
    if storage == "float32":
        return F32 * n * T * D
    return GENERATOR_STATE * math.ceil(n / token_chunk(T, D))


def choose_token_storage(
    n: int, T: int, D: int, device: Any = "cpu", requested: str = "auto", available: int | None = None
) -> str:
    """The token storage of an effective-mode fine-tuning set: ``requested`` unless 'auto'; then
    float64 when it takes at most half of the memory available, else float32 when it takes at
    most 70 %, else regenerate. Measured at D = 1500, alpha' = 10 in one run (one thread, busy
    machine): 2.1 s (float64), 4.8 s (float32) and 16.1 s (regenerate) per loss/gradient
    evaluation, so the order is float64, float32, regenerate."""
    from .data import TOKEN_STORAGE

    if requested != "auto":
        if requested not in TOKEN_STORAGE:
            raise ParamError(f"token_storage must be 'auto' or one of {TOKEN_STORAGE}, got {requested!r}")
        return requested
    if available is None:
        got = gpu_memory(str(device)) if _is_cuda(device) else None
        available = (got or available_memory())[0]
    if token_bytes(n, T, D, "float64") <= 0.5 * available:
        return "float64"
    if token_bytes(n, T, D, "float32") <= 0.7 * available:
        return "float32"
    return "regenerate"


def simulate_estimate(
    params: Params,
    dim: int,
    *,
    seeds: int = 1,
    device: str = "cpu",
    effective: bool = False,
    restarts: int = 2,
    reduce_width: bool = False,
    n_test: int | None = None,
    token_storage: str = "auto",
    available: int | None = None,
    informed_start: bool = True,
) -> Estimate:
    """Peak memory and rough time of :func:`hdlora.simulate.run` (one seed at a time; time x seeds).

    ``effective``: the effective-pre-training mode (no pre-training set; tokens of the N'
    fine-tuning sequences kept as ``token_storage``, 'auto' choosing as the run will).
    """
    s = params.sizes(dim)
    T, D, T2 = params.tokens, s["D"], params.tokens**2
    n_seeds = max(1, int(seeds)) if isinstance(seeds, int) else max(1, len(list(seeds)))
    N, Nf = s["N"], s["N_ft"]
    P0 = 0 if effective else s["P0"]
    width = s["P"]
    lam = params.lam
    if reduce_width and width > D:
        width = D
    pretrained = not effective and not math.isinf(lam)
    n_test = 10 * D if n_test is None else int(n_test)
    r, r_star = params.lora_rank, params.teacher_rank
    parts: dict[str, float] = {
        "torch runtime": 0 if _is_cuda(device) else TORCH_RUNTIME,
        "teacher": F64 * (D * P0 + D * r_star),
    }
    choices: dict[str, Any] = {}
    flops = 0.0
    rng = 0.0
    ft_evals = FINETUNE_EVALS * (int(restarts) + (1 if informed_start else 0)) * (0 if math.isinf(params.lam_ft) else 1)
    pool = params.active_pool is not None
    Npool = s.get("N_pool", Nf)
    sets = 2 if pool else 1  # active: the selected and the uniform set are fine-tuned
    storage = "float64"
    if effective:
        width = 0  # no pre-trained weights: z is drawn from Q
    if not effective:
        pre_data = F64 * (N * T * D + 4 * N * T2)
        c = min(N, max(1, CHUNK_NUMBERS // (T * max(width, 1))))
        pre_work = F64 * 6 * c * T * width if pretrained else F64 * min(N, token_chunk(T, D)) * T2 * 4
        lbfgs = F64 * (2 * HISTORY + 6) * D * width if pretrained else 0
        weights = F64 * D * width if pretrained else 0
        if pool:
            cpool = max(64, (1 << 22) // (T * max(D, width)))
            ft_data = F64 * (3 * Nf * T * D + 12 * Nf * T2) + F64 * 3 * cpool * T * D
        elif params.reuse:
            ft_data = F64 * 6 * Nf * T2
        else:
            ft_data = F64 * (Nf * T * D + 8 * Nf * T2)
        parts.update(
            {
                "pre-training set": pre_data,
                "pre-training chunks": pre_work,
                "L-BFGS state": lbfgs,
                "weights": weights,
                "fine-tuning set": ft_data,
            }
        )
        if pretrained:
            flops += PRETRAIN_EVALS * 4.0 * N * T * D * width
        flops += 2.0 * N * T * D * (P0 + 1)  # targets and Gram matrices
        if pool:
            flops += 2.0 * Npool * T * D * (width + 1)
            rng += Npool * T * D
    else:
        storage = token_storage
        if storage == "auto":
            room = available
            if room is None:
                got = gpu_memory(device) if _is_cuda(device) else None
                room = (got or available_memory())[0]
            storage = choose_token_storage(Nf, T, D, device, "auto", available=room)
        choices["token_storage"] = storage
        fields = F64 * 10 * Nf * T2 * sets
        parts.update({"fine-tuning tokens": token_bytes(Nf, T, D, storage), "fine-tuning fields": fields})
        if pool:
            parts["pool fields"] = F64 * 8 * min(Npool, 1 << 16) * T2 + F64 * 6 * Nf * T2
            rng += 2 * Npool * T2
    cf = token_chunk(T, D)
    parts["fine-tuning chunks"] = (
        F64 * (3 * min(Nf, cf) * T * D + 12 * min(Nf, cf) * T2) if storage != "float64" else F64 * 12 * min(Nf, cf) * T2
    )
    # the LoRA w (D x r): L-BFGS history and work vectors, and the starts held at once
    parts["fine-tuning L-BFGS state"] = F64 * (2 * HISTORY + 8) * D * r
    parts["LoRA starts"] = F64 * D * r * (int(restarts) + (1 if informed_start else 0))
    if r + r_star > 2:  # chi (T x r) and chi* (T x r*) of a chunk, with their gradients
        parts["fine-tuning chunks"] += F64 * 3 * min(Nf, cf) * T * (r + r_star)
    sub = token_chunk(T, max(D, width))
    parts["test chunks"] = F64 * (min(n_test, sub) * T * (D + 2 * width) + 16 * min(4096, n_test) * T2)
    # time: token passes of the fine-tuning evaluations (+ redraws), dense products, draws
    passes = ft_evals * sets * Nf * T * D
    if r > 1:  # X w (T x D times D x r) forward and backward: dense products beyond the token pass
        flops += ft_evals * sets * 4.0 * Nf * T * D * r
    token_s = passes / TOKEN_PASS_PER_S * (FLOAT32_PASS_COST if storage == "float32" else 1.0)
    if storage == "regenerate":
        rng += passes
    flops += 2 * n_test * 2.0 * T * D * (P0 + width + 2 + r + r_star) * sets
    rng += 2 * n_test * T * D + (N + Nf) * T * D
    speed = GPU_SPEEDUP if _is_cuda(device) else 1.0
    seconds = n_seeds * (flops / CPU_FLOPS + token_s + rng / RNG_PER_S) / speed
    mode = "effective" if effective else "full"
    what = f"simulate D = {D}, T = {T}, N = {N if not effective else 0}, N' = {Nf} ({mode}, {n_seeds} seed(s))"
    return Estimate(what, {k: int(v) for k, v in parts.items()}, str(device), seconds, choices)


#: Numbers per Monte-Carlo sample the state evolutions hold at their peak: a T^2 + b T^3 (softmax:
#: its T x T x T Jacobians) and a T^2 (linear). Calibrated on this code (peak RSS above the
#: interpreter's base, measured with os.wait4 on a subprocess): softmax 61 x T^2 at T = 3 (n_mc = 2e5)
#: and 78 x T^2 at T = 5 (n_mc = 5e4); linear 22 x T^2 at T = 3 and 19 x T^2 at T = 5 (n_mc = 1e5).
THEORY_SOFTMAX_T2, THEORY_SOFTMAX_T3 = 40, 10
#: the compiled prox kernel's runtime (Numba + LLVM + the cached kernel, hdlora.theory.newton):
#: VmHWM grew by 162 MiB when newton.warmup() ran in a process that had imported the theory CLI
NUMBA_RUNTIME_BYTES = 170 * 2**20
THEORY_LINEAR_T2 = 25
#: (T r)^2 arrays per sample the rank-r prox holds at once: the kernel's Hessians, the kept ones, Hess f, its
#: eigenvalues' copy, and the replicon's C and Gamma (hdlora.theory.prox_rank_r, finetune_rank_r.replicon_map)
THEORY_RANK_R_K2 = 6
THEORY_SECONDS_PER_SAMPLE_ENTRY = 2.0e-7  # per fixed-point iteration, softmax
THEORY_ITERATIONS = 60


def theory_estimate(
    params: Params, n_mc: int, *, bayes_optimal: bool = False, solves: int = 1, what: str = "theory"
) -> Estimate:
    """Peak memory and rough time of the state evolution (Results 3-5): O(n_mc T^2) samples.

    With ``params.active_pool`` (Algorithm 1) the pool holds n_mc / rho candidates.
    ``solves``: number of state-evolution solves (``hdlora optimize``: its budget).
    """
    if isinstance(n_mc, bool) or not isinstance(n_mc, int) or n_mc < 1:
        raise ParamError(f"n_mc must be an integer >= 1, got {n_mc!r}")
    T = params.tokens
    T2 = T * T
    n = n_mc
    if params.active_pool is not None:
        rho = params.alpha_ft / params.active_pool if params.active_pool > 0 else 1.0
        n = n_mc + int(math.ceil(n_mc / max(rho, 1e-12)))
    linear = params.activation == "linear"
    per_sample = THEORY_LINEAR_T2 * T2 if linear else THEORY_SOFTMAX_T2 * T2 + THEORY_SOFTMAX_T3 * T2 * T
    parts = {"Monte-Carlo samples": F64 * per_sample * n}
    if not linear:
        parts["compiled prox kernel (Numba runtime)"] = NUMBA_RUNTIME_BYTES
    if bayes_optimal:
        parts["Bayes-optimal samples"] = F64 * per_sample * 20000
    per_iter = n * T2 * THEORY_SECONDS_PER_SAMPLE_ENTRY * (0.1 if linear else 1.0)
    seconds = solves * THEORY_ITERATIONS * per_iter
    if not params.rank_one:  # the rank-r prox (hdlora.theory.prox_rank_r): k = T r unknowns per sample
        r = params.lora_rank
        k = T * r
        n_starts = (2**r - 1) + (2 if not linear else 1) * 2**r + 2 + (T if not linear else 0) + 2
        parts["rank-r prox (Hessians (T r)^2, search starts)"] = (
            F64 * n_mc * (THEORY_RANK_R_K2 * k * k + (n_starts + 10) * k)
        )
        parts.setdefault("compiled prox kernel (Numba runtime)", NUMBA_RUNTIME_BYTES)
        n_branches = min(r, params.teacher_rank) + 1  # hdlora.theory.solve_rank_r.branch_starts
        seconds *= n_branches * r * r * (10.0 if linear else 1.0)
    return Estimate(f"{what} n_mc = {n_mc}, T = {T}", parts, "cpu", seconds)


def task_estimate(kind: str, params: Params, options: Mapping[str, Any]) -> Estimate | None:
    """Estimate of one sweep task (by the options it carries); None for a kind it cannot judge."""
    opts = dict(options)
    try:
        if "dim" in opts:
            eff = "effective" in kind
            seeds = opts.get("seeds", 4)
            return simulate_estimate(
                params,
                int(opts["dim"]),
                seeds=seeds if isinstance(seeds, int) else len(seeds),
                device=str(opts.get("device", "cpu")),
                effective=eff,
                restarts=int(opts.get("restarts", 2)),
                reduce_width=bool(opts.get("reduce_width", False)),
                n_test=opts.get("n_test"),
                token_storage=str(opts.get("token_storage", "auto")),
            )
        if kind == "bayes_optimal":
            return theory_estimate(params, int(opts.get("n_mc_error", 20000)), what="bayes_optimal")
        if "n_mc" in opts or kind == "theory" or "theory" in kind:
            n_mc = int(opts.get("n_mc", 30000))
            est = theory_estimate(params, n_mc, what=kind)
            if "active" in kind:  # active vs uniform: two solves and the pool
                est = Estimate(est.what, est.parts, est.device, 2 * est.seconds)
            return est
    except (ParamError, TypeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- check
def limit_for(est: Estimate) -> tuple[int, str]:
    """Memory the estimate must fit: free GPU memory for a CUDA run (when CUDA is there), else the host's."""
    if _is_cuda(est.device):
        got = gpu_memory(est.device)
        if got is not None:
            return got
    return available_memory()


def fits(est: Estimate, limit: int | None = None) -> bool:
    limit = limit_for(est)[0] if limit is None else limit
    return est.bytes <= USABLE_FRACTION * limit


def refuse_message(est: Estimate, limit: int, source: str, way_out: str) -> str:
    return (
        f"{est.what} needs about {fmt_bytes(est.bytes)} ({est.biggest()}) but only {fmt_bytes(limit)} "
        f"is available ({source}; a run may plan {USABLE_FRACTION:.0%} of it); expected time ~{fmt_seconds(est.seconds)}; "
        f"way out: {way_out}"
    )


def largest_fitting(make, lo: int, hi: int, limit: int) -> int | None:
    """Largest integer x in [lo, hi] with ``make(x).bytes <= USABLE_FRACTION * limit`` (bisection; the
    estimate grows with x), or None when even ``lo`` does not fit."""

    def ok(x):
        try:
            return make(x).bytes <= USABLE_FRACTION * limit
        except ParamError:
            return False

    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def simulate_way_out(params: Params, dim: int, limit: int, device: str, **kw) -> str:
    hints = []
    if not _is_cuda(device):
        hints.append("--device cuda (on a GPU with enough memory)")
    dmax = largest_fitting(lambda d: simulate_estimate(params, d, device=device, **kw), 2, max(2, dim - 1), limit)
    if dmax is not None:
        hints.append(f"a smaller --dim (<= {dmax} fits)")
    hints.append("fewer samples (smaller --alpha / --alpha-ft / --active-pool)")
    if params.kappa > 1 and not kw.get("reduce_width"):
        hints.append("--reduce-width (kappa > 1)")
    return ", ".join(hints)


def check_simulate(params: Params, dim: int, **kw) -> Estimate:
    """Estimate a simulation and raise :class:`ResourceError` (one line) when it does not fit."""
    est = simulate_estimate(params, dim, **kw)
    limit, source = limit_for(est)
    if not fits(est, limit):
        kw2 = {k: v for k, v in kw.items() if k not in ("device", "seeds", "available")}
        raise ResourceError(refuse_message(est, limit, source, simulate_way_out(params, dim, limit, est.device, **kw2)))
    return est


def check_theory(params: Params, n_mc: int, **kw) -> Estimate:
    """Estimate a state evolution and raise :class:`ResourceError` (one line) when it does not fit."""
    est = theory_estimate(params, n_mc, **kw)
    limit, source = limit_for(est)
    if not fits(est, limit):
        n_fit = largest_fitting(lambda n: theory_estimate(params, n, **kw), 100, max(100, n_mc - 1), limit)
        hints = [f"fewer samples (--n-mc <= {n_fit} fits)" if n_fit else "fewer tokens (--tokens)"]
        if n_fit:
            hints.append("fewer tokens (--tokens)")
        raise ResourceError(refuse_message(est, limit, source, ", ".join(hints)))
    return est


@dataclass(frozen=True)
class PlanEstimate:
    """Estimates of a list of tasks: the largest one (memory), the total time, and the tasks not judged."""

    n_tasks: int
    largest: Estimate | None
    seconds: float
    unknown: int

    def to_dict(self) -> dict:
        return {
            "tasks": self.n_tasks,
            "largest_task": self.largest.to_dict() if self.largest else None,
            "seconds": self.seconds,
            "time": fmt_seconds(self.seconds),
            "tasks_not_estimated": self.unknown,
        }


def plan_estimate(tasks) -> PlanEstimate:
    """``tasks``: objects with ``kind``, ``params``, ``options`` (:class:`hdlora.experiments.sweep.Task`)."""
    largest, seconds, unknown, n = None, 0.0, 0, 0
    for t in tasks:
        n += 1
        est = task_estimate(t.kind, t.params, t.options)
        if est is None:
            unknown += 1
            continue
        seconds += est.seconds
        if largest is None or est.bytes > largest.bytes:
            largest = est
    return PlanEstimate(n, largest, seconds, unknown)


# --------------------------------------------------------------------------- pool size
#: Seconds a local process pool costs before its first result (spawned workers import torch).
POOL_STARTUP_S = 7.0


def choose_serial(tasks, workers: int | None) -> tuple[bool, str]:
    """Run a sweep in this process instead of a pool? Only when ``workers`` was not given and the
    work is small: one task, or an estimated total under 3 x the pool start-up (7 s), every task
    estimated.  Returns ``(serial, one line saying what was chosen and why)``."""
    tasks = list(tasks)
    if workers is not None:
        return workers == 1, f"executor: {'serial' if workers == 1 else f'local pool of {workers}'} (--workers)"
    pe = plan_estimate(tasks)
    if pe.n_tasks <= 1:
        return True, f"executor: serial ({pe.n_tasks} task to run: a pool would only add its start-up)"
    if pe.unknown == 0 and pe.seconds < 3 * POOL_STARTUP_S:
        return True, (
            f"executor: serial ({pe.n_tasks} tasks, ~{fmt_seconds(pe.seconds)} of work estimated: less "
            f"than a process pool's start-up of ~{POOL_STARTUP_S:g} s would save; --workers N to force a pool)"
        )
    return False, (
        f"executor: local pool ({pe.n_tasks} tasks, ~{fmt_seconds(pe.seconds)} of work estimated"
        + (f", {pe.unknown} not estimated" if pe.unknown else "")
        + ")"
    )
