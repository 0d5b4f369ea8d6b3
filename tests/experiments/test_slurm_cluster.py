"""A sweep through a real SLURM (``--cluster slurm``, dask-jobqueue's SLURMCluster) gives the same
stored results as the local pool, and its tasks really ran inside SLURM jobs.

Needs a running SLURM whose jobs can reach this machine on 127.0.0.1: ``make test-cluster``
starts a single-node one (scripts/slurm_up.sh), runs this file, and stops it
(scripts/slurm_down.sh).  Deselected by default (marker ``cluster``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hdlora.experiments.store import Store

TESTS = Path(__file__).resolve().parents[1]


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client here (sinfo / sbatch not on the PATH); `make test-cluster` installs and starts one"
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"no SLURM controller answers (sinfo: {' '.join(proc.stderr.split())}); run `make test-cluster`"
    if "idle" not in proc.stdout.split() and "mix" not in proc.stdout.split():
        return f"no idle SLURM node (sinfo states: {proc.stdout.split()})"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install -e '.[cluster]')"
    return None


pytestmark = [pytest.mark.cluster]

SWEEP = """
[sweep]
name = "slurm-test"

[params]
alpha = 0.5
alpha_ft = 2.0
tokens = 2
lam = 0.1
activation = "linear"

[axes]
lam_ft = [0.1, 1.0]
noise = [0.1, 0.5, 1.0]

[run.theory]
n_mc = 2000
"""

PROBE = """
[run."_slurm_kinds:job_env"]
"""


def _sweep(path: Path, *args: str, env: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hdlora.experiments.cli", str(path), "--no-progress", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout), time.perf_counter() - t0


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _queue(job_name: str, wait_s: float = 30.0) -> list[str]:
    """The jobs of that name still in SLURM's queue, after up to wait_s for cancelled ones to complete."""
    deadline = time.time() + wait_s
    while True:
        q = subprocess.run(
            ["squeue", "-h", "-n", job_name, "-o", "%i:%t"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        if not q or time.time() > deadline:
            return q
        time.sleep(1)


def _rows(db: Path) -> dict:
    with Store(db) as s:
        return {Store.key(r.kind, r.params, r.options): r for r in s.rows()}


def test_slurm_cluster_gives_the_same_results_as_the_local_pool(tmp_path):
    if (why := _slurm_problem()) is not None:
        if os.environ.get("HDLORA_REQUIRE_SLURM"):  # make test-cluster started SLURM: a skip would hide a failure
            pytest.fail(why)
        pytest.skip(why)
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    env.pop("OMP_NUM_THREADS", None)  # the workers' one-thread setting must come from hdlora, not from here
    theory_only = tmp_path / "theory.toml"
    theory_only.write_text(textwrap.dedent(SWEEP))
    with_probe = tmp_path / "probe.toml"
    with_probe.write_text(textwrap.dedent(SWEEP) + textwrap.dedent(PROBE))
    logs = tmp_path / "jobs"
    job_name = f"hdlora-test-{os.getpid()}"

    rep_slurm, wall = _sweep(
        with_probe,
        "--cluster",
        "slurm",
        "--workers",
        "2",
        "--db",
        str(tmp_path / "slurm.sqlite"),
        "--cluster-option",
        "host=127.0.0.1",
        "--cluster-option",
        "cores=1",
        "--cluster-option",
        "memory=1GB",
        "--cluster-option",
        "walltime=00:10:00",
        "--cluster-option",
        f"job_name={job_name}",
        "--cluster-option",
        f"log_directory={logs}",
        "--cluster-option",
        f"job_script_prologue=export PYTHONPATH={TESTS}",
        env=env,
    )
    print(f"\nSLURM sweep: {rep_slurm['n_computed']} tasks in {wall:.1f} s on {rep_slurm['executor']}")
    assert rep_slurm["executor"].startswith("slurm:2 jobs x 1 workers (tcp://127.0.0.1:")
    assert rep_slurm["n_computed"] == 12 and rep_slurm["n_failed"] == 0 and rep_slurm["n_missing"] == 0

    rep_local, _ = _sweep(theory_only, "--workers", "2", "--db", str(tmp_path / "local.sqlite"), env=env)
    assert rep_local["executor"] == "local:2" and rep_local["n_computed"] == 6

    rows_s, rows_l = _rows(tmp_path / "slurm.sqlite"), _rows(tmp_path / "local.sqlite")
    theory_s = {k: r for k, r in rows_s.items() if r.kind == "theory"}
    probes = [r for r in rows_s.values() if r.kind != "theory"]
    assert theory_s.keys() == rows_l.keys() and len(theory_s) == 6 and len(probes) == 6

    # the tasks ran inside SLURM jobs of this test, with one BLAS / torch thread
    job_ids = {p.result["slurm_job_id"] for p in probes}
    assert None not in job_ids and all(p.result["slurm_job_name"] == job_name for p in probes)
    for p in probes:
        r = p.result
        assert (r["OMP_NUM_THREADS"], r["MKL_NUM_THREADS"], r["OPENBLAS_NUM_THREADS"], r["torch_threads"]) == (
            "1",
            "1",
            "1",
            1,
        ), r
    # SLURM's own record of the jobs (finished jobs stay MinJobAge seconds in the controller)
    for jid in job_ids:
        show = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=30).stdout
        print(" ".join(re.findall(r"(?:JobId|JobName|JobState|NodeList|RunTime)=\S+", show)))
        assert f"JobName={job_name}" in show
    # the job logs (written by SLURM from the nodes): the Dask workers registered with our scheduler
    err = "".join(f.read_text() for f in sorted(logs.glob("*.err")))
    assert "Registered to:" in err and "tcp://127.0.0.1:" in err, err[-2000:]
    assert len(list(logs.glob("*.err"))) == 2  # two jobs submitted (--workers 2)
    # the jobs are gone once the command has returned (cancelled by the cluster's close)
    assert not (q := _queue(job_name)), f"jobs left in the queue: {q}"

    # same code, same seeds, float64 and one thread on both sides: the stored numbers agree exactly
    compared = 0
    for k, rs in theory_s.items():
        res_s, res_l = rs.result, rows_l[k].result
        assert res_s.keys() == res_l.keys()
        for name, va in res_s.items():
            if "time" in name or name == "wall_s":
                continue
            assert _same(va, res_l[name]), (k, name, va, res_l[name])
            compared += isinstance(va, float)
    assert compared >= 6 * 10
    errs = [r.result["finetune_test_error"] for r in theory_s.values()]
    assert len(set(errs)) == len(errs)  # a non-trivial grid: the points differ


SLOW = """
[sweep]
name = "slurm-interrupt"

[params]
alpha = 0.5
tokens = 2
lam = 0.1
lam_ft = 0.5
activation = "linear"

[axes]
alpha_ft = [1.0, 2.0, 3.0, 4.0]

[run."_sweep_kinds:arith"]
sleep = 3.0
"""


def test_ctrl_c_stops_the_sweep_and_cancels_the_jobs(tmp_path):
    """SIGINT: what finished is stored, the run is marked interrupted, exit 130, no job left in SLURM."""
    import signal

    if (why := _slurm_problem()) is not None:
        if os.environ.get("HDLORA_REQUIRE_SLURM"):
            pytest.fail(why)
        pytest.skip(why)
    path = tmp_path / "slow.toml"
    path.write_text(textwrap.dedent(SLOW))
    job_name = f"hdlora-int-{os.getpid()}"
    db = tmp_path / "int.sqlite"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hdlora.experiments.cli",
            str(path),
            "--no-progress",
            "--db",
            str(db),
            "--cluster",
            "slurm",
            "--cluster-option",
            "host=127.0.0.1",
            "--cluster-option",
            f"job_name={job_name}",
            "--cluster-option",
            "memory=1GB",
            "--cluster-option",
            f"log_directory={tmp_path / 'jobs'}",
            "--cluster-option",
            f"job_script_prologue=export PYTHONPATH={TESTS}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(TESTS)),
        # SIGINT at its default disposition in the child: a run started in the background by a non-interactive shell
        # inherits it ignored, and the Ctrl-C below would be lost (see tests/test_cli_errors.py)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 120
        while True:  # interrupt once the first task is stored (so the job runs and a result exists)
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no task finished within 120 s"
            if db.exists():
                with Store(db) as s:
                    if len(list(s.rows())) >= 1:
                        break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in out
    with Store(db) as s:
        assert 1 <= len(list(s.rows())) < 4
        assert s.runs()[-1]["state"] == "interrupted"
    assert not (q := _queue(job_name)), f"jobs left in the queue after Ctrl-C: {q}"
