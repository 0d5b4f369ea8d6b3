"""Sweeps: a TOML file -> a grid of tasks -> an executor -> the results database.

File format (every table but ``[run]`` optional; paths relative to the file)::

    [sweep]
    name = "fig1"                        # default: the file name
    database = "results/fig1.sqlite"     # default: <file name>.sqlite next to the file
    continuation = "alpha_ft"            # warm-start axis (default: the first axis; "" for none)

    [params]                             # fixed Params fields (the others keep their defaults)
    alpha = 0.1
    tokens = 3
    lam_ft = 0.5

    [axes]                               # grid axes: Params fields; the grid is their product
    alpha_ft = [0.5, 1, 2, 3]            # a list of values, or
    noise = {start = 0.01, stop = 1.0, num = 5, log = true}   # num points, log-spaced if log

    [run]
    baselines = ["frozen", "lora_only"]  # theory at lam_ft = inf / lam = inf (A.7), theory options

    [run.theory]                         # one table per task kind; its keys are the kind's options
    n_mc = 30000
    [run.simulate]
    dim = 150
    seeds = 4
    [run.bayes_optimal]

Everything is validated before anything runs (:func:`load_sweep`): unknown
tables or keys, unknown parameters, empty or malformed axes, unknown task kinds
or options, and every ``Params`` of the grid is constructed (a ``ParamError``
is reported with its grid point).  Errors are :class:`SweepError` naming the
file and the key.

Execution (:func:`run_sweep`): tasks whose key is already in the database are
skipped (failed ones too, unless ``retry_failed``: a failure is usually
deterministic, so it is not silently recomputed at every resume; the summary
counts them).  Theory points along the continuation axis form a *chain*: they
run in order, each warm-started (``init``) from its neighbour's converged
result, each stored as its own row as soon as it finishes.  Chains run in
parallel with each other and with the other tasks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdlora.params import ParamError, Params

from . import tasks as task_kinds
from .store import Key, Row, Store, canonical_json

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(Params))
_TOP_KEYS = ("sweep", "params", "axes", "run")
_SWEEP_KEYS = ("name", "database", "continuation", "description")


class SweepError(ValueError):
    """A bad sweep file; the message names the file and the offending key."""


# ----- the specification -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One thing to run at every grid point.

    Attributes:
        label: the name in the file and in the exports (``theory``, ``frozen``, ``simulate``, ...).
        kind: the registered task kind that computes it (``frozen`` -> ``theory``).
        options: keyword options of the task function.
        overrides: parameter changes applied at every point (``frozen``: lam_ft = inf).
    """

    label: str
    kind: str
    options: Mapping[str, Any]
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str
    database: Path
    fixed: Mapping[str, Any]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    runs: tuple[RunSpec, ...]
    continuation: str | None
    description: str = ""

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for _, v in self.axes)

    def points(self) -> list[tuple[int, ...]]:
        """Grid points as index tuples (C order over the axes as declared)."""
        return list(itertools.product(*(range(n) for n in self.shape)))

    def coords(self, point: Sequence[int]) -> dict[str, Any]:
        return {a: vals[i] for (a, vals), i in zip(self.axes, point)}


@dataclass(frozen=True)
class Task:
    """One unit of computation: a run at a grid point."""

    label: str
    kind: str
    params: Params
    options: Mapping[str, Any]
    point: tuple[int, ...]

    @property
    def key(self) -> Key:
        return Store.key(self.kind, self.params.to_dict(), self.options)


def _err(source: str, msg: str) -> SweepError:
    return SweepError(f"{source}: {msg}")


def _axis_values(source: str, name: str, spec: Any) -> tuple[Any, ...]:
    where = f"[axes] {name}"
    if isinstance(spec, list):
        if not spec:
            raise _err(source, f"{where}: empty axis (give at least one value)")
        for v in spec:
            if isinstance(v, (list, dict)):
                raise _err(source, f"{where}: values must be scalars, got {v!r}")
        return tuple(spec)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"start", "stop", "num", "log"})
        if unknown:
            raise _err(source, f"{where}: unknown key(s) {unknown}; a range is {{start, stop, num, log}}")
        missing = [k for k in ("start", "stop", "num") if k not in spec]
        if missing:
            raise _err(source, f"{where}: range needs {missing} (a range is {{start, stop, num, log}})")
        start, stop, num, log = spec["start"], spec["stop"], spec["num"], spec.get("log", False)
        if isinstance(num, bool) or not isinstance(num, int):
            raise _err(source, f"{where}: num must be an integer, got {num!r}")
        if num < 1:
            raise _err(source, f"{where}: empty axis (num = {num}, must be >= 1)")
        for k, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _err(source, f"{where}: {k} must be a finite number, got {v!r}")
        if not isinstance(log, bool):
            raise _err(source, f"{where}: log must be true or false, got {log!r}")
        if log and (start <= 0 or stop <= 0):
            raise _err(source, f"{where}: a log range needs start > 0 and stop > 0, got {start}, {stop}")
        if num == 1:
            return (float(start),)
        if log:
            a, b = math.log(start), math.log(stop)
            vals = [math.exp(a + (b - a) * i / (num - 1)) for i in range(num)]
            vals[0], vals[-1] = float(start), float(stop)
        else:
            vals = [start + (stop - start) * i / (num - 1) for i in range(num)]
            vals[-1] = float(stop)
        return tuple(float(v) for v in vals)
    raise _err(source, f"{where}: expected a list of values or {{start, stop, num, log}}, got {spec!r}")


def _check_keys(source: str, where: str, got: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(got) - set(allowed))
    if unknown:
        raise _err(source, f"{where}: unknown key(s) {unknown}; allowed: {list(allowed)}")


def parse_sweep(doc: Mapping[str, Any], source: str = "<sweep>", base_dir: str | Path = ".") -> SweepSpec:
    """Validate a parsed sweep document and build its :class:`SweepSpec` (nothing runs)."""
    _check_keys(source, "top level", doc, _TOP_KEYS)
    for t in _TOP_KEYS:
        if t in doc and not isinstance(doc[t], dict):
            raise _err(source, f"[{t}] must be a table")
    head = doc.get("sweep", {})
    _check_keys(source, "[sweep]", head, _SWEEP_KEYS)
    stem = Path(source).stem if source != "<sweep>" else "sweep"
    name = str(head.get("name", stem))
    db = Path(head.get("database", f"{stem}.sqlite"))
    database = db if db.is_absolute() else Path(os.path.normpath(Path(base_dir) / db))

    fixed = dict(doc.get("params", {}))
    for k in fixed:
        if k not in PARAM_FIELDS:
            raise _err(source, f"[params] unknown parameter {k!r}; allowed: {list(PARAM_FIELDS)}")
    try:
        Params(**fixed)
    except ParamError as exc:
        raise _err(source, f"[params] invalid value: {exc}") from None

    axes = []
    for a, spec in doc.get("axes", {}).items():
        if a not in PARAM_FIELDS:
            raise _err(source, f"[axes] unknown parameter {a!r}; allowed: {list(PARAM_FIELDS)}")
        if a in fixed:
            raise _err(source, f"[axes] {a!r} is also fixed in [params]; give it in one place")
        axes.append((a, _axis_values(source, a, spec)))

    cont = head.get("continuation", axes[0][0] if axes else "")
    if not isinstance(cont, str):
        raise _err(source, f'[sweep] continuation must be an axis name or "", got {cont!r}')
    if cont and cont not in [a for a, _ in axes]:
        raise _err(source, f"[sweep] continuation {cont!r} is not an axis; axes: {[a for a, _ in axes]}")

    runs = _parse_runs(source, doc.get("run"))
    spec = SweepSpec(
        name=name,
        source=source,
        database=database,
        fixed=fixed,
        axes=tuple(axes),
        runs=tuple(runs),
        continuation=cont or None,
        description=str(head.get("description", "")),
    )
    plan(spec)  # constructs (and so validates) every Params of the grid
    return spec


def _parse_runs(source: str, table: Any) -> list[RunSpec]:
    if not table:
        raise _err(
            source,
            "[run] is missing or empty: name at least one task kind, e.g. [run.theory]; "
            f"kinds: {sorted(task_kinds.REGISTRY) + sorted(task_kinds.BASELINES)}",
        )
    runs: dict[str, RunSpec] = {}
    baselines = table.get("baselines", [])
    if not isinstance(baselines, list):
        raise _err(source, f"[run] baselines must be a list of names, got {baselines!r}")
    items = [(k, v) for k, v in table.items() if k != "baselines"]
    theory_opts = table.get("theory", {}) if isinstance(table.get("theory", {}), dict) else {}
    for b in baselines:
        b = task_kinds.BASELINE_ALIASES.get(b, b) if isinstance(b, str) else b
        if b not in task_kinds.BASELINES:
            raise _err(source, f"[run] baselines: unknown baseline {b!r}; known: {sorted(task_kinds.BASELINES)}")
        items.append((b, dict(theory_opts)))
    for label, opts in items:
        if not isinstance(opts, dict):
            raise _err(source, f"[run] {label} must be a table of options (e.g. [run.{label}]), got {opts!r}")
        if label in runs:
            raise _err(source, f"[run] {label} is given twice")
        if label in task_kinds.BASELINES:
            kind, overrides = task_kinds.BASELINES[label]
        else:
            kind, overrides = label, {}
        try:
            task_kinds.check_options(kind, opts)
        except task_kinds.TaskKindError as exc:
            raise _err(source, f"[run.{label}] {exc}") from None
        if kind == "simulate":
            _check_simulate_options(source, label, opts)
        runs[label] = RunSpec(label=label, kind=kind, options=dict(opts), overrides=dict(overrides))
    return list(runs.values())


def _check_simulate_options(source: str, label: str, opts: Mapping[str, Any]) -> None:
    dim, seeds = opts.get("dim"), opts.get("seeds")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
        raise _err(source, f"[run.{label}] dim (D) must be an integer >= 2, got {dim!r}")
    ok = (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1) or (
        isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    )
    if not ok:
        raise _err(
            source, f"[run.{label}] seeds must be an integer >= 1 or a non-empty list of integer seeds, got {seeds!r}"
        )


def check_local_devices(spec: SweepSpec) -> None:
    """Raise SweepError when a run asks for a device this machine lacks (``device = "cuda"`` without a GPU).

    Checked for local runs and plans only: the workers of a Dask cluster may have what the client lacks.
    """
    for run in spec.runs:
        try:
            task_kinds.check_devices(run.kind, run.options)
        except task_kinds.TaskKindError as exc:
            raise _err(spec.source, f"[run.{run.label}] {exc}") from None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; raises SweepError (nothing runs, nothing is written)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML: {exc}") from None
    return parse_sweep(doc, source=str(path), base_dir=path.parent)


# ----- the plan: tasks and chains ----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    tasks: tuple[Task, ...]  # every (run, grid point), in grid order
    chains: tuple[tuple[Task, ...], ...]  # the distinct tasks, grouped into warm-start chains


def plan(spec: SweepSpec) -> Plan:
    """Every task of the sweep, validated, and the chains they run in.

    Duplicate keys (e.g. the frozen baseline does not depend on lam_ft) are computed once.
    """
    all_tasks: list[Task] = []
    chains: dict[tuple, list[Task]] = {}
    seen: set[Key] = set()
    cont = spec.axis_names.index(spec.continuation) if spec.continuation else None
    defaults = Params()
    for run in spec.runs:
        kind = task_kinds.get(run.kind)
        warm = kind.warm_start
        for point in spec.points():
            values = {**spec.fixed, **spec.coords(point), **run.overrides}
            try:
                params = Params(**values)
                if kind.irrelevant:
                    params = params.replace(**{f: getattr(defaults, f) for f in kind.irrelevant})
                if run.kind == "simulate":
                    params.sizes(run.options["dim"])
            except ParamError as exc:
                where = ", ".join(f"{a}={v!r}" for a, v in spec.coords(point).items()) or "the fixed parameters"
                raise _err(
                    spec.source, f"invalid parameters for [run.{run.label}] at grid point {where}: {exc}"
                ) from None
            task = Task(run.label, run.kind, params, dict(run.options), point)
            all_tasks.append(task)
            if task.key in seen:
                continue
            seen.add(task.key)
            if warm and cont is not None:
                group = (run.label,) + point[:cont] + point[cont + 1 :]
            else:
                group = (run.label,) + point + ("single",)
            chains.setdefault(group, []).append(task)
    for chain in chains.values():  # grid order is already continuation-axis order within a group
        chain.sort(key=lambda t: t.point[cont] if cont is not None else 0)
    ordered = sorted(chains.values(), key=len, reverse=True)  # long chains are the critical path: start first
    return Plan(tasks=tuple(all_tasks), chains=tuple(tuple(c) for c in ordered))


# ----- running --------------------------------------------------------------------------------------------
#: default lease of a claimed task (seconds); renewed by a heartbeat every quarter of it while the task runs
DEFAULT_LEASE_S = 60.0


@dataclass(frozen=True)
class SweepReport:
    run_id: str
    n_tasks: int  # distinct tasks of the sweep
    n_present: int  # already in the database before this run (ok or failed): skipped
    n_computed: int  # computed (and stored) by this process
    n_failed: int  # failures among those computed by this process
    n_not_converged: int  # computed by this process, stored as ok, but reporting converged = False
    n_failed_total: int  # failed rows of this sweep in the database after the run
    n_missing: int  # still missing (interrupted)
    wall_s: float
    interrupted: bool
    executor: str
    n_by_others: int = 0  # stored during this run by other sweeps sharing the database (leases)
    errors: dict = field(default_factory=dict)  # distinct error (last line) -> count, over the failed rows
    first_error: str | None = None  # the first failed task of the plan: where, and its error's last line


def error_line(error: str | None) -> str:
    """The last non-empty line of a stored error (the exception, without its traceback)."""
    lines = [ln.strip() for ln in (error or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no error text)"


def _usable_init(result: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A neighbour's result is a warm start only if it converged (when it says)."""
    if not result:
        return None
    return result if result.get("converged", True) is not False else None


def _slots(executor: Any, n_chains: int) -> int:
    """How many tasks to have claimed and submitted at once: the executor's parallelism.

    Claiming more than can run would hold leases on queued tasks that other sweeps could compute.
    """
    from .executor import DaskExecutor, LocalPool, SerialExecutor

    n = getattr(executor, "slots", None)
    if n is None:
        if isinstance(executor, SerialExecutor):
            n = 1
        elif isinstance(executor, LocalPool):
            n = executor.workers
        elif isinstance(executor, DaskExecutor):
            try:
                n = sum(executor._client.nthreads().values())
            except Exception:  # noqa: BLE001
                n = None
    return max(1, int(n)) if n else max(1, n_chains)


def _summarise_errors(spec: SweepSpec, the_plan: Plan, rows: Mapping[Key, Row]) -> tuple[dict, str | None]:
    """Failed rows of the plan: count per distinct error (its last line), and the first one with its grid point."""
    counts: dict[str, int] = {}
    first = None
    seen: set[Key] = set()
    for task in the_plan.tasks:
        row = rows.get(task.key)
        if row is None or row.ok or task.key in seen:
            continue
        seen.add(task.key)
        line = error_line(row.error)
        if first is None:
            where = ", ".join(f"{a}={v!r}" for a, v in spec.coords(task.point).items()) or "the fixed parameters"
            first = f"[run.{task.label}] at {where}: {line}"
        counts[line] = counts.get(line, 0) + 1
    return counts, first


def run_sweep(
    spec: SweepSpec,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    store: Store | None = None,
    executor: Any = None,
    lease_s: float = DEFAULT_LEASE_S,
    poll_s: float | None = None,
) -> SweepReport:
    """Run what is missing of ``spec`` and store each result as it arrives.

    Several sweeps may run on one database at once (processes on one machine, or clients of one
    Dask cluster): each task is claimed in the database before it is computed (a lease of
    ``lease_s`` seconds, renewed by a heartbeat thread while the task runs), so every task is
    computed once; a task whose owner died is taken over when its lease expires.  SQLite's
    locking needs a local file system: not NFS; from several machines, use one Dask scheduler.

    Args:
        workers: local pool size (default: all cores); 1 runs in this process.
        scheduler: ``tcp://HOST:PORT`` of a Dask scheduler; the tasks run on its workers.
        retry_failed: also rerun tasks stored as failed (before this run started).
        progress: a tqdm progress bar (counts and ETA) on stderr.
        store: for tests and embedding; by default the sweep's database.
        executor: for tests and embedding; by default
            :func:`hdlora.experiments.executor.make_executor`.
        lease_s: lease of a claimed task, seconds.
        poll_s: how often tasks claimed by other sweeps are looked at again (default min(1, lease_s / 4)).
    """
    from collections import deque
    from contextlib import nullcontext

    from .executor import make_executor
    from .store import Heartbeat, utc_now, worker_name

    if not (isinstance(lease_s, (int, float)) and math.isfinite(lease_s) and lease_s > 0):
        raise SweepError(f"--lease-seconds must be a number > 0, got {lease_s!r}")
    poll_s = min(1.0, lease_s / 4.0) if poll_s is None else poll_s
    if scheduler is None and executor is None:
        check_local_devices(spec)
    t0 = time.perf_counter()
    the_plan = plan(spec)
    distinct = [t for c in the_plan.chains for t in c]
    if store is None:
        if spec.database.exists():  # complete already? then read only: nothing is written (read-only files too)
            with Store(spec.database, readonly=True) as ro:
                have = ro.lookup(t.key for t in distinct)
                if all(k.key in have and (have[k.key].ok or not retry_failed) for k in distinct):
                    errors, first = _summarise_errors(spec, the_plan, have)
                    return SweepReport(
                        run_id="",
                        n_tasks=len(distinct),
                        n_present=len(distinct),
                        n_computed=0,
                        n_failed=0,
                        n_not_converged=0,
                        n_failed_total=sum(not r.ok for r in have.values()),
                        n_missing=0,
                        wall_s=time.perf_counter() - t0,
                        interrupted=False,
                        executor="none",
                        errors=errors,
                        first_error=first,
                    )
        with Store(spec.database) as own:
            return run_sweep(
                spec,
                workers=workers,
                scheduler=scheduler,
                retry_failed=retry_failed,
                progress=progress,
                store=own,
                executor=executor,
                lease_s=lease_s,
                poll_s=poll_s,
            )
    run_id = uuid.uuid4().hex[:12]
    owner = f"{worker_name()}:{run_id}"
    redo_before = utc_now() if retry_failed else None
    present = store.lookup(t.key for t in distinct)

    def needs(task: Task) -> bool:
        row = present.get(task.key)
        return row is None or (retry_failed and not row.ok)

    n_todo = sum(needs(t) for t in distinct)
    n_present = len(distinct) - sum(present.get(t.key) is None for t in distinct)
    own_exec = executor is None
    n_computed = n_failed = n_not_converged = n_by_others = 0
    interrupted = False
    bar = None
    try:
        if n_todo:
            executor = executor or make_executor(workers, scheduler, tasks=[t for t in distinct if needs(t)])
        desc = executor.description if executor is not None else "nothing to do"
        store.start_run(run_id, sweep=spec.name, source=spec.source, executor=desc, n_tasks=len(distinct))
        if progress:
            from ..progress import bar as progress_bar  # plain lines when stderr is not a terminal

            bar = progress_bar(
                total=len(distinct),
                initial=len(distinct) - n_todo,
                desc=spec.name,
                unit="task",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        # per chain: position of the next task and the warm start to give it
        pos = [0] * len(the_plan.chains)
        init: list[Mapping | None] = [None] * len(the_plan.chains)
        inflight: dict[Any, tuple[int, Task]] = {}
        ready = deque(range(len(the_plan.chains)))  # chains whose next task is to be looked at
        parked: list[int] = []  # chains whose next task another sweep is computing
        slots = _slots(executor, len(the_plan.chains)) if executor is not None else 1

        def advance(ci: int) -> None:
            nonlocal n_by_others
            chain = the_plan.chains[ci]
            while pos[ci] < len(chain):
                task = chain[pos[ci]]
                if needs(task):
                    state = store.claim(task.key, owner, lease_s, redo_before)
                    if state == "claimed":
                        warm = init[ci] if task_kinds.get(task.kind).warm_start else None
                        handle = executor.submit(task.kind, task.params.to_dict(), task.options, warm)
                        inflight[handle] = (ci, task)
                        return
                    if state == "busy":
                        parked.append(ci)
                        return
                    row = store.get(task.key)  # 'done': stored by another sweep meanwhile
                    n_by_others += 1
                    if bar is not None:
                        bar.update(1)
                else:
                    row = present[task.key]
                if row is not None and row.ok and _usable_init(row.result) is not None:
                    init[ci] = row.result
                pos[ci] += 1

        last_poll = time.monotonic()
        with Heartbeat(store.path, owner, lease_s) if n_todo else nullcontext():
            while True:
                while ready and len(inflight) < slots:
                    advance(ready.popleft())
                if not inflight:
                    if not parked:
                        break
                    time.sleep(max(0.0, poll_s - (time.monotonic() - last_poll)))
                if parked and time.monotonic() - last_poll >= poll_s:
                    ready.extend(parked)
                    parked.clear()
                    last_poll = time.monotonic()
                if not inflight:
                    continue
                for handle in executor.wait_first(list(inflight)):
                    ci, task = inflight.pop(handle)
                    out = executor.outcome(handle)
                    if out["status"] == "ok" and out.get("version") not in (None, store.version):
                        # e.g. a Dask worker with another hdlora installed: its numbers are not this version's
                        out = dict(
                            out,
                            status="failed",
                            result=None,
                            error=f"the worker {out['worker']} runs hdlora {out['version']}, "
                            f"this sweep stores results of hdlora {store.version}",
                        )
                    store.put(
                        task.key,
                        status=out["status"],
                        result=out["result"],
                        error=out["error"],
                        warnings=out["warnings"],
                        wall_s=out["wall_s"],
                        run_id=run_id,
                        worker=out["worker"],
                        owner=owner,
                    )
                    n_computed += 1
                    if out["status"] != "ok":
                        n_failed += 1
                    elif out["result"].get("converged", True) is False:
                        n_not_converged += 1
                    elif _usable_init(out["result"]) is not None:
                        init[ci] = out["result"]
                    if bar is not None:
                        bar.update(1)
                        if n_failed or n_not_converged:
                            bar.set_postfix(failed=n_failed, not_converged=n_not_converged)
                    pos[ci] += 1
                    ready.append(ci)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
        if own_exec and executor is not None:
            executor.close(cancel=interrupted)
        store.release(owner)  # what was not finished is free for the other sweeps at once
    after = store.lookup(t.key for t in distinct)
    n_failed_total = sum(not r.ok for r in after.values())
    n_missing = len(distinct) - len(after)
    errors, first = _summarise_errors(spec, the_plan, after)
    store.end_run(run_id, n_computed=n_computed, n_failed=n_failed, state="interrupted" if interrupted else "finished")
    return SweepReport(
        run_id=run_id,
        n_tasks=len(distinct),
        n_present=n_present,
        n_computed=n_computed,
        n_failed=n_failed,
        n_not_converged=n_not_converged,
        n_failed_total=n_failed_total,
        n_missing=n_missing,
        wall_s=time.perf_counter() - t0,
        interrupted=interrupted,
        executor=executor.description if executor is not None else "none",
        n_by_others=n_by_others,
        errors=errors,
        first_error=first,
    )


# ----- exports ----------------------------------------------------------------------------------------------
def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool, str)) or v is None


def _result_fields(result: Mapping[str, Any] | None) -> dict[str, Any]:
    """The result without its echo of the parameters (the grid gives them)."""
    return {k: v for k, v in (result or {}).items() if k != "params"}


def sweep_frame(spec: SweepSpec, store: Store | None = None):
    """Tidy pandas DataFrame: one row per (run label, grid point) present in the database.

    Columns: ``label``, ``kind``, the Params fields at the grid point (before a baseline's
    override, which the label implies: ``frozen`` has lam_ft = inf), the options,
    ``status``, ``error``, ``wall_s``, ``finished_at``, ``run_id``, then the scalar results
    (nested result dicts flattened with dots; lists stay in the database only).
    """
    import pandas as pd

    from .store import flatten

    own = store is None
    store = store or Store(spec.database, readonly=True)
    try:
        the_plan = plan(spec)
        rows = store.lookup(t.key for t in the_plan.tasks)
        records = []
        for t in the_plan.tasks:
            row = rows.get(t.key)
            if row is None:
                continue
            rec: dict[str, Any] = {"label": t.label, "kind": t.kind}
            rec.update(Params(**{**spec.fixed, **spec.coords(t.point)}).to_dict())
            rec.update(flatten(t.options))
            rec.update(
                {
                    "status": row.status,
                    "error": row.error,
                    "wall_s": row.wall_s,
                    "finished_at": row.finished_at,
                    "run_id": row.run_id,
                    "version": row.version,
                }
            )
            for k, v in flatten(_result_fields(row.result)).items():
                rec[k if k not in rec else f"result.{k}"] = v
            records.append(rec)
        return pd.DataFrame.from_records(records)
    finally:
        if own:
            store.close()


def sweep_dataset(spec: SweepSpec, store: Store | None = None):
    """xarray Dataset with dimensions ``label`` x the grid axes.

    Every numeric (or boolean) scalar result is a float64 variable, NaN where the task is
    missing, failed, or did not report it; ``status`` is 'ok' / 'failed' / 'missing'.
    The fixed parameters, options and version are attributes.
    """
    import numpy as np
    import xarray as xr

    from .store import flatten

    own = store is None
    store = store or Store(spec.database, readonly=True)
    try:
        the_plan = plan(spec)
        rows = store.lookup(t.key for t in the_plan.tasks)
    finally:
        if own:
            store.close()
    labels = [r.label for r in spec.runs]
    shape = (len(labels),) + spec.shape
    status = np.full(shape, "missing", dtype=object)
    wall = np.full(shape, np.nan)
    values: dict[str, np.ndarray] = {}
    reserved = {"label", "status", "wall_s", *spec.axis_names}
    for t in the_plan.tasks:
        idx = (labels.index(t.label),) + t.point
        row = rows.get(t.key)
        if row is None:
            continue
        status[idx] = row.status
        wall[idx] = np.nan if row.wall_s is None else row.wall_s
        for k, v in flatten(_result_fields(row.result)).items():
            if isinstance(v, (bool, int, float)):
                if k in reserved:
                    k = f"result.{k}"
                arr = values.setdefault(k, np.full(shape, np.nan))
                arr[idx] = float(v)
    dims = ("label",) + spec.axis_names
    coords: dict[str, Any] = {"label": labels}
    for a, vals in spec.axes:
        coords[a] = [int(v) if isinstance(v, bool) else v for v in vals]
    data = {k: (dims, v) for k, v in sorted(values.items())}
    data["status"] = (dims, status.astype(str))
    data["wall_s"] = (dims, wall)
    attrs = {
        "sweep": spec.name,
        "source": spec.source,
        "fixed_params": canonical_json(spec.fixed),
        "runs": canonical_json(
            {r.label: {"kind": r.kind, "options": r.options, "overrides": r.overrides} for r in spec.runs}
        ),
        "version": store.version,
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def check_writable(path: str | Path, what: str = "--export") -> None:
    """Raise SweepError (one line) unless ``path`` can be written: checked before a sweep runs, not after."""
    path = Path(path)
    if path.is_dir():
        raise SweepError(f"{what} {path}: is a directory; give a file name")
    d = path.parent
    while not d.exists() and d != d.parent:  # the nearest existing ancestor must let us create the rest
        d = d.parent
    if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
        raise SweepError(f"{what} {path}: the directory {d} is not writable; choose another location")
    if path.exists() and not os.access(path, os.W_OK):
        raise SweepError(f"{what} {path}: the file exists and is read-only; choose another name")


def export(spec: SweepSpec, path: str | Path, store: Store | None = None) -> Path:
    """Write the results to ``path``: .csv (tidy table) or .nc (netCDF via h5netcdf)."""
    path = Path(path)
    check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        sweep_frame(spec, store).to_csv(path, index=False)
    elif path.suffix in (".nc", ".nc4", ".netcdf"):
        sweep_dataset(spec, store).to_netcdf(path, engine="h5netcdf")
    else:
        raise SweepError(f"--export: unknown format {path.suffix!r}; use .csv or .nc")
    return path
