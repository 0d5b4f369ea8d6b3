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
"""
from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

SCHEMA_VERSION = 1

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
"""


def to_jsonable(x: Any) -> Any:
    """Plain JSON types (dict/list/str/float/int/bool/None) from results.

    numpy / torch scalars become Python numbers, arrays become lists, tuples
    become lists; floats are kept as they are (inf and NaN included, written as
    JSON's non-standard Infinity / NaN, which :func:`json.loads` reads back).
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


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, floats in repr (round-trip) form.

    Used for the task key, so equal parameters always give equal text
    (``Params`` already turns 3 and 3.0 into the same float).
    """
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)


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
        path: database file; its directory is created if needed.
        version: the code version used in the keys (default: hdlora.code_version(), the release
                plus a hash of the sources, so results of changed code are never reused).
    """

    def __init__(self, path: str | os.PathLike, version: str | None = None) -> None:
        if version is None:
            from hdlora import code_version
            version = code_version()
        self.version = str(version)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute("PRAGMA busy_timeout=60000")
        self._con.executescript(_SCHEMA)
        self._con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # ----- context manager ---------------------------------------------------
    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- keys ----------------------------------------------------------------
    @staticmethod
    def key(kind: str, params: Mapping[str, Any], options: Mapping[str, Any]) -> Key:
        return (kind, canonical_json(params), canonical_json(options))

    # ----- reading ---------------------------------------------------------------
    _COLS = ("kind, params, options, version, status, result, error, warnings, wall_s, finished_at, "
             "run_id, worker, attempts")

    @staticmethod
    def _row(t: tuple) -> Row:
        return Row(kind=t[0], params=json.loads(t[1]), options=json.loads(t[2]), version=t[3], status=t[4],
                   result=None if t[5] is None else json.loads(t[5]), error=t[6],
                   warnings=json.loads(t[7]) if t[7] else [], wall_s=t[8], finished_at=t[9], run_id=t[10],
                   worker=t[11], attempts=t[12])

    def get(self, key: Key) -> Row | None:
        cur = self._con.execute(
            f"SELECT {self._COLS} FROM results WHERE kind=? AND params=? AND options=? AND version=?",
            (*key, self.version))
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
            cur = self._con.execute(f"SELECT {self._COLS} FROM results WHERE version=? ORDER BY id",
                                    (self.version,))
        for t in cur:
            yield self._row(t)

    def count(self) -> int:
        return int(self._con.execute("SELECT COUNT(*) FROM results WHERE version=?", (self.version,)).fetchone()[0])

    def runs(self) -> list[dict]:
        cur = self._con.execute("SELECT * FROM runs ORDER BY started_at")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, t)) for t in cur]

    # ----- writing -----------------------------------------------------------------
    def put(self, key: Key, *, status: str, result: Mapping | None = None, error: str | None = None,
            warnings: list | None = None, wall_s: float | None = None, run_id: str,
            worker: str | None = None) -> None:
        """Store one finished task and commit (a rerun of the same key replaces it, attempts += 1)."""
        if status not in ("ok", "failed"):
            raise ValueError(f"status must be 'ok' or 'failed', got {status!r}")
        result_json = None if result is None else json.dumps(to_jsonable(result), allow_nan=True)
        warn_json = json.dumps([str(w) for w in warnings]) if warnings else None
        wall = None if wall_s is None or not math.isfinite(wall_s) else float(wall_s)
        self._con.execute(
            "INSERT INTO results (kind, params, options, version, status, result, error, warnings, wall_s, "
            "finished_at, run_id, worker) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (kind, params, options, version) DO UPDATE SET status=excluded.status, "
            "result=excluded.result, error=excluded.error, warnings=excluded.warnings, wall_s=excluded.wall_s, "
            "finished_at=excluded.finished_at, run_id=excluded.run_id, worker=excluded.worker, "
            "attempts=results.attempts + 1",
            (*key, self.version, status, result_json, error, warn_json, wall, utc_now(), run_id, worker))

    def start_run(self, run_id: str, *, sweep: str, source: str, executor: str, n_tasks: int) -> None:
        self._con.execute(
            "INSERT INTO runs (run_id, started_at, sweep, source, executor, host, version, n_tasks, n_computed, "
            "n_failed, state) VALUES (?,?,?,?,?,?,?,?,0,0,'running')",
            (run_id, utc_now(), sweep, source, executor, socket.gethostname(), self.version, n_tasks))

    def end_run(self, run_id: str, *, n_computed: int, n_failed: int, state: str) -> None:
        self._con.execute("UPDATE runs SET finished_at=?, n_computed=?, n_failed=?, state=? WHERE run_id=?",
                          (utc_now(), n_computed, n_failed, state, run_id))

    # ----- export ------------------------------------------------------------------
    def frame(self, all_versions: bool = False):
        """Every stored row as a tidy pandas DataFrame (parameters, options and scalar results as columns)."""
        import pandas as pd

        records = [flatten_row(r) for r in self.rows(all_versions)]
        return pd.DataFrame.from_records(records)


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
    rec.update({"status": r.status, "error": r.error, "wall_s": r.wall_s, "finished_at": r.finished_at,
                "run_id": r.run_id, "version": r.version, "attempts": r.attempts})
    if r.result:
        for k, v in flatten(r.result).items():
            rec[k if k not in rec else f"result.{k}"] = v
    return rec


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
