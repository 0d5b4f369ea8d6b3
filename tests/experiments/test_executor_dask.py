"""A real Dask cluster (scheduler + two workers, separate processes on 127.0.0.1) runs a sweep
through ``--scheduler`` and gets the same results as the local pool."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hdlora.experiments.store import Store

TESTS = Path(__file__).resolve().parents[1]

SWEEP = """
[sweep]
name = "dask-test"

[params]
alpha = 0.5
tokens = 2
lam = 0.1
lam_ft = 0.5
activation = "linear"

[axes]
alpha_ft = [1.0, 3.0]
noise = [0.1, 0.5, 1.0]

[run.simulate]
dim = 10
seeds = 1
"""

THEORY = """
[run.theory]            # chains along alpha_ft: the warm start travels through the parent, both ways
n_mc = 1000
"""

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(TESTS))


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "dask", *args], stdout=fh, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # the process groups this test started
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def _sweep(path: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "hdlora.experiments.cli", str(path), "--no-progress", "--json", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_dask_cluster_gives_the_same_results_as_the_local_pool(tmp_path):
    path = tmp_path / "sweep.toml"
    from hdlora import theory

    with_theory = hasattr(theory, "solve")
    path.write_text(textwrap.dedent(SWEEP) + (textwrap.dedent(THEORY) if with_theory else ""))
    n_tasks = 12 if with_theory else 6
    sched_file = tmp_path / "scheduler.json"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            _spawn(
                [
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(sched_file),
                ],
                tmp_path / "scheduler.log",
            )
        )
        deadline = time.time() + 60
        while not sched_file.exists():
            assert procs[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.time() < deadline, "scheduler did not start within 60 s"
            time.sleep(0.1)
        time.sleep(0.2)  # let the file be written completely
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for i in range(2):
            procs.append(
                _spawn(
                    [
                        "worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--no-nanny",
                        "--no-dashboard",
                        "--name",
                        f"w{i}",
                        "--local-directory",
                        str(tmp_path / f"w{i}"),
                    ],
                    tmp_path / f"worker{i}.log",
                )
            )
        from distributed import Client

        with Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2

        rep_dask = _sweep(path, "--scheduler", address, "--db", str(tmp_path / "dask.sqlite"))
        assert rep_dask["executor"] == address and rep_dask["n_computed"] == n_tasks and rep_dask["n_failed"] == 0
        worker_pids = {procs[1].pid, procs[2].pid}
    finally:
        _stop(procs)

    rep_local = _sweep(path, "--workers", "2", "--db", str(tmp_path / "local.sqlite"))
    assert rep_local["executor"] == "local:2" and rep_local["n_computed"] == n_tasks

    with Store(tmp_path / "dask.sqlite") as a, Store(tmp_path / "local.sqlite") as b:
        rows_a = {Store.key(r.kind, r.params, r.options): r for r in a.rows()}
        rows_b = {Store.key(r.kind, r.params, r.options): r for r in b.rows()}
    assert rows_a.keys() == rows_b.keys() and len(rows_a) == n_tasks
    assert {r.kind for r in rows_a.values()} == ({"simulate", "theory"} if with_theory else {"simulate"})
    # the tasks really ran on the two Dask worker processes
    assert {int(r.worker.rsplit(":", 1)[1]) for r in rows_a.values()} == worker_pids
    # same code, same seeds, float64 and one thread on both sides: the numbers must agree exactly
    # (only the timings differ)
    # (only the timings differ; the theory chains get the same warm starts in the same order)
    compared = 0
    for k, ra in rows_a.items():
        res_a, res_b = ra.result, rows_b[k].result
        assert res_a.keys() == res_b.keys()
        for name, va in res_a.items():
            if "time" in name or name in ("per_seed", "mc_se", "params"):
                continue
            assert _same(va, res_b[name]), (k, name, va, res_b[name])
            compared += isinstance(va, float)
        for sa, sb in zip(res_a.get("per_seed", []), res_b.get("per_seed", [])):
            for name in sa:
                if "time" not in name:
                    assert _same(sa[name], sb[name]), (k, name)
    assert compared >= n_tasks * 20
    sim = [r.result["finetune_test_error"] for r in rows_a.values() if r.kind == "simulate"]
    assert len(set(sim)) == len(sim)  # a non-trivial grid: the points differ
