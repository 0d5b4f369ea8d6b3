"""SIGKILL a running sweep, rerun it: every task present exactly once, nothing finished recomputed.

Runs the real "simulate" kind at D = 10 (one seed: ~0.3 s a task once a worker has imported torch).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hdlora.experiments.store import Store, canonical_json
from hdlora.experiments.sweep import load_sweep, plan

TESTS = Path(__file__).resolve().parents[1]

SWEEP = """
[sweep]
name = "kill-test"
database = "kill.sqlite"

[params]
alpha = 0.5
tokens = 2
lam = 0.1
lam_ft = 0.5

[axes]
alpha_ft = [1.0, 2.0, 3.0]
noise = [0.1, 0.3, 0.5, 1.0]

[run.simulate]
dim = 10
seeds = 1
"""


def _start(path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    return subprocess.Popen(
        [sys.executable, "-m", "hdlora.experiments.cli", str(path), "--workers", "2", "--no-progress", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _n_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_then_resume_computes_only_the_missing_tasks(tmp_path):
    path = tmp_path / "kill.toml"
    path.write_text(textwrap.dedent(SWEEP))
    spec = load_sweep(path)
    keys = {t.key for t in plan(spec).tasks}
    assert len(keys) == 12
    db = spec.database

    proc = _start(path)
    try:
        deadline = time.time() + 90
        while _n_rows(db) < 3:
            assert proc.poll() is None, f"sweep ended before it could be killed: {proc.communicate()}"
            assert time.time() < deadline, "no task finished within 90 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # the sweep process only: its workers must notice and exit
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        with Store(db) as st:
            first = {(r.kind, json.dumps(r.params, sort_keys=True)): r for r in st.rows()}
        n_done = len(first)
        assert 3 <= n_done < 12, f"{n_done} tasks had finished at the kill; the test needs some left to do"
        first_run = {r.run_id for r in first.values()}
        assert len(first_run) == 1
        # the orphaned pool workers exit by themselves (parent watchdog)
        workers = {int(r.worker.rsplit(":", 1)[1]) for r in first.values()}
        deadline = time.time() + 15
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "pool workers outlived the killed sweep"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started
        except ProcessLookupError:
            pass
        proc.communicate()

    # rerun the same command to completion
    proc = _start(path)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["n_present"] == n_done and report["n_computed"] == 12 - n_done and report["n_failed"] == 0
    with Store(db) as st:
        rows = list(st.rows())
        dup = st._con.execute(
            "SELECT COUNT(*) FROM (SELECT kind, params, options, version FROM results "
            "GROUP BY kind, params, options, version HAVING COUNT(*) > 1)"
        ).fetchone()[0]
        assert {r.kind for r in rows} == {"simulate"}
        assert {Store.key(r.kind, r.params, r.options) for r in rows} == keys  # every task present
    assert len(rows) == 12 and dup == 0  # exactly once
    for r in rows:
        k = (r.kind, json.dumps(r.params, sort_keys=True))
        if k in first:  # finished before the kill: untouched (same run, same timestamp, one attempt)
            assert (r.run_id, r.finished_at, r.attempts) == (first[k].run_id, first[k].finished_at, 1)
            assert canonical_json(r.result) == canonical_json(first[k].result)
        else:
            assert r.run_id == report["run_id"] and r.run_id not in first_run and r.ok
