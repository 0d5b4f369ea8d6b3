"""The results database refuses what it cannot use, in one line, and never writes where it only reads.

Root ignores permission bits, and CI runs as root: the permission cases run the command as an
unprivileged user (``setpriv --reuid=65534``, in a world-traversable temporary directory), and
the read-only database case also uses ``chattr +i`` (immutable even for root).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hdlora import Params
from hdlora.experiments.store import Store, StoreError

TESTS = Path(__file__).resolve().parents[1]
NOBODY = 65534

SWEEP = """
[sweep]
database = "s.sqlite"
[axes]
alpha_ft = [1.0, 2.0, 3.0]
[run.'_sweep_kinds:arith']
"""


def _can_drop_privileges() -> bool:
    if os.geteuid() != 0:
        return True  # permission bits already apply to this user
    if shutil.which("setpriv") is None:
        return False
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "true"])
    return r.returncode == 0


def _chattr_works(d: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    f = d / "probe"
    f.write_text("x")
    ok = subprocess.run(["chattr", "+i", str(f)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["chattr", "-i", str(f)], check=True)
    f.unlink()
    return ok


unprivileged = pytest.mark.skipif(
    not _can_drop_privileges(), reason="running as root without setpriv: root ignores permission bits"
)


@pytest.fixture
def pub():
    """A temporary directory that the unprivileged user can traverse (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="hdlora-store-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        subprocess.run(["chattr", "-i", str(p)], capture_output=True) if os.geteuid() == 0 else None
        try:
            p.chmod(0o755 if p.is_dir() else 0o644)
        except OSError:
            pass
    shutil.rmtree(d, ignore_errors=True)


def sweep(*args: str, as_nobody: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        HOME="/tmp",
    )
    cmd = [sys.executable, "-m", "hdlora.experiments.cli", *args, "--no-progress", "--workers", "1"]
    if as_nobody and os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_sweep(d: Path, extra: str = "") -> Path:
    f = d / "s.toml"
    f.write_text(textwrap.dedent(SWEEP) + extra)
    f.chmod(0o644)
    return f


# ----- files that are not ours -------------------------------------------------------------------------
def test_garbage_file_is_refused_and_left_untouched(pub):
    f = make_sweep(pub)
    db = pub / "s.sqlite"
    db.write_bytes(b"this is my thesis, not a database\n" * 100)
    before = digest(db)
    for args in ([], ["--plan"]):
        one_line_error(sweep(str(f), *args), str(db), "not an SQLite database")
    assert digest(db) == before and not (pub / "s.sqlite-wal").exists()


def test_another_applications_sqlite_file_is_refused_without_adding_tables(pub):
    f = make_sweep(pub)
    db = pub / "s.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE users (name TEXT)")
    con.execute("INSERT INTO users VALUES ('alice')")
    con.commit()
    con.close()
    for args in ([], ["--plan"]):
        one_line_error(sweep(str(f), *args), "another application", "left untouched")
    con = sqlite3.connect(db)
    tables = {t[0] for t in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert tables == {"users"}
    with pytest.raises(StoreError, match="another application"):
        Store(db, version="1")


def test_directory_is_refused(pub):
    f = make_sweep(pub)
    (pub / "dir.sqlite").mkdir()
    one_line_error(sweep(str(f), "--db", str(pub / "dir.sqlite")), "is a directory")


def test_our_database_is_recognised_and_an_old_one_without_application_id_is_adopted(pub):
    db = pub / "r.sqlite"
    with Store(db, version="1") as st:
        st.put(Store.key("k", {}, {}), status="ok", result={"v": 1.0}, run_id="r")
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA application_id").fetchone()[0] == 0x68644C52
    con.execute("PRAGMA application_id=0")  # as written by hdlora before the id existed
    con.commit()
    con.close()
    with Store(db, version="1", readonly=True) as st:
        assert st.count() == 1
    with Store(db, version="1") as st:
        assert st.count() == 1


# ----- permissions: as an unprivileged user, and immutable files ----------------------------------------
@unprivileged
def test_read_only_directory_is_refused_before_anything_runs(pub):
    f = make_sweep(pub)
    ro = pub / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    one_line_error(sweep(str(f), "--db", str(ro / "new.sqlite"), as_nobody=True), "not writable")
    assert not (ro / "new.sqlite").exists()


def _complete_database(pub: Path, f: Path) -> Path:
    r = sweep(str(f))
    assert r.returncode == 0, r.stderr
    db = pub / "s.sqlite"
    assert db.exists()
    return db


@unprivileged
def test_read_only_database_can_be_planned_and_exported_but_not_extended(pub):
    f = make_sweep(pub)
    db = _complete_database(pub, f)
    for p in pub.iterdir():
        p.chmod(0o444 if p.is_file() else 0o555)
    pub.chmod(0o555)
    out = Path(tempfile.mkdtemp(prefix="hdlora-out-"))
    out.chmod(0o777)
    try:
        before = digest(db)
        r = sweep(str(f), "--plan", as_nobody=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["stored_ok"] == 3
        r = sweep(str(f), "--export", str(out / "x.csv"), as_nobody=True)  # complete: nothing to write
        assert r.returncode == 0, r.stderr
        assert (out / "x.csv").read_text().count("\n") == 4
        g = pub / "more.toml"
        pub.chmod(0o755)
        g.write_text(textwrap.dedent(SWEEP).replace("3.0]", "3.0, 4.0]"))
        pub.chmod(0o555)
        one_line_error(sweep(str(g), "--db", str(db), as_nobody=True), "read-only")
        assert digest(db) == before
    finally:
        pub.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)


def test_immutable_database_can_be_planned_and_exported_but_not_extended(pub):
    if not _chattr_works(pub):
        pytest.skip("chattr +i is not available here (needs root and a file system with the immutable flag)")
    f = make_sweep(pub)
    db = _complete_database(pub, f)
    for side in ("-wal", "-shm"):
        assert not (pub / f"s.sqlite{side}").exists()
    subprocess.run(["chattr", "+i", str(db)], check=True)
    try:
        before = digest(db)
        r = sweep(str(f), "--plan")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["stored_ok"] == 3
        r = sweep(str(f), "--export", str(pub / "x.csv"))
        assert r.returncode == 0, r.stderr
        assert (pub / "x.csv").read_text().count("\n") == 4
        (pub / "s.toml").write_text(textwrap.dedent(SWEEP).replace("3.0]", "3.0, 4.0]"))
        one_line_error(sweep(str(f)), "read-only")
        assert digest(db) == before
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


@unprivileged
def test_export_into_a_read_only_directory_is_refused_before_the_sweep_runs(pub):
    f = make_sweep(pub)
    ro = pub / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    one_line_error(sweep(str(f), "--export", str(ro / "out.csv"), as_nobody=True), str(ro), "not writable")
    assert not (pub / "s.sqlite").exists()  # nothing ran, nothing was created


def test_reading_opens_nothing_for_writing(tmp_path):
    db = tmp_path / "r.sqlite"
    with pytest.raises(StoreError, match="does not exist"):
        Store(db, version="1", readonly=True)
    assert not db.exists()
    with Store(db, version="1") as st:
        st.put(Store.key("k", {}, {}), status="ok", result={"v": 1.0}, run_id="r")
    with Store(db, version="1", readonly=True) as st:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            st._con.execute("INSERT INTO meta VALUES ('x', 'y')")


# ----- strict JSON in the database -------------------------------------------------------------------------
def test_json_columns_are_strict_so_sqlite_json_extract_reads_them(tmp_path):
    db = tmp_path / "r.sqlite"
    key = Store.key("theory", Params(lam_ft=math.inf).to_dict(), {"n_mc": 100})
    with Store(db, version="1") as st:
        st.put(
            key,
            status="ok",
            result={"a": 0.5, "b": math.inf, "c": -math.inf, "d": math.nan, "l": [1.0, math.nan]},
            run_id="r",
        )
        row = st.get(key)
    assert row.params["lam_ft"] == math.inf and row.result["b"] == math.inf and row.result["c"] == -math.inf
    assert math.isnan(row.result["d"]) and math.isnan(row.result["l"][1]) and row.result["a"] == 0.5
    con = sqlite3.connect(db)
    got = con.execute(
        "SELECT json_extract(result, '$.a'), json_extract(result, '$.b'), json_extract(result, '$.d'), "
        "json_extract(params, '$.lam_ft'), json_valid(result), json_valid(params), json_valid(options) "
        "FROM results"
    ).fetchone()
    con.close()
    assert got == (0.5, "inf", "nan", "inf", 1, 1, 1)


def test_old_rows_with_bare_infinity_and_nan_stay_readable(tmp_path):
    db = tmp_path / "r.sqlite"
    with Store(db, version="1") as st:
        pass
    con = sqlite3.connect(db)
    con.execute(
        "INSERT INTO results (kind, params, options, version, status, result, finished_at, run_id) "
        "VALUES ('k', '{\"lam_ft\":Infinity}', '{}', '1', 'ok', '{\"b\":Infinity,\"c\":NaN}', 'now', 'r')"
    )
    con.commit()
    con.close()
    with Store(db, version="1", readonly=True) as st:
        (row,) = list(st.rows())
    assert row.params["lam_ft"] == math.inf and row.result["b"] == math.inf and math.isnan(row.result["c"])
