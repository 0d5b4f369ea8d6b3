"""``hdlora sweep FILE``: run a sweep file (resumable), locally or on a Dask cluster.

Exit status: 0 when every task of the sweep is stored as ok, 1 when some are
stored as failed (their errors are in the database; ``--retry-failed`` reruns
them) or the run was interrupted, 2 for a bad sweep file or option (nothing
runs then).
"""

from __future__ import annotations

import argparse
import re
import sys

from hdlora.cli import _float, dumps, integer

#: Dask scheduler address: [PROTOCOL://]HOST:PORT
_SCHEDULER = re.compile(
    r"^(?:(?P<proto>tcp|tls|ucx|ws|wss)://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$"
)


def scheduler_address(text: str) -> str:
    """--scheduler: a Dask scheduler address [tcp://]HOST:PORT, checked before anything runs."""
    m = _SCHEDULER.match(text.strip())
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a Dask scheduler address [tcp://]HOST:PORT (PORT 1-65535, e.g. tcp://127.0.0.1:8786), "
            f"got {text!r}; leave --scheduler out to run on this machine"
        )
    return text.strip()


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """--workers / --scheduler, shared by every command that runs sweeps (sweep, figure)."""
    p.add_argument(
        "--workers", type=integer, default=None, help="local worker processes (None: all cores; 1 runs in this process)"
    )
    p.add_argument(
        "--scheduler",
        type=scheduler_address,
        default=None,
        metavar="tcp://HOST:PORT",
        help="run the tasks on this Dask distributed scheduler instead of locally",
    )
    p.add_argument(
        "--cluster",
        choices=["slurm"],
        default=None,
        help="submit SLURM jobs (dask-jobqueue) that run the tasks; --workers is then the number "
        "of jobs (default 1); results are stored here, by this process",
    )
    p.add_argument(
        "--cluster-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="job shape for --cluster (repeatable): cores, processes, memory, walltime, queue, "
        "account, job_extra_directives, job_script_prologue, jobs, adapt=MIN:MAX, host, port, "
        "interface, python, log_directory, local_directory, job_name; see the README",
    )


def executor_arguments_error(args: argparse.Namespace) -> str | None:
    """The problem with --workers / --scheduler, or None."""
    if args.workers is not None and args.workers < 1:
        return f"--workers must be >= 1, got {args.workers}"
    if getattr(args, "cluster", None) or getattr(args, "cluster_option", None):
        from .slurm import cluster_arguments_error

        return cluster_arguments_error(args)
    if args.scheduler and args.workers is not None:
        return "--workers is for the local pool; with --scheduler the cluster's workers run the tasks"
    return None


def scheduler_argument(args: argparse.Namespace):
    """``scheduler`` for run_sweep / run_figure, as a context manager: the --scheduler address,
    or (--cluster slurm) a SLURM cluster whose jobs are submitted on first use and cancelled on exit."""
    import contextlib

    if getattr(args, "cluster", None):
        from .slurm import SlurmCluster

        return SlurmCluster.from_args(args)
    return contextlib.nullcontext(args.scheduler)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep file (TOML): [sweep], [params], [axes], [run.<kind>]")
    add_executor_arguments(p)
    p.add_argument("--db", default=None, help="results database (default: [sweep] database of the file)")
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="OUT.csv|OUT.nc",
        help="write the results (tidy CSV table, or netCDF with the grid axes as dimensions); repeatable",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="rerun tasks stored as failed (by default they are kept and counted, not rerun)",
    )
    p.add_argument("--plan", action="store_true", help="validate and print the task counts; run nothing")
    p.add_argument(
        "--lease-seconds",
        type=_float,
        default=None,
        metavar="S",
        help="several sweeps may share one database (local disk only: SQLite WAL does not work on "
        "NFS; for several machines use one Dask --scheduler): a task is claimed for S seconds, "
        "renewed while it runs, taken over by another sweep when it expires (default 60)",
    )
    p.add_argument("--no-progress", "-q", "--quiet", dest="no_progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from .store import StoreError
    from .sweep import SweepError, check_writable, load_sweep

    def fail(msg: str) -> int:
        print(f"hdlora sweep: error: {msg}", file=sys.stderr)
        return 2

    if (msg := executor_arguments_error(args)) is not None:
        return fail(msg)
    for out in args.export:
        if Path(out).suffix not in (".csv", ".nc", ".nc4", ".netcdf"):
            return fail(f"--export {out}: unknown format; use .csv or .nc")
    try:
        spec = load_sweep(args.file)
        for out in args.export:  # before the sweep runs, not after
            check_writable(out)
    except SweepError as exc:
        return fail(str(exc))
    if args.db:
        spec = dataclasses.replace(spec, database=Path(args.db))

    try:
        return _run(args, spec, fail)
    except (SweepError, StoreError) as exc:
        return fail(str(exc))


def _run(args: argparse.Namespace, spec, fail) -> int:
    """Plan, or run and export, a loaded sweep; SweepError / StoreError go up to :func:`run`."""
    import dataclasses

    from .store import Store
    from .sweep import check_local_devices, export, plan, run_sweep

    if args.plan:
        if not args.scheduler:
            check_local_devices(spec)
        p = plan(spec)
        distinct = [t for c in p.chains for t in c]
        have = {}
        if spec.database.exists():  # --plan writes nothing, not even an empty database
            with Store(spec.database, readonly=True) as store:
                have = store.lookup(t.key for t in distinct)
        summary = {
            "sweep": spec.name,
            "database": str(spec.database),
            "grid": dict(zip(spec.axis_names, spec.shape)),
            "runs": [r.label for r in spec.runs],
            "tasks": len(distinct),
            "chains": len(p.chains),
            "stored_ok": sum(r.ok for r in have.values()),
            "stored_failed": sum(not r.ok for r in have.values()),
            "missing": len(distinct) - len(have),
        }
        print(dumps(summary))
        return 0

    try:
        with scheduler_argument(args) as scheduler:
            report = run_sweep(
                spec,
                workers=args.workers,
                scheduler=scheduler,
                retry_failed=args.retry_failed,
                progress=not args.no_progress,
                **({} if args.lease_seconds is None else {"lease_s": args.lease_seconds}),
            )
    except ConnectionError as exc:
        return fail(str(exc))
    written = []
    for out in args.export:
        written.append(str(export(spec, out)))
    summary = dict(dataclasses.asdict(report), database=str(spec.database), exports=written)
    if args.json:
        print(dumps(summary))
    else:
        state = "interrupted" if report.interrupted else "done"
        print(
            f"sweep {spec.name}: {state}: {report.n_tasks} tasks, {report.n_present} already stored, "
            f"{report.n_computed} computed here ({report.n_failed} failed, {report.n_not_converged} not converged), "
            f"{report.n_by_others} by other sweeps, in {report.wall_s:.1f} s on "
            f"{report.executor}; {report.n_failed_total} failed, {report.n_missing} missing; "
            f"database {spec.database}" + (f"; exported {', '.join(written)}" if written else "")
        )
    if report.n_failed_total:
        print(f"first failure: {report.first_error}", file=sys.stderr)
        for err, n in sorted(report.errors.items(), key=lambda kv: -kv[1]):
            print(f"  {n} task(s): {err}", file=sys.stderr)
        print("  failed tasks keep their full error in the database; rerun with --retry-failed", file=sys.stderr)
    if report.interrupted:
        return 130
    return 1 if (report.n_failed_total or report.n_missing) else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hdlora.experiments.cli FILE ...``: the same as ``hdlora sweep FILE ...``."""
    from hdlora.cli import Parser

    parser = Parser(prog="hdlora sweep", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
