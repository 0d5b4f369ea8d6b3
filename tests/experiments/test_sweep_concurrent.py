"""Several sweeps on one database split the work: each task is claimed (a lease in the database), computed
once, and a killed sweep's tasks are taken over by the others when its lease expires."""

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

from hdlora.experiments.store import Store

TESTS = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, n: int, sleep: float) -> Path:
    log = tmp_path / "log"
    log.mkdir()
    values = ", ".join(f"{1.0 + i}" for i in range(n))
    f = tmp_path / "c.toml"
    f.write_text(
        textwrap.dedent(f"""
        [sweep]
        database = "c.sqlite"
        [axes]
        alpha_ft = [{values}]
        [run.'_sweep_kinds:counted']
        sleep = {sleep}
        log_dir = "{log}"
        """)
    )
    return f


def start(f: Path, *args: str) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "hdlora.experiments.cli", str(f), "--workers", "1", "--json", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def completions(tmp_path: Path) -> list[float]:
    return sorted(float(x) for p in (tmp_path / "log").glob("done-*.txt") for x in p.read_text().split())


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "SELECT json_extract(params, '$.alpha_ft'), status, attempts, worker FROM results"
        ).fetchall()
    finally:
        con.close()


def test_claims_unit(tmp_path):
    key = Store.key("k", {"a": 1.0}, {})
    with Store(tmp_path / "d.sqlite", version="1") as a, Store(tmp_path / "d.sqlite", version="1") as b:
        assert a.claim(key, "A", 0.5) == "claimed"
        assert b.claim(key, "B", 0.5) == "busy"
        assert a.claim(key, "A", 0.5) == "claimed"  # the owner may renew
        time.sleep(0.6)
        assert b.claim(key, "B", 0.5) == "claimed"  # A's lease expired: taken over
        b.put(key, status="failed", error="x", run_id="r", owner="B")
        assert b.leases() == []
        assert a.claim(key, "A", 0.5) == "done"
        assert a.claim(key, "A", 0.5, redo_before="9999") == "claimed"  # --retry-failed: a failure stored before


def test_three_concurrent_sweeps_compute_each_task_once_and_heartbeats_keep_long_tasks(tmp_path):
    """Tasks (1.5 s) last longer than the lease (1 s): only the heartbeat keeps them from being taken over."""
    n = 8
    f = sweep_file(tmp_path, n, sleep=1.5)
    procs = [start(f, "--lease-seconds", "1") for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    assert completions(tmp_path) == [1.0 + i for i in range(n)]  # each task computed exactly once
    stored = rows(tmp_path / "c.sqlite")
    assert len(stored) == n and all(s == "ok" and att == 1 for _, s, att, _ in stored)
    assert sum(r["n_computed"] for r in reports) == n  # honest counts: what each one stored
    for r in reports:
        assert r["n_present"] + r["n_computed"] + r["n_by_others"] == n and r["n_missing"] == 0
    assert sum(r["n_computed"] > 0 for r in reports) >= 2  # the work was split
    with Store(tmp_path / "c.sqlite", version="x", readonly=True) as st:
        assert st.leases() == []


def test_a_killed_sweeps_tasks_are_taken_over_after_its_lease_expires(tmp_path):
    n = 6
    f = sweep_file(tmp_path, n, sleep=1.0)
    db = tmp_path / "c.sqlite"
    victim = start(f, "--lease-seconds", "2")
    deadline = time.time() + 60
    held = None
    while time.time() < deadline and held is None:  # wait until the victim holds a lease
        time.sleep(0.05)
        if db.exists():
            try:
                con = sqlite3.connect(db)
                held = con.execute(
                    "SELECT json_extract(params, '$.alpha_ft') FROM leases WHERE owner LIKE ?", (f"%:{victim.pid}:%",)
                ).fetchone()
                con.close()
            except sqlite3.OperationalError:  # the tables are being created
                pass
    assert held is not None, "the first sweep never claimed a task"
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    others = [start(f, "--lease-seconds", "2") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in others]
    for p, (_, err) in zip(others, outs):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    stored = {a: (s, att, w) for a, s, att, w in rows(db)}
    assert len(stored) == n and all(s == "ok" for s, _, _ in stored.values())
    # the task the victim held was computed by a survivor, once, after the lease ran out
    status, attempts, worker = stored[held[0]]
    assert attempts == 1 and not worker.endswith(f":{victim.pid}")
    assert completions(tmp_path).count(held[0]) == 1
    assert all(r["n_missing"] == 0 for r in reports)
    by_victim = sum(w.endswith(f":{victim.pid}") for _, _, w in stored.values())
    assert sum(r["n_computed"] for r in reports) + by_victim == n
    assert time.time() - killed_at >= 2.0
