"""``--cluster slurm``: a sweep's tasks on SLURM jobs, through dask-jobqueue's ``SLURMCluster``.

This process (the login node, where ``hdlora sweep`` / ``hdlora figure`` runs) starts a Dask
scheduler bound to ``host`` and submits SLURM jobs (``sbatch``) whose Dask workers connect back
to it; the tasks are the same as with the local pool (:func:`hdlora.experiments.tasks.run_task`),
and their results come back to this process, which stores them in the sweep's SQLite database
(the workers never open it).  Every worker runs with one BLAS thread (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` exported in the job script before Python starts,
and ``torch.set_num_threads(1)`` in each task), as in the local pool.

The jobs are submitted on the first task (``--plan`` or a sweep with nothing missing submits
none), kept for all the sweeps of a command (``hdlora figure``), and cancelled at the end.

``--cluster-option KEY=VALUE`` (repeatable; :data:`OPTIONS` lists the keys) sets the job
shape; ``--workers N`` is the number of jobs.  ``dask_jobqueue`` is imported only here, when a
cluster is started.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

#: key -> one line of help (the allowed values)
OPTIONS: dict[str, str] = {
    "cores": "cores per job, integer >= 1 (default 1)",
    "processes": "Dask worker processes per job, 1..cores dividing cores (default: cores, one thread each)",
    "memory": "memory per job, e.g. 4GB or 2GiB (default 2GB per core)",
    "walltime": "time limit per job, SLURM format MM, HH:MM:SS or D-HH:MM:SS (default 01:00:00)",
    "queue": "SLURM partition (default: the cluster's default partition)",
    "account": "SLURM account to charge (default: none given)",
    "job_extra_directives": "one more #SBATCH option, e.g. --exclusive or --qos=short (repeatable)",
    "job_script_prologue": "one shell line run in the job before the worker, e.g. "
    "'source /shared/venv/bin/activate' (repeatable)",
    "jobs": "number of SLURM jobs, integer >= 1 (default 1; the same as --workers)",
    "adapt": "MIN:MAX, scale between MIN and MAX jobs with the work left (instead of jobs)",
    "host": "address of this machine that the compute nodes reach (the scheduler binds to it; "
    "default: this machine's outward address)",
    "port": "scheduler port, integer 0..65535 (default 0: any free port)",
    "interface": "network interface of the workers, e.g. ib0 (default: the host name's address)",
    "python": f"Python on the compute nodes, with the same hdlora installed (default: this one, {sys.executable})",
    "log_directory": "directory (on a shared filesystem) for the jobs' output (default: SLURM's, "
    "slurm-JOBID.out in the working directory)",
    "local_directory": "worker scratch directory on the nodes (default: Dask's, in /tmp)",
    "job_name": "SLURM job name (default hdlora)",
}
_REPEATABLE = ("job_extra_directives", "job_script_prologue")
_WALLTIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")


class ClusterOptionError(ValueError):
    """A bad --cluster / --cluster-option; the message is one line for the user."""


class ClusterStartError(ConnectionError):
    """SLURM refuses the job (``sbatch --test-only``); the message is one line for the user."""


@dataclass
class SlurmOptions:
    """The job shape and the scheduler's address (validated; see :data:`OPTIONS`)."""

    cores: int = 1
    processes: int | None = None
    memory: str | None = None
    walltime: str = "01:00:00"
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] = field(default_factory=list)
    job_script_prologue: list[str] = field(default_factory=list)
    jobs: int | None = None
    adapt: tuple[int, int] | None = None
    host: str | None = None
    port: int = 0
    interface: str | None = None
    python: str = sys.executable
    log_directory: str | None = None
    local_directory: str | None = None
    job_name: str = "hdlora"

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dask_jobqueue.SLURMCluster``."""
        from .executor import _THREAD_VARS

        host = self.host or _outward_address()
        # one BLAS thread per worker, set before Python starts (as the local pool's initializer does)
        prologue = [f"export {v}=1" for v in _THREAD_VARS] + list(self.job_script_prologue)
        kw: dict[str, Any] = dict(
            cores=self.cores,
            processes=self.processes or self.cores,
            memory=self.memory or f"{2 * self.cores}GB",
            walltime=self.walltime,
            queue=self.queue,
            account=self.account,
            job_name=self.job_name,
            job_extra_directives=list(self.job_extra_directives),
            job_script_prologue=prologue,
            python=self.python,
            log_directory=self.log_directory,
            local_directory=self.local_directory,
            scheduler_options={"host": host, "port": self.port, "dashboard_address": None},
        )
        if self.interface:
            kw["interface"] = self.interface
        return {k: v for k, v in kw.items() if v is not None}


def _outward_address() -> str:
    """This machine's address on the network the compute nodes share (the default route's)."""
    from distributed.utils import get_ip

    return get_ip()


def _int(key: str, text: str, lo: int, hi: int | None = None) -> int:
    try:
        v = int(float(text)) if re.fullmatch(r"\d+(\.0*)?(e\d+)?", text.strip()) else int(text)
    except ValueError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ClusterOptionError(f"--cluster-option {key}={text}: expected an integer {rng}")
    return v


def parse_cluster_options(pairs: list[str], workers: int | None = None) -> SlurmOptions:
    """``KEY=VALUE`` strings (and ``--workers``, the number of jobs) -> validated :class:`SlurmOptions`."""
    opts = SlurmOptions()
    seen: set[str] = set()
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ClusterOptionError(f"--cluster-option {pair!r}: expected KEY=VALUE, e.g. cores=4")
        if key not in OPTIONS:
            raise ClusterOptionError(f"--cluster-option {key}: unknown key; known keys: {', '.join(OPTIONS)}")
        if key in seen and key not in _REPEATABLE:
            raise ClusterOptionError(f"--cluster-option {key} given twice; give it once")
        seen.add(key)
        value = value.strip()
        if not value:
            raise ClusterOptionError(f"--cluster-option {key}=: empty value; {OPTIONS[key]}")
        if key in ("cores", "processes", "jobs"):
            setattr(opts, key, _int(key, value, 1))
        elif key == "port":
            opts.port = _int(key, value, 0, 65535)
        elif key == "memory":
            from dask.utils import parse_bytes

            try:
                ok = parse_bytes(value) > 0
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise ClusterOptionError(
                    f"--cluster-option memory={value}: expected a positive size such as 4GB or 2GiB"
                )
            opts.memory = value
        elif key == "walltime":
            if not _WALLTIME.match(value):
                raise ClusterOptionError(
                    f"--cluster-option walltime={value}: expected SLURM's format, MM, HH:MM:SS or D-HH:MM:SS"
                )
            opts.walltime = value
        elif key == "adapt":
            m = re.fullmatch(r"(\d+):(\d+)", value)
            if not m or int(m[2]) < 1 or int(m[1]) > int(m[2]):
                raise ClusterOptionError(
                    f"--cluster-option adapt={value}: expected MIN:MAX jobs with "
                    "0 <= MIN <= MAX and MAX >= 1, e.g. adapt=0:10"
                )
            opts.adapt = (int(m[1]), int(m[2]))
        elif key == "job_extra_directives":
            if not value.startswith("-"):
                raise ClusterOptionError(
                    f"--cluster-option job_extra_directives={value}: expected an sbatch "
                    "option such as --exclusive or --qos=short (without #SBATCH)"
                )
            opts.job_extra_directives.append(value)
        elif key == "job_script_prologue":
            opts.job_script_prologue.append(value)
        elif key in ("queue", "account", "host", "interface", "job_name") and re.search(r"\s", value):
            raise ClusterOptionError(f"--cluster-option {key}={value!r}: no spaces allowed")
        else:
            setattr(opts, key, value)
    processes = opts.processes or opts.cores
    if processes > opts.cores or opts.cores % processes:
        raise ClusterOptionError(
            f"--cluster-option processes={processes}: must divide cores={opts.cores} "
            "(each worker gets cores/processes threads)"
        )
    if workers is not None:
        if "jobs" in seen and opts.jobs != workers:
            raise ClusterOptionError(
                f"--workers {workers} and --cluster-option jobs={opts.jobs} disagree; give the number of jobs once"
            )
        opts.jobs = workers
    if opts.adapt is not None and opts.jobs is not None:
        raise ClusterOptionError(
            "--cluster-option adapt=MIN:MAX replaces a fixed number of jobs; drop --workers / jobs=, or drop adapt"
        )
    if opts.adapt is None and opts.jobs is None:
        opts.jobs = 1
    return opts


def cluster_arguments_error(args: argparse.Namespace) -> str | None:
    """The problem with --cluster / --cluster-option (one line), or None; checks that the
    cluster can be started here (dask-jobqueue installed, sbatch on the PATH)."""
    if not args.cluster:
        return "--cluster-option needs --cluster slurm"
    if args.scheduler:
        return "--cluster starts its own Dask scheduler; give either --cluster or --scheduler"
    try:
        parse_cluster_options(args.cluster_option, args.workers)
    except ClusterOptionError as exc:
        return str(exc)
    if importlib.util.find_spec("dask_jobqueue") is None:
        return "--cluster slurm needs dask-jobqueue: pip install 'hdlora[cluster]'"
    if shutil.which("sbatch") is None:
        return "--cluster slurm: sbatch is not on the PATH; run hdlora on a machine that submits SLURM jobs"
    return None


class SlurmCluster:
    """A ``dask_jobqueue.SLURMCluster``, started on the first :meth:`executor` call, closed by :meth:`close`.

    Given to :func:`hdlora.experiments.sweep.run_sweep` as ``scheduler``:
    :func:`hdlora.experiments.executor.make_executor` asks it for an executor, a Dask client
    of its scheduler.  One cluster serves all the sweeps of a command.
    """

    def __init__(self, options: SlurmOptions) -> None:
        self.options = options
        self._cluster: Any = None  # a dask_jobqueue.SLURMCluster once started

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SlurmCluster:
        return cls(parse_cluster_options(args.cluster_option, args.workers))

    @property
    def description(self) -> str:
        o = self.options
        size = f"{o.jobs} jobs" if o.adapt is None else f"{o.adapt[0]}-{o.adapt[1]} jobs"
        addr = self._cluster.scheduler_address if self._cluster is not None else "not started"
        return f"slurm:{size} x {o.processes or o.cores} workers ({addr})"

    def start(self) -> str:
        """Start the scheduler and submit the jobs (once); returns the scheduler's address."""
        if self._cluster is None:
            import signal
            import threading

            before = signal.getsignal(signal.SIGINT)
            from dask_jobqueue import SLURMCluster

            if threading.current_thread() is threading.main_thread():
                # dask_jobqueue.runner, imported with the package, replaces the SIGINT handler by
                # sys.exit() (exit status 0, sweep not marked interrupted): put ours back, so that
                # Ctrl-C stops the sweep as with the local pool (what finished is stored, exit 130)
                signal.signal(signal.SIGINT, before)

            self._cluster = SLURMCluster(**self.options.cluster_kwargs())
            try:
                self._check_job_script(self._cluster.job_script())
            except BaseException:
                self.close()
                raise
            if self.options.adapt is not None:
                self._cluster.adapt(minimum_jobs=self.options.adapt[0], maximum_jobs=self.options.adapt[1])
            else:
                self._cluster.scale(jobs=self.options.jobs)
        return self._cluster.scheduler_address

    @staticmethod
    def _check_job_script(script: str) -> None:
        """``sbatch --test-only``: SLURM validates the job (partition, account, memory, time) without
        submitting it; a refused job would otherwise leave the sweep waiting for workers forever."""
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="hdlora-job-") as f:
            f.write(script)
            f.flush()
            proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            why = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
            raise ClusterStartError(
                f"--cluster slurm: SLURM refuses the job ({why}); "
                "fix --cluster-option queue / account / memory / walltime / cores"
            )

    def job_script(self) -> str:
        """The sbatch script the jobs are submitted with (starts the scheduler)."""
        self.start()
        return self._cluster.job_script()

    def executor(self):
        from .executor import DaskExecutor

        ex = DaskExecutor(self.start())
        ex.description = self.description
        return ex

    def close(self) -> None:
        """Cancel the jobs and stop the scheduler."""
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
