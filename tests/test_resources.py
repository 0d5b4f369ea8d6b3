"""Size checks before allocating (issue 12, "Resources"): estimates, refusals, --dry-run, memory
available (meminfo, cgroup v1/v2), token storage of large effective-mode sets, pool-size choice,
and real small runs whose peak memory stays within 1.2 x the estimate plus the interpreter's base."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import types

import pytest
import torch

from hdlora import Params, resources, resources_cli
from hdlora.cli import main
from hdlora.resources import (
    ResourceError,
    available_memory,
    cgroup_headroom,
    choose_serial,
    choose_token_storage,
    simulate_estimate,
    theory_estimate,
)

GiB = 2**30


@pytest.fixture
def no_runs(monkeypatch):
    """Any computation reached in these tests is a failure of the size check (nothing may be allocated)."""

    def boom(*a, **k):
        raise AssertionError("the run started: the size check did not refuse it")

    import importlib

    import hdlora.simulate as sim

    monkeypatch.setattr(sim, "run", boom)
    monkeypatch.setattr(importlib.import_module("hdlora.theory.solve"), "solve", boom)
    monkeypatch.setattr(importlib.import_module("hdlora.experiments.optimize"), "optimize", boom)
    monkeypatch.setenv("HDLORA_MEMORY_LIMIT", "8GiB")  # the same refusals on any machine


REFUSED = [
    ["simulate", "--dim", "2000"],
    ["simulate", "--dim", "100000"],
    ["simulate", "--alpha", "1e6"],
    ["simulate", "--alpha-ft", "1e9"],
    ["simulate", "--kappa", "1e6"],
    ["theory", "--tokens", "100000"],
    ["theory", "--n-mc", "1000000000"],
    ["theory", "--n-mc", "1e9"],
]


@pytest.mark.parametrize("argv", REFUSED, ids=lambda a: " ".join(a))
def test_too_large_runs_are_refused_in_one_line_before_allocating(argv, no_runs, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in ("needs about", "is available", "expected time", "way out"):
        assert word in err, err


def test_refusal_names_a_dimension_that_fits(no_runs, capsys):
    assert main(["simulate", "--dim", "2000"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "a smaller --dim (<= " in err
    dmax = int(err.split("a smaller --dim (<= ")[1].split(" ")[0])
    limit = 8 * GiB
    assert simulate_estimate(Params(), dmax, seeds=4).bytes <= 0.85 * limit
    assert simulate_estimate(Params(), dmax + 1, seeds=4).bytes > 0.85 * limit


def test_refusal_in_a_subprocess_is_one_line_exit_2_no_traceback():
    """A real process, with an address-space cap so that a broken check could not hurt the machine."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (12 * GiB, 12 * GiB))

    env = dict(os.environ, HDLORA_MEMORY_LIMIT="8GiB")
    p = subprocess.run(
        [sys.executable, "-m", "hdlora.cli", "simulate", "--dim", "2000"],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=cap,
        timeout=300,
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--dim", "2000", "--dry-run"],
        [
            "simulate",
            "--dim",
            "10000",
            "--alpha-ft",
            "10",
            "--effective-Q0",
            "1.5",
            "--effective-Q",
            "1.5",
            "--effective-M",
            "1",
            "--dry-run",
        ],
        ["theory", "--n-mc", "1000000000", "--dry-run"],
        ["optimize", "--over", "lam", "--dry-run"],
    ],
    ids=lambda a: " ".join(a[:3]),
)
def test_dry_run_prints_the_estimate_and_stops(argv, no_runs, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run:") and "memory ~" in out and "expected time ~" in out and "fits:" in out


def test_dry_run_json(no_runs, capsys):
    assert main(["simulate", "--dim", "2000", "--dry-run", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["bytes"] == sum(d["parts"].values()) and d["available"] <= 8 * GiB


def test_effective_paper_size_fits_24_gib_without_float64_tokens():
    """D = 1e4, alpha' = 10, T = 3: 3e9 token values (24 GB in float64) are kept as float32 or regenerated."""
    p = Params(alpha_ft=10.0, tokens=3, kappa0=0.5)
    for avail, want in ((20 * GiB, "float32"), (8 * GiB, "regenerate")):
        est = simulate_estimate(p, 10_000, effective=True, available=avail)
        assert est.choices["token_storage"] == want
        assert est.bytes <= 0.85 * avail
    assert choose_token_storage(100_000, 3, 10_000, available=64 * GiB) == "float64"


# ----- figures -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("number", [2, 4])
def test_figure_default_paper_size_dry_run(number, capsys, tmp_path):
    assert main(["figure", str(number), "--dry-run", "--out", str(tmp_path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"]["dim"] == 10_000 and d["tasks"] > 0 and d["tasks_not_estimated"] == 0
    assert "D = 10000" in d["largest_task"]["what"] and isinstance(d["fits"], bool)
    assert not (tmp_path / f"fig{number}.sqlite").exists()


def test_figure_default_refuses_or_says_what_it_will_take(monkeypatch, capsys, tmp_path):
    from hdlora.experiments.figures import build_figure

    fig = build_figure(2, out=tmp_path)
    args = types.SimpleNamespace(dry_run=False)
    assert resources_cli.figure_gate(args, fig, "paper") is None  # runs within memory ...
    err = capsys.readouterr().err
    assert err.startswith("figure 2: 90 tasks, largest ~") and "expected ~" in err  # ... and says so
    # 512 MiB: the figure's softmax theory tasks fit (samples + the compiled kernel's runtime,
    # ~330 MiB) but its D = 1e4 simulations (~721 MiB) do not, so a smaller --dim is a way out
    monkeypatch.setenv("HDLORA_MEMORY_LIMIT", "512MiB")
    with pytest.raises(ResourceError) as e:
        resources_cli.figure_gate(args, fig, "paper")
    msg = str(e.value)
    assert "\n" not in msg and "--quick" in msg and "a smaller --dim (<= " in msg


# ----- memory available -----------------------------------------------------------------------------------------
def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_available_memory_cgroup_v2(tmp_path):
    _write(tmp_path / "meminfo", "MemTotal: 100 kB\nMemAvailable:   8000000 kB\n")
    _write(tmp_path / "self_cgroup", "0::/job/step\n")
    root = tmp_path / "cg"
    _write(root / "memory.max", "max\n")
    _write(root / "job" / "memory.max", str(6 * GiB))
    _write(root / "job" / "memory.current", str(1 * GiB))
    _write(root / "job" / "step" / "memory.max", "max\n")
    _write(root / "job" / "step" / "memory.current", str(GiB // 2))
    b, src = available_memory(
        meminfo=str(tmp_path / "meminfo"), cgroup_root=str(root), proc_cgroup=str(tmp_path / "self_cgroup"), env={}
    )
    assert b == 5 * GiB and "memory.max" in src
    b, src = available_memory(
        meminfo=str(tmp_path / "meminfo"),
        cgroup_root=str(root),
        proc_cgroup=str(tmp_path / "self_cgroup"),
        env={"HDLORA_MEMORY_LIMIT": "1GiB"},
    )
    assert b == GiB and src == "HDLORA_MEMORY_LIMIT"


def test_available_memory_cgroup_v1_and_meminfo(tmp_path):
    _write(tmp_path / "meminfo", "MemAvailable:   1048576 kB\n")
    _write(tmp_path / "self_cgroup", "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n")
    root = tmp_path / "cg"
    _write(root / "memory" / "memory.limit_in_bytes", str(2**63 - 4096))  # v1 "unlimited"
    _write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", str(3 * GiB))
    _write(root / "memory" / "docker" / "abc" / "memory.usage_in_bytes", str(GiB))
    assert cgroup_headroom(str(root), str(tmp_path / "self_cgroup"))[0] == 2 * GiB
    b, src = available_memory(
        meminfo=str(tmp_path / "meminfo"), cgroup_root=str(root), proc_cgroup=str(tmp_path / "self_cgroup"), env={}
    )
    assert b == GiB and src == "MemAvailable"  # 1 GiB available < 2 GiB of headroom


def test_bad_memory_limit_env_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HDLORA_MEMORY_LIMIT", "lots")
    with pytest.raises(resources.ParamError, match="HDLORA_MEMORY_LIMIT"):
        available_memory()


# ----- token storage ---------------------------------------------------------------------------------------------
def test_chunked_draws_equal_one_draw_and_storages_agree(monkeypatch):
    """Chunks of a multiple of 16 sequences reproduce one draw (CPU); regenerate is bit-identical to
    float64 storage, float32 differs by the float32 rounding of the tokens only."""
    import hdlora.data as data
    from hdlora import activations
    from hdlora.simulate.finetune import finetune

    monkeypatch.setattr(data, "TOKEN_CHUNK_NUMBERS", 16 * 3 * 37 * 2)  # 32 sequences per chunk
    n, T, D = 203, 3, 37
    assert data.token_chunk(T, D) == 32
    teacher = data.draw_teacher(D, 0, 3)
    eff = data.Effective(1.5, 1.5, 1.0)
    sets = {st: data.effective_finetune_dataset(n, T, 0.5, eff, teacher, 3, storage=st) for st in data.TOKEN_STORAGE}
    a, r, f = sets["float64"], sets["regenerate"], sets["float32"]
    assert isinstance(a.X, torch.Tensor) and isinstance(r.X, data.Tokens) and r.X.nbytes < 10 * 5056
    assert torch.equal(a.X, r.X[0:n]) and torch.equal(a.X[40:111], r.X[40:111])
    assert torch.equal(a.z_star, r.z_star) and torch.equal(a.G, r.G) and torch.equal(a.z_star, f.z_star)
    assert 0 < (a.X - f.X[0:n]).abs().max() < 1e-6
    sigma = activations.get("softmax", "torch")
    kw = dict(lam_ft=0.5, sigma=sigma, loss="sequence", seed=0, restarts=1, chunk=32)
    res = {st: finetune(d.with_frozen(d.z_frozen), teacher.w_star, **kw) for st, d in sets.items()}
    assert torch.equal(res["float64"].w, res["regenerate"].w)
    assert (res["float64"].w - res["float32"].w).abs().max() < 1e-5


def test_run_reports_the_storage_and_small_d_is_unchanged():
    from hdlora.simulate import run_seed

    p = Params(alpha_ft=10.0, tokens=3, kappa0=0.5, noise=0.0, lam_ft=0.5)
    law = {"Q0": 1.5, "Q": 1.5, "M": 1.0}
    r64 = run_seed(p, 40, 1, effective=law, restarts=0)
    rre = run_seed(p, 40, 1, effective=law, restarts=0, token_storage="regenerate")
    assert r64["token_storage"] == "float64" and rre["token_storage"] == "regenerate"
    for k in ("finetune_test_error", "overlap", "forgetting_error", "finetune_objective"):
        assert r64[k] == rre[k], k


# ----- pool size -------------------------------------------------------------------------------------------------
def _task(kind, params, options):
    return types.SimpleNamespace(kind=kind, params=params, options=options)


def test_small_plans_run_serially_and_say_so():
    lin = Params(activation="linear")
    serial, why = choose_serial([_task("theory", lin, {"n_mc": 2000})] * 6, None)
    assert serial and why.startswith("executor: serial")
    serial, why = choose_serial([_task("simulate", Params(), {"dim": 150, "seeds": 4})] * 8, None)
    assert not serial and why.startswith("executor: local pool")
    serial, _ = choose_serial([_task("my.module:f", lin, {})] * 8, None)  # cannot judge: pool
    assert not serial
    assert choose_serial([_task("theory", lin, {})] * 6, 3) == (False, "executor: local pool of 3 (--workers)")


def test_sweep_with_default_workers_picks_serial_for_a_small_plan(tmp_path, capsys):
    from hdlora.experiments.sweep import parse_sweep, run_sweep

    spec = parse_sweep(
        {
            "sweep": {"database": str(tmp_path / "s.sqlite")},
            "params": {"activation": "linear"},
            "axes": {"lam": [0.1, 1.0]},
            "run": {"theory": {"n_mc": 500}},
        }
    )
    rep = run_sweep(spec, progress=False)
    assert rep.executor == "serial" and rep.n_computed == 2
    assert "executor: serial" in capsys.readouterr().err


# ----- peak memory of real small runs ----------------------------------------------------------------------------
# The child reports its own high-water mark (VmHWM of /proc/self/status, which belongs to the
# process's own address space since its exec). ru_maxrss of a child is not used: Linux carries
# the parent's RSS at fork into it, so once the pytest process has grown, the child's "base" and
# "peak" both read the parent's size and the difference is 0.
_CHILD = r"""
import contextlib, importlib, io, json, sys
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
mods, argv = json.loads(sys.argv[1])
for m in mods:
    importlib.import_module(m)
rc = 0
if argv:
    from hdlora.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
print(hwm(), file=sys.__stdout__)
sys.exit(rc)
"""


def _peak_rss(mods, argv) -> int:
    """Peak resident bytes of a subprocess (its own VmHWM, printed as it exits)."""
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([mods, argv])],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


SIM_MODS = ["torch", "hdlora.cli", "hdlora.simulate", "hdlora.simulate.cli", "hdlora.resources", "tqdm.auto"]
THEORY_MODS = ["hdlora.cli", "hdlora.theory.solve", "hdlora.theory.cli", "hdlora.resources"]
CASES = {
    "theory linear": (
        THEORY_MODS,
        ["theory", "--activation", "linear", "--n-mc", "200000"],
        lambda: theory_estimate(Params(activation="linear"), 200000),
    ),
    "theory softmax": (THEORY_MODS, ["theory", "--n-mc", "40000"], lambda: theory_estimate(Params(), 40000)),
    "theory rank-3 linear": (
        THEORY_MODS,
        ["theory", "--activation", "linear", "--lora-rank", "3", "--teacher-rank", "3", "--n-mc", "40000"],
        lambda: theory_estimate(Params(activation="linear", lora_rank=3, teacher_rank=3), 40000),
    ),
    "simulate full": (
        SIM_MODS,
        ["simulate", "--dim", "50", "--seeds", "1", "--alpha", "0.5", "--threads", "1"],
        lambda: simulate_estimate(Params(alpha=0.5), 50),
    ),
    "simulate effective": (
        SIM_MODS,
        [
            "simulate",
            "--dim",
            "400",
            "--seeds",
            "1",
            "--alpha-ft",
            "10",
            "--effective-Q0",
            "1.5",
            "--effective-Q",
            "1.5",
            "--effective-M",
            "1",
            "--restarts",
            "0",
            "--threads",
            "1",
        ],
        lambda: simulate_estimate(Params(alpha_ft=10.0), 400, effective=True, restarts=0),
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if "rank-3" in c else c for c in CASES])
def test_peak_memory_within_estimate(case):
    mods, argv, make = CASES[case]
    base = _peak_rss(mods, None)
    peak = _peak_rss(mods, argv + ["--json"])
    est = make().bytes
    assert peak <= 1.2 * est + base, (case, peak - base, est)
    # and the estimate is not a blanket over-estimate
    assert est <= max(5 * (peak - base), 300 * 2**20), (case, peak - base, est)


# ----- benchmarks/bench_gpu.py where no GPU is present ---------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run its checks")
def test_bench_gpu_says_no_gpu_and_exits_0(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    env = dict(os.environ, OUT=str(tmp_path))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "no GPU present" in p.stdout and p.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_library_run_refuses_before_allocating(monkeypatch):
    """Sweeps call hdlora.simulate.run directly: the same one-line refusal (stored as the task's error)."""
    from hdlora import simulate

    monkeypatch.setenv("HDLORA_MEMORY_LIMIT", "1GiB")
    import importlib

    monkeypatch.setattr(
        importlib.import_module("hdlora.simulate.run"), "run_seed", lambda *a, **k: pytest.fail("allocated")
    )
    with pytest.raises(ResourceError, match="way out"):
        simulate.run(Params(), 2000, 1)
