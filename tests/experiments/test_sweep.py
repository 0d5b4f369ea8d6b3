"""Sweep files: parsing, validation before anything runs, chains and warm starts, failures, resumption, export."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hdlora.experiments import tasks as task_kinds
from hdlora.experiments.executor import SerialExecutor
from hdlora.experiments.store import Store
from hdlora.experiments.sweep import (
    SweepError,
    export,
    load_sweep,
    parse_sweep,
    plan,
    run_sweep,
    sweep_dataset,
    sweep_frame,
)

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # the test-only task kinds, "_sweep_kinds:<name>"


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return subprocess.run(
        [sys.executable, "-m", "hdlora.experiments.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def fake_theory(monkeypatch):
    """Replace the 'theory' kind by a cheap warm-started stand-in (in-process runs only)."""
    monkeypatch.setitem(
        task_kinds.REGISTRY, "theory", task_kinds.Kind("theory", "_sweep_kinds:fake_theory", None, warm_start=True)
    )


# ----- axes -------------------------------------------------------------------------------------------------
def test_axes_lists_and_ranges():
    spec = parse_sweep(
        {
            "axes": {
                "alpha_ft": {"start": 1, "stop": 3, "num": 5},
                "noise": {"start": 0.01, "stop": 1.0, "num": 3, "log": True},
                "tokens": [2, 3],
            },
            "run": {"_sweep_kinds:arith": {}},
        }
    )
    axes = dict(spec.axes)
    assert axes["alpha_ft"] == (1.0, 1.5, 2.0, 2.5, 3.0)
    assert axes["noise"][0] == 0.01 and axes["noise"][-1] == 1.0
    assert math.isclose(axes["noise"][1] / axes["noise"][0], axes["noise"][2] / axes["noise"][1])
    assert axes["tokens"] == (2, 3)
    assert spec.shape == (5, 3, 2) and len(plan(spec).tasks) == 30
    assert spec.continuation == "alpha_ft"  # default: the first axis


# ----- validation: bad files give a clear error naming the key, before anything runs -----------------------
GOOD_HEAD = """
[sweep]
database = "out.sqlite"
"""

BAD_FILES = {
    "unknown parameter": ("[params]\nalphaa = 0.1\n[run.'_sweep_kinds:arith']\n", r"unknown parameter 'alphaa'"),
    "unknown axis parameter": (
        "[axes]\nnois = [0.1]\n[run.'_sweep_kinds:arith']\n",
        r"\[axes\] unknown parameter 'nois'",
    ),
    "empty axis list": ("[axes]\nalpha_ft = []\n[run.'_sweep_kinds:arith']\n", r"\[axes\] alpha_ft: empty axis"),
    "empty axis range": (
        "[axes]\nalpha_ft = {start = 1, stop = 2, num = 0}\n[run.'_sweep_kinds:arith']\n",
        r"\[axes\] alpha_ft: empty axis",
    ),
    "invalid axis value": (
        "[axes]\nalpha_ft = [1.0, 2.0]\nkappa = [1.0, 0.5]\n[run.'_sweep_kinds:arith']\n",
        r"grid point alpha_ft=1.0, kappa=0.5: kappa must be >= 1",
    ),
    "invalid fixed value": ("[params]\nnoise = -1\n[run.'_sweep_kinds:arith']\n", r"\[params\] invalid value: noise"),
    "log range through zero": (
        "[axes]\nnoise = {start = 0, stop = 1, num = 3, log = true}\n[run.'_sweep_kinds:arith']\n",
        r"\[axes\] noise: a log range needs start > 0",
    ),
    "unknown kind": ("[run.theroy]\n", r"\[run.theroy\] unknown task kind 'theroy'"),
    "unknown baseline": ("[run]\nbaselines = ['frozzen']\n", r"unknown baseline 'frozzen'"),
    "no run": ("[params]\nalpha = 0.1\n", r"\[run\] is missing"),
    "unknown table": ("[parms]\nalpha = 0.1\n[run.'_sweep_kinds:arith']\n", r"top level: unknown key\(s\) \['parms'\]"),
    "simulate without dim": ("[run.simulate]\nseeds = 2\n", r"\[run.simulate\].*needs option\(s\) \['dim'\]"),
    "simulate bad seeds": ("[run.simulate]\ndim = 10\nseeds = 0\n", r"\[run.simulate\] seeds must be"),
    "reuse needs N' <= N at this D": (
        "[params]\nreuse = true\nalpha = 0.01\n[run.simulate]\ndim = 10\nseeds = 1\n",
        r"\[run.simulate\] at grid point the fixed parameters: reuse",
    ),
    "axis also fixed": (
        "[params]\nnoise = 0.1\n[axes]\nnoise = [0.2]\n[run.'_sweep_kinds:arith']\n",
        r"'noise' is also fixed",
    ),
    "bad continuation": (
        "[sweep]\ncontinuation = 'lam'\n[axes]\nnoise = [0.2]\n[run.'_sweep_kinds:arith']\n",
        r"continuation 'lam' is not an axis",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_sweep_file_is_rejected_before_anything_runs(tmp_path, case):
    body, pattern = BAD_FILES[case]
    head = "" if body.startswith("[sweep]") else GOOD_HEAD
    text = (
        head + body
        if not body.startswith("[sweep]")
        else body.replace("[sweep]\n", "[sweep]\ndatabase = 'out.sqlite'\n")
    )
    path = write(tmp_path, text)
    with pytest.raises(SweepError, match=pattern) as info:
        load_sweep(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out.sqlite").exists()


@pytest.mark.parametrize("case", ["unknown parameter", "empty axis list", "invalid axis value"])
def test_cli_bad_sweep_file_exit_2_and_no_database(tmp_path, case):
    body, pattern = BAD_FILES[case]
    path = write(tmp_path, GOOD_HEAD + body)
    proc = cli(str(path), "--workers", "2")
    assert proc.returncode == 2, proc.stderr
    assert "hdlora sweep: error:" in proc.stderr and str(path) in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == [path]  # no database, nothing else written


def test_unavailable_kind_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(
        task_kinds.REGISTRY, "theory", task_kinds.Kind("theory", "x:y", "hdlora.not_a_module:solve", warm_start=True)
    )
    with pytest.raises(SweepError, match=r"\[run.theory\] task kind 'theory' is not available"):
        parse_sweep({"run": {"theory": {}}})


def test_unknown_option_rejected_against_library_signature():
    # simulate.run takes **kwargs (run_seed options), so the check is shown on a strict library function
    kind = task_kinds.Kind("strict", "_sweep_kinds:arith", "_sweep_kinds:strict_library")
    task_kinds.REGISTRY["strict"] = kind
    try:
        with pytest.raises(SweepError, match=r"unknown option\(s\) \['n_mcc'\] for task kind 'strict'"):
            parse_sweep({"run": {"strict": {"n_mcc": 3}}})
        parse_sweep({"run": {"strict": {"n_mc": 3, "tol": 1e-6}}})
    finally:
        del task_kinds.REGISTRY["strict"]


# ----- plan: chains, warm start, baselines -----------------------------------------------------------------------
def test_chains_follow_the_continuation_axis_and_baselines_are_deduplicated(fake_theory):
    spec = parse_sweep(
        {"axes": {"alpha_ft": [1.0, 2.0, 3.0], "lam_ft": [0.1, 0.2]}, "run": {"theory": {}, "baselines": ["frozen"]}}
    )
    p = plan(spec)
    assert len(p.tasks) == 12  # 2 labels x 6 grid points
    theory_chains = [c for c in p.chains if c[0].label == "theory"]
    frozen_chains = [c for c in p.chains if c[0].label == "frozen"]
    assert len(theory_chains) == 2 and all([t.params.alpha_ft for t in c] == [1.0, 2.0, 3.0] for c in theory_chains)
    # frozen (lam_ft = inf) does not depend on lam_ft: one chain of 3 distinct tasks serves both lam_ft values
    assert len(frozen_chains) == 1 and [t.params.lam_ft for t in frozen_chains[0]] == [math.inf] * 3


def test_warm_start_passes_the_neighbours_result_and_resumes_from_the_store(tmp_path, fake_theory):
    doc = {
        "sweep": {"database": str(tmp_path / "db.sqlite")},
        "axes": {"alpha_ft": [1.0, 2.0, 3.0, 4.0]},
        "run": {"theory": {"nonconverged_at": 3.0}},
    }
    spec = parse_sweep(doc)
    rep = run_sweep(spec, executor=SerialExecutor(), progress=False)
    assert rep.n_computed == 4 and rep.n_failed == 0 and rep.n_not_converged == 1
    df = sweep_frame(spec).set_index("alpha_ft")
    # 1 cold, 2 from 1, 3 from 2; 3 did not converge so 4 is warm-started from 2, its last converged neighbour
    assert df["init_alpha_ft"].tolist()[0] is None or np.isnan(df["init_alpha_ft"].iloc[0])
    assert df["init_alpha_ft"].tolist()[1:] == [1.0, 2.0, 2.0]

    # delete the middle point: a rerun computes only it, warm-started from its stored neighbour
    with Store(spec.database) as st:
        st._con.execute("DELETE FROM results WHERE params LIKE '%\"alpha_ft\":2.0%'")
        before = {r.params["alpha_ft"]: r.run_id for r in st.rows()}
    rep2 = run_sweep(spec, executor=SerialExecutor(), progress=False)
    assert (rep2.n_present, rep2.n_computed) == (3, 1)
    with Store(spec.database) as st:
        after = {r.params["alpha_ft"]: (r.run_id, r.result) for r in st.rows()}
    assert after[2.0][0] == rep2.run_id and after[2.0][1]["init_alpha_ft"] == 1.0
    assert all(after[a][0] == before[a] for a in (1.0, 3.0, 4.0))


# ----- failures ------------------------------------------------------------------------------------------------------
def test_failure_is_recorded_does_not_stop_the_sweep_and_is_retried_on_request(tmp_path):
    marker = tmp_path / "fixed"
    path = write(
        tmp_path,
        f"""
        [sweep]
        database = "db.sqlite"
        [axes]
        alpha_ft = [1.0, 2.0, 3.0]
        [run.'_sweep_kinds:flaky']
        fail_at = 2.0
        fixed_marker = "{marker}"
        """,
    )
    spec = load_sweep(path)
    rep = run_sweep(spec, executor=SerialExecutor(), progress=False)
    assert (rep.n_computed, rep.n_failed, rep.n_failed_total) == (3, 1, 1)
    with Store(spec.database) as st:
        rows = {r.params["alpha_ft"]: r for r in st.rows()}
    assert rows[2.0].status == "failed" and "deliberate failure at alpha_ft=2.0" in rows[2.0].error
    assert "Traceback" in rows[2.0].error and rows[1.0].ok and rows[3.0].ok

    # default: a failed task is not recomputed (the CLI says so and exits 1)
    proc = cli(str(path), "--workers", "1", "--no-progress")
    assert proc.returncode == 1 and "0 computed" in proc.stdout and "--retry-failed" in proc.stderr
    marker.write_text("")
    proc = cli(str(path), "--workers", "1", "--no-progress", "--retry-failed", "--export", str(tmp_path / "o.csv"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    with Store(spec.database) as st:
        rows = {r.params["alpha_ft"]: r for r in st.rows()}
    assert rows[2.0].ok and rows[2.0].attempts == 2 and rows[1.0].attempts == 1


# ----- executors ---------------------------------------------------------------------------------------------------
def test_local_pool_equals_serial_and_workers_use_one_thread(tmp_path):
    doc = {
        "axes": {"alpha_ft": [1.0, 2.0, 3.0], "noise": [0.1, 0.2]},
        "run": {"_sweep_kinds:arith": {}, "_sweep_kinds:threads": {}},
    }
    a = parse_sweep({**doc, "sweep": {"database": str(tmp_path / "a.sqlite")}})
    b = parse_sweep({**doc, "sweep": {"database": str(tmp_path / "b.sqlite")}})
    run_sweep(a, workers=1, progress=False)
    rep = run_sweep(b, workers=2, progress=False)
    assert rep.executor == "local:2" and rep.n_computed == 12
    fa, fb = sweep_frame(a), sweep_frame(b)
    arith_a = fa[fa.label == "_sweep_kinds:arith"].set_index(["alpha_ft", "noise"]).sort_index()
    arith_b = fb[fb.label == "_sweep_kinds:arith"].set_index(["alpha_ft", "noise"]).sort_index()
    assert np.array_equal(arith_a["value"].to_numpy(), arith_b["value"].to_numpy())
    assert set(arith_b["pid"]) != {os.getpid()} and os.getpid() not in set(arith_b["pid"])
    thr = fb[fb.label == "_sweep_kinds:threads"]
    assert set(thr["omp"]) == {1} and set(thr["torch_threads"]) == {1}


# ----- export -------------------------------------------------------------------------------------------------------------
def test_export_csv_and_netcdf(tmp_path, fake_theory):
    import pandas as pd
    import xarray as xr

    spec = parse_sweep(
        {
            "sweep": {"database": str(tmp_path / "db.sqlite")},
            "axes": {"alpha_ft": [1.0, 2.0, 3.0], "lam_ft": [0.1, 0.2]},
            "run": {"theory": {}, "baselines": ["frozen"]},
        }
    )
    run_sweep(spec, executor=SerialExecutor(), progress=False)
    df = pd.read_csv(export(spec, tmp_path / "out.csv"))
    assert len(df) == 12 and set(df.label) == {"theory", "frozen"} and set(df.status) == {"ok"}
    th = df[df.label == "theory"]
    assert np.allclose(th["value"], th["alpha_ft"] + th["lam_ft"])
    fr = df[df.label == "frozen"]  # the grid's lam_ft in the parameter columns; the value is the frozen one
    assert np.allclose(fr["value"], fr["alpha_ft"]) and set(fr["lam_ft"]) == {0.1, 0.2}

    ds = xr.open_dataset(export(spec, tmp_path / "out.nc"), engine="h5netcdf")
    assert ds["value"].dims == ("label", "alpha_ft", "lam_ft")
    v = ds["value"].sel(label="theory").to_numpy()
    assert np.allclose(v, np.add.outer([1.0, 2.0, 3.0], [0.1, 0.2]))
    assert np.allclose(ds["value"].sel(label="frozen").to_numpy(), [[1, 1], [2, 2], [3, 3]])
    assert (ds["status"].to_numpy() == "ok").all() and ds.attrs["version"]
    ds.close()
    # a partially computed sweep exports what it has, the rest is missing / NaN
    with Store(spec.database) as st:
        st._con.execute("DELETE FROM results WHERE params LIKE '%\"alpha_ft\":3.0%'")
    ds = sweep_dataset(spec)
    assert np.isnan(ds["value"].sel(alpha_ft=3.0)).all() and (ds["status"].sel(alpha_ft=3.0) == "missing").all()
    assert len(sweep_frame(spec)) == 8


def test_example_sweep_files_are_valid():
    # files needing kinds that are not implemented yet are reported as such, not as format errors
    for f in sorted((REPO / "sweeps").glob("*.toml")):
        try:
            load_sweep(f)
        except SweepError as exc:
            assert "is not available" in str(exc), f"{f}: {exc}"


def test_bayes_optimal_is_keyed_without_the_parameters_it_ignores():
    spec = parse_sweep({"axes": {"alpha_ft": [1.0, 2.0], "lam_ft": [0.1, 0.2, 0.5]}, "run": {"bayes_optimal": {}}})
    p = plan(spec)
    assert len(p.tasks) == 6 and sum(len(c) for c in p.chains) == 2  # one BO point per alpha_ft


def test_serial_runs_each_task_only_when_the_previous_one_is_stored(tmp_path, monkeypatch):
    """In a single process, a task starts only after the previous result was committed."""
    monkeypatch.setenv("SWEEP_TEST_DIR", str(tmp_path))
    spec = parse_sweep(
        {
            "sweep": {"database": str(tmp_path / "db.sqlite"), "continuation": ""},
            "axes": {"alpha_ft": [1.0, 2.0, 3.0]},
            "run": {"_sweep_kinds:stored_before": {}},
        }
    )
    run_sweep(spec, workers=1, progress=False)
    df = sweep_frame(spec).sort_values("alpha_ft")
    assert df["rows_seen"].tolist() == [0, 1, 2]


def test_results_of_another_package_version_are_refused(tmp_path):
    spec = parse_sweep(
        {
            "sweep": {"database": str(tmp_path / "db.sqlite")},
            "axes": {"alpha_ft": [1.0]},
            "run": {"_sweep_kinds:arith": {}},
        }
    )
    with Store(spec.database, version="0.0.0-other") as st:
        rep = run_sweep(spec, executor=SerialExecutor(), store=st, progress=False)
        row = next(st.rows())
    assert rep.n_failed == 1 and row.status == "failed" and "runs hdlora" in row.error


def test_hdlora_sweep_command_is_registered(tmp_path, capsys):
    pytest.importorskip("hdlora.theory.cli")  # the top-level parser imports every command module
    from hdlora.cli import main

    path = write(tmp_path, GOOD_HEAD + "[axes]\nalpha_ft = [1.0, 2.0]\n[run.'_sweep_kinds:arith']\n")
    assert main(["sweep", str(path), "--plan"]) == 0
    assert '"tasks": 2' in capsys.readouterr().out
    assert not (tmp_path / "out.sqlite").exists()


def test_real_theory_chain_warm_start_reaches_the_cold_start_fixed_points_in_fewer_iterations(tmp_path):
    pytest.importorskip("hdlora.theory")
    from hdlora import theory

    if not hasattr(theory, "solve"):
        pytest.skip("hdlora.theory.solve not available")
    doc = {
        "params": {"activation": "linear", "lam_ft": 0.05},
        "axes": {"lam": {"start": 0.001, "stop": 1.0, "num": 4, "log": True}},
        "run": {"theory": {"n_mc": 2000}},
    }
    warm = parse_sweep({**doc, "sweep": {"database": str(tmp_path / "warm.sqlite"), "continuation": "lam"}})
    cold = parse_sweep({**doc, "sweep": {"database": str(tmp_path / "cold.sqlite"), "continuation": ""}})
    assert len(plan(warm).chains) == 1 and len(plan(cold).chains) == 4
    for spec in (warm, cold):
        rep = run_sweep(spec, workers=1, progress=False)
        assert rep.n_failed == 0 and rep.n_not_converged == 0
    a, b = (sweep_frame(s).sort_values("lam").reset_index(drop=True) for s in (warm, cold))
    # Same fixed point whatever the start: each solve stops at a relative step < tol = 1e-7; with a
    # contraction factor up to ~0.99 the distance to the fixed point is < 1e-5 (measured: ~1e-7).
    for k in ("Q", "M", "q", "m", "finetune_test_error", "overlap"):
        assert np.allclose(a[k], b[k], rtol=1e-5, atol=0), k
    # continuation from the neighbour is what makes chains worth it (measured on a 5 x 2 grid: 348 vs 409)
    assert a["iterations"].sum() < b["iterations"].sum()
