"""The results database: keys, round trips, versions, durability of each committed row."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from hdlora import Params
from hdlora.experiments.store import Store, canonical_json, to_jsonable


def test_canonical_key_is_independent_of_spelling_and_order():
    a = Store.key("theory", Params(alpha=1, tokens=3.0).to_dict(), {"n_mc": 100, "tol": 1e-8})
    b = Store.key("theory", Params(tokens=3, alpha=1.0).to_dict(), {"tol": 1e-8, "n_mc": 100})
    c = Store.key("theory", Params(alpha=1.0000000001).to_dict(), {"n_mc": 100, "tol": 1e-8})
    assert a == b and a != c
    assert canonical_json({"x": math.inf}) == '{"x":"inf"}'  # strict JSON (SQLite's json_extract reads it)


def test_round_trip_with_inf_nan_and_numpy(tmp_path):
    with Store(tmp_path / "r.sqlite", version="1.0") as st:
        key = Store.key("k", Params(lam_ft=math.inf).to_dict(), {})
        result = {
            "a": np.float64(0.25),
            "b": math.inf,
            "c": math.nan,
            "arr": np.arange(3),
            "nested": {"x": 1},
            "flag": np.bool_(True),
        }
        st.put(key, status="ok", result=result, wall_s=0.5, run_id="r1", warnings=["NonConvergenceWarning: x"])
        row = st.get(key)
    assert row.ok and row.params["lam_ft"] == math.inf and row.run_id == "r1" and row.attempts == 1
    assert row.result["a"] == 0.25 and row.result["b"] == math.inf and math.isnan(row.result["c"])
    assert row.result["arr"] == [0, 1, 2] and row.result["nested"] == {"x": 1} and row.result["flag"] is True
    assert row.warnings == ["NonConvergenceWarning: x"]


def test_rerun_replaces_and_counts_attempts_versions_are_separate(tmp_path):
    path = tmp_path / "r.sqlite"
    key = Store.key("k", Params().to_dict(), {"dim": 10})
    with Store(path, version="1.0") as st:
        st.put(key, status="failed", error="boom", run_id="r1")
        st.put(key, status="ok", result={"v": 1.0}, run_id="r2")
        row = st.get(key)
        assert row.ok and row.error is None and row.attempts == 2 and row.run_id == "r2" and st.count() == 1
        assert st._con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(path, version="2.0") as st:  # another package version: nothing stored yet
        assert st.get(key) is None and st.count() == 0 and len(list(st.rows(all_versions=True))) == 1
    df = Store(path, version="1.0").frame()
    assert list(df["v"]) == [1.0] and df["dim"].tolist() == [10] and df["status"].tolist() == ["ok"]


def test_each_put_is_committed_when_it_returns(tmp_path):
    """A writer killed with SIGKILL right after put() (no close) leaves its rows readable."""
    path = tmp_path / "r.sqlite"
    code = textwrap.dedent(f"""
        import os, signal
        from hdlora.experiments.store import Store
        st = Store({str(path)!r}, version="1.0")
        for i in range(3):
            st.put(("k", str(i), "{{}}"), status="ok", result={{"i": i}}, run_id="dead")
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert os.path.exists(str(path) + "-wal")  # the writer died before any checkpoint / close
    with Store(path, version="1.0") as st:
        assert sorted(r.result["i"] for r in st.rows()) == [0, 1, 2]


def test_to_jsonable_rejects_unknown_objects():
    class Opaque:
        pass

    try:
        to_jsonable({"x": Opaque()})
    except TypeError as exc:
        assert "Opaque" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected TypeError")
