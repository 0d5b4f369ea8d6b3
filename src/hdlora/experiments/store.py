"""The results database of a sweep: one SQLite row per finished task.

A task is identified by its *key*: (kind, canonical JSON of its parameters,
canonical JSON of its options, package version).  The sweep's parent process
writes one row per task, and commits it, the moment the task's result arrives,
so killing the sweep at any point (even with SIGKILL) loses nothing that had
finished: the database is in WAL mode, which is durable against the death of
the writing process (``synchronous=NORMAL`` only trades durability against a
power loss, not against a process kill).

Rows have ``status`` 'ok' (result JSON present) or 'failed' (error text, with
the traceback).  ``run_id`` names the sweep invocation that computed the row,
so a resumed sweep can be checked not to have recomputed anything.

JSON columns hold strict JSON (SQLite's ``json_extract`` reads them): the
non-finite floats are the strings ``"inf"``, ``"-inf"`` and ``"nan"``
(:func:`to_strict`), turned back into floats on reading (:func:`from_strict`);
rows written by older versions with bare ``Infinity`` / ``NaN`` stay readable.

Several processes may run sweeps on one database at once: a task is *claimed*
in the ``leases`` table (owner, heartbeat, expiry; taken in a ``BEGIN
IMMEDIATE`` transaction) before it is computed, so each task is computed once;
a lease not renewed (the owner died) expires and the task is taken over.  This
relies on SQLite's locking and WAL, which need a local file system: **never put
a results database on a network file system** (NFS, SMB, Lustre...); to spread
work over several machines, run one sweep against one Dask scheduler instead.

Opening checks that the file is a results database of hdlora (its SQLite
``application_id``, or the tables of older versions) and refuses anything else
with a :class:`StoreError` (one line); ``Store(path, readonly=True)`` opens an
existing database without writing anything to it (``mode=ro``), for plans,
exports and plots.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
#: SQLite ``PRAGMA application_id`` of an hdlora results database ("hdLR").
APPLICATION_ID = 0x68644C52
_OUR_TABLES = {"results", "runs", "meta"}
_SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(Exception):
    """The results database cannot be used (not ours, unreadable, read-only, ...); a one-line message."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id          INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL,
    params      TEXT NOT NULL,      -- canonical JSON of the Params fields
    options     TEXT NOT NULL,      -- canonical JSON of the task options
    version     TEXT NOT NULL,      -- hdlora.__version__ that computed it
    status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    result      TEXT,               -- JSON object (status 'ok')
    error       TEXT,               -- error text with traceback (status 'failed')
    warnings    TEXT,               -- JSON list of warning messages raised by the task
    wall_s      REAL,               -- wall time of the task itself, in the worker
    finished_at TEXT NOT NULL,      -- ISO 8601, UTC, when the parent stored it
    run_id      TEXT NOT NULL,      -- sweep invocation that computed it
    worker      TEXT,               -- host:pid of the worker process
    attempts    INTEGER NOT NULL DEFAULT 1,
    UNIQUE (kind, params, options, version)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    sweep       TEXT,               -- sweep name
    source      TEXT,               -- sweep file
    executor    TEXT,               -- 'local:N', 'serial' or the scheduler address
    host        TEXT,
    version     TEXT,
    n_tasks     INTEGER,
    n_computed  INTEGER,
    n_failed    INTEGER,
    state       TEXT                -- 'running', 'finished', 'interrupted'
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS leases (
    kind        TEXT NOT NULL,
    params      TEXT NOT NULL,
    options     TEXT NOT NULL,
    version     TEXT NOT NULL,
    owner       TEXT NOT NULL,      -- host:pid:run_id of the sweep computing it
    heartbeat   REAL NOT NULL,      -- time.time() of the owner's last renewal
    expires     REAL NOT NULL,      -- time.time() after which anyone may take the task over
    PRIMARY KEY (kind, params, options, version)
);
"""


def to_jsonable(x: Any) -> Any:
    """Plain JSON types (dict/list/str/float/int/bool/None) from results.

    numpy / torch scalars become Python numbers, arrays become lists, tuples
    become lists; floats are kept as they are (inf and NaN included; :func:`to_strict`
    turns them into strict JSON for storage).
    """
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (str, bool, int, float)) or x is None:
        return x
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return to_jsonable(x.to_dict())
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy arrays and scalars, torch tensors
        return to_jsonable(x.tolist())
    if hasattr(x, "item") and callable(x.item):
        return to_jsonable(x.item())
    raise TypeError(f"cannot store a value of type {type(x).__name__} as JSON: {x!r}")


#: how the non-finite floats are written in the database (strict JSON): the strings of the CLI's stdout
#: (``hdlora.cli.dumps`` writes inf as "inf" too) and "nan", which reads back as NaN (not as null).
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def to_strict(x: Any) -> Any:
    """:func:`to_jsonable`, with inf / -inf / NaN as the strings "inf" / "-inf" / "nan" (strict JSON)."""
    x = to_jsonable(x)
    return _strict(x)


def _strict(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_strict(v) for v in x]
    return x


def from_strict(x: Any) -> Any:
    """Inverse of :func:`to_strict`: the strings "inf", "-inf", "nan" become floats again."""
    if isinstance(x, str):
        return _NONFINITE.get(x, x)
    if isinstance(x, dict):
        return {k: from_strict(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_strict(v) for v in x]
    return x


def loads(text: str) -> Any:
    """Read a JSON column (strict, or an older row with bare Infinity / NaN)."""
    return from_strict(json.loads(text))


def canonical_json(obj: Any) -> str:
    """Deterministic strict JSON: sorted keys, no spaces, floats in repr (round-trip) form, inf as "inf".

    Used for the task key, so equal parameters always give equal text
    (``Params`` already turns 3 and 3.0 into the same float).
    """
    return json.dumps(to_strict(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Row:
    """One stored task."""

    kind: str
    params: dict
    options: dict
    version: str
    status: str
    result: dict | None
    error: str | None
    warnings: list
    wall_s: float | None
    finished_at: str
    run_id: str
    worker: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.status == "ok"


Key = tuple[str, str, str]  # (kind, params JSON, options JSON); the version is the store's


class Store:
    """A results database (SQLite file), bound to one package version.

    Args:
        path: database file; its directory is created if needed (not when ``readonly``).
        version: the code version used in the keys (default: hdlora.code_version(), the release
                plus a hash of the sources, so results of changed code are never reused).
        readonly: open an existing database for reading only: nothing is written to it (no
                schema, no metadata), so read-only and immutable files can be planned, exported
                and plotted.

    Raises:
        StoreError: the path is a directory, not an SQLite file, another application's SQLite
            file, unreadable, or (unless ``readonly``) not writable; or (``readonly``) missing.
    """

    def __init__(self, path: str | os.PathLike, version: str | None = None, *, readonly: bool = False) -> None:
        if version is None:
            from hdlora import code_version

            version = code_version()
        self.version = str(version)
        self.path = Path(path)
        self.readonly = readonly
        self._con = self._open()

    # ----- opening: refuse anything that is not a usable results database, in one line -----------------
    def _fail(self, what: str, way_out: str) -> StoreError:
        return StoreError(f"results database {self.path}: {what}; {way_out}")

    def _open(self) -> sqlite3.Connection:
        p = self.path
        if p.is_dir():
            raise self._fail("is a directory, not a database file", "give the path of a file (e.g. results.sqlite)")
        exists = p.exists()
        if exists:
            try:
                with open(p, "rb") as fh:
                    head = fh.read(16)
            except OSError as exc:
                raise self._fail(
                    f"cannot be read ({exc.strerror})", "fix its permissions or choose another file"
                ) from None
            if head and head != _SQLITE_HEADER:
                raise self._fail(
                    "is not an SQLite database (not written by hdlora)",
                    "choose another file; this one is left untouched",
                )
        if self.readonly:
            if not exists:
                raise self._fail("does not exist", "run the sweep first, or give the right file")
            return self._connect_readonly()
        # writing: everything that can be checked before SQLite touches the file
        parent = p.parent
        if not exists:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._fail(
                    f"its directory cannot be created ({exc.strerror})", "choose a writable location"
                ) from None
        if exists and not os.access(p, os.W_OK):
            raise self._fail(
                "is read-only (permissions or the immutable attribute)",
                "running a sweep stores results into it: copy it somewhere writable, "
                "or use --plan / --plot-only, which only read",
            )
        if not os.access(parent, os.W_OK | os.X_OK):
            raise self._fail(
                f"the directory {parent} is not writable (SQLite needs its -wal and -shm files next to the database)",
                "choose a writable directory",
            )
        try:
            con = sqlite3.connect(p, timeout=60.0, isolation_level=None)
            self._check_ours(con)
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            if con.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            con.executescript(_SCHEMA)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise self._fail(
                f"cannot be opened for writing ({exc})",
                "check the file system (a local disk, not NFS) and the permissions",
            ) from None
        return con

    def _connect_readonly(self) -> sqlite3.Connection:
        uri = "file:" + str(self.path.resolve()).replace("?", "%3f").replace("#", "%23")
        wal = Path(str(self.path) + "-wal")
        queries = ["?mode=ro"]
        if not (wal.exists() and wal.stat().st_size > 0):
            # no pending WAL content: where no -shm file can be made (read-only directory) the file can
            # be read as immutable without missing anything
            queries.append("?mode=ro&immutable=1")
        last: Exception | None = None
        for query in queries:
            try:
                con = sqlite3.connect(uri + query, uri=True, timeout=60.0, isolation_level=None)
                con.execute("PRAGMA busy_timeout=60000")
                con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            except sqlite3.DatabaseError as exc:
                last = exc
                continue
            self._check_ours(con)
            tables = {t[0] for t in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for stmt in _SCHEMA.split(";"):  # tables not there yet (a new file, an older schema): empty temp ones
                words = stmt.split()
                if len(words) > 5 and words[5] not in tables:
                    con.execute(stmt.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE", 1))
            return con
        raise self._fail(f"cannot be read ({last})", "fix its permissions or choose another file")

    def _check_ours(self, con: sqlite3.Connection) -> None:
        """Refuse another application's SQLite file (nothing is written to it)."""
        try:
            app = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {t[0] for t in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise self._fail(
                f"is not a readable SQLite database ({exc})", "choose another file; this one is left untouched"
            ) from None
        if app == APPLICATION_ID:
            return
        # an empty file, or a database written by an older hdlora (before the application_id was set)
        if app == 0 and (not tables or (_OUR_TABLES <= tables and self._old_schema_ok(con))):
            return
        other = f"application_id {app:#x}" if app else f"tables {sorted(tables)[:5]}"
        raise self._fail(
            f"is another application's SQLite database ({other})",
            "give hdlora its own file; this one is left untouched",
        )

    @staticmethod
    def _old_schema_ok(con: sqlite3.Connection) -> bool:
        cols = {t[1] for t in con.execute("PRAGMA table_info(results)")}
        return {"kind", "params", "options", "version", "status", "result"} <= cols

    # ----- context manager ---------------------------------------------------
    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- keys ----------------------------------------------------------------
    @staticmethod
    def key(kind: str, params: Mapping[str, Any], options: Mapping[str, Any]) -> Key:
        return (kind, canonical_json(params), canonical_json(options))

    # ----- reading ---------------------------------------------------------------
    _COLS = (
        "kind, params, options, version, status, result, error, warnings, wall_s, finished_at, run_id, worker, attempts"
    )

    @staticmethod
    def _row(t: tuple) -> Row:
        return Row(
            kind=t[0],
            params=loads(t[1]),
            options=loads(t[2]),
            version=t[3],
            status=t[4],
            result=None if t[5] is None else loads(t[5]),
            error=t[6],
            warnings=json.loads(t[7]) if t[7] else [],
            wall_s=t[8],
            finished_at=t[9],
            run_id=t[10],
            worker=t[11],
            attempts=t[12],
        )

    def get(self, key: Key) -> Row | None:
        cur = self._con.execute(
            f"SELECT {self._COLS} FROM results WHERE kind=? AND params=? AND options=? AND version=?",
            (*key, self.version),
        )
        t = cur.fetchone()
        return None if t is None else self._row(t)

    def lookup(self, keys: Iterable[Key]) -> dict[Key, Row]:
        """The stored rows (of this version) among ``keys``."""
        wanted = set(keys)
        out: dict[Key, Row] = {}
        cur = self._con.execute(f"SELECT {self._COLS} FROM results WHERE version=?", (self.version,))
        for t in cur:
            k = (t[0], t[1], t[2])
            if k in wanted:
                out[k] = self._row(t)
        return out

    def rows(self, all_versions: bool = False) -> Iterator[Row]:
        if all_versions:
            cur = self._con.execute(f"SELECT {self._COLS} FROM results ORDER BY id")
        else:
            cur = self._con.execute(f"SELECT {self._COLS} FROM results WHERE version=? ORDER BY id", (self.version,))
        for t in cur:
            yield self._row(t)

    def count(self) -> int:
        return int(self._con.execute("SELECT COUNT(*) FROM results WHERE version=?", (self.version,)).fetchone()[0])

    def runs(self) -> list[dict]:
        cur = self._con.execute("SELECT * FROM runs ORDER BY started_at")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, t)) for t in cur]

    # ----- writing -----------------------------------------------------------------
    def put(
        self,
        key: Key,
        *,
        status: str,
        result: Mapping | None = None,
        error: str | None = None,
        warnings: list | None = None,
        wall_s: float | None = None,
        run_id: str,
        worker: str | None = None,
        owner: str | None = None,
    ) -> None:
        """Store one finished task and commit (a rerun of the same key replaces it, attempts += 1).

        ``owner``: the claim (:meth:`claim`) of this task is released in the same transaction.
        """
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        result_json = None if result is None else json.dumps(to_strict(result), allow_nan=False)
        warn_json = json.dumps([str(w) for w in warnings]) if warnings else None
        wall = None if wall_s is None or not math.isfinite(wall_s) else float(wall_s)
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            self._insert(key, status, result_json, error, warn_json, wall, run_id, worker)
            if owner is not None:
                con.execute(
                    "DELETE FROM leases WHERE kind=? AND params=? AND options=? AND version=? AND owner=?",
                    (*key, self.version, owner),
                )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _insert(self, key, status, result_json, error, warn_json, wall, run_id, worker) -> None:
        self._con.execute(
            "INSERT INTO results (kind, params, options, version, status, result, error, warnings, wall_s, "
            "finished_at, run_id, worker) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (kind, params, options, version) DO UPDATE SET status=excluded.status, "
            "result=excluded.result, error=excluded.error, warnings=excluded.warnings, wall_s=excluded.wall_s, "
            "finished_at=excluded.finished_at, run_id=excluded.run_id, worker=excluded.worker, "
            "attempts=results.attempts + 1",
            (*key, self.version, status, result_json, error, warn_json, wall, utc_now(), run_id, worker),
        )

    # ----- claims: several sweeps on one database split the work ---------------------------------------------
    def claim(self, key: Key, owner: str, lease_s: float, redo_before: str | None = None) -> str:
        """Try to take ``key`` for computing, in one ``BEGIN IMMEDIATE`` transaction.

        Returns 'done' (a row is stored: nothing to compute; with ``redo_before``, a failed row
        stored before that time does not count), 'busy' (another owner holds a live lease), or
        'claimed' (this owner holds the lease until ``lease_s`` seconds from now; renew it with
        :class:`Heartbeat`; :meth:`put` with ``owner`` releases it).  An expired lease (its owner
        died or stalled) is taken over.
        """
        con = self._con
        now = time.time()
        con.execute("BEGIN IMMEDIATE")
        try:
            row = con.execute(
                "SELECT status, finished_at FROM results WHERE kind=? AND params=? AND options=? AND version=?",
                (*key, self.version),
            ).fetchone()
            if row is not None and (row[0] == "ok" or redo_before is None or row[1] >= redo_before):
                state = "done"
            else:
                lease = con.execute(
                    "SELECT owner, expires FROM leases WHERE kind=? AND params=? AND options=? AND version=?",
                    (*key, self.version),
                ).fetchone()
                if lease is not None and lease[0] != owner and lease[1] > now:
                    state = "busy"
                else:
                    con.execute(
                        "INSERT INTO leases (kind, params, options, version, owner, heartbeat, expires) "
                        "VALUES (?,?,?,?,?,?,?) ON CONFLICT (kind, params, options, version) DO UPDATE SET "
                        "owner=excluded.owner, heartbeat=excluded.heartbeat, expires=excluded.expires",
                        (*key, self.version, owner, now, now + lease_s),
                    )
                    state = "claimed"
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return state

    def release(self, owner: str) -> None:
        """Drop every lease of ``owner`` (end of its run, or Ctrl-C)."""
        self._con.execute("DELETE FROM leases WHERE owner=?", (owner,))

    def leases(self) -> list[dict]:
        cur = self._con.execute("SELECT kind, params, options, version, owner, heartbeat, expires FROM leases")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, t)) for t in cur]

    def start_run(self, run_id: str, *, sweep: str, source: str, executor: str, n_tasks: int) -> None:
        self._con.execute(
            "INSERT INTO runs (run_id, started_at, sweep, source, executor, host, version, n_tasks, n_computed, "
            "n_failed, state) VALUES (?,?,?,?,?,?,?,?,0,0,'running')",
            (run_id, utc_now(), sweep, source, executor, socket.gethostname(), self.version, n_tasks),
        )

    def end_run(self, run_id: str, *, n_computed: int, n_failed: int, state: str) -> None:
        self._con.execute(
            "UPDATE runs SET finished_at=?, n_computed=?, n_failed=?, state=? WHERE run_id=?",
            (utc_now(), n_computed, n_failed, state, run_id),
        )

    # ----- export ------------------------------------------------------------------
    def frame(self, all_versions: bool = False):
        """Every stored row as a tidy pandas DataFrame (parameters, options and scalar results as columns)."""
        import pandas as pd

        records = [flatten_row(r) for r in self.rows(all_versions)]
        return pd.DataFrame.from_records(records)


class Heartbeat:
    """A thread of the sweep's parent process that keeps its leases alive while tasks run.

    Every ``lease_s / 4`` seconds it moves the expiry of every lease of ``owner`` to now +
    ``lease_s`` (its own SQLite connection).  If the process dies, the renewals stop and the
    leases expire: other sweeps on the database then take those tasks over.
    """

    def __init__(self, path: str | os.PathLike, owner: str, lease_s: float) -> None:
        self.path, self.owner, self.lease_s = Path(path), owner, float(lease_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hdlora-lease-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            con.execute("PRAGMA busy_timeout=60000")
            while not self._stop.wait(self.lease_s / 4.0):
                now = time.time()
                try:
                    con.execute(
                        "UPDATE leases SET heartbeat=?, expires=? WHERE owner=?", (now, now + self.lease_s, self.owner)
                    )
                except sqlite3.DatabaseError:  # pragma: no cover (busy for a full minute): try again next beat
                    pass
        finally:
            con.close()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> flat dict with dotted keys; lists are kept only when short and scalar."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        elif isinstance(v, list):
            continue  # histories, per-seed arrays: not table columns (they stay in the JSON)
        else:
            out[name] = v
    return out


def flatten_row(r: Row) -> dict[str, Any]:
    rec: dict[str, Any] = {"kind": r.kind}
    rec.update(r.params)
    rec.update({k: v for k, v in flatten(r.options).items()})
    rec.update(
        {
            "status": r.status,
            "error": r.error,
            "wall_s": r.wall_s,
            "finished_at": r.finished_at,
            "run_id": r.run_id,
            "version": r.version,
            "attempts": r.attempts,
        }
    )
    if r.result:
        for k, v in flatten(r.result).items():
            rec[k if k not in rec else f"result.{k}"] = v
    return rec


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
