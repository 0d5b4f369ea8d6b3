"""Where a sweep's tasks run: in this process, a local process pool, or a Dask cluster.

All three expose the same small interface to the sweep driver
(:func:`hdlora.experiments.sweep.run_sweep`): ``submit`` one task, ``wait_first``
for at least one to finish, ``outcome`` of a finished one (always a dict as
returned by :func:`hdlora.experiments.tasks.run_task`, also when the worker
itself died), and ``close``.  The driver, in the parent process, stores each
outcome as it arrives.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from .tasks import run_task

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _crash_outcome(exc: BaseException, where: str) -> dict:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {
        "status": "failed",
        "result": None,
        "error": f"{where}: {text}",
        "warnings": [],
        "wall_s": None,
        "worker": None,
    }


class SerialExecutor:
    """Runs the tasks one by one in this process (``--workers 1``); threads are left alone.

    A task runs when the driver waits for it (not at submission), so each result is
    stored before the next task starts.
    """

    description = "serial"

    def __init__(self) -> None:
        self._pending: dict[cf.Future, tuple[str, dict, dict, Mapping | None]] = {}

    def submit(self, kind: str, params: Mapping, options: Mapping, init: Mapping | None) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._pending[fut] = (kind, dict(params), dict(options), init)
        return fut

    def wait_first(self, handles: Iterable[cf.Future]) -> set:
        handles = list(handles)
        done = {h for h in handles if h.done()}
        if done:
            return done
        fut = handles[0]
        fut.set_result(run_task(*self._pending.pop(fut), threads=None))
        return {fut}

    def outcome(self, handle: cf.Future) -> dict:
        return handle.result()

    def close(self, cancel: bool = False) -> None:
        self._pending.clear()


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask, e.g. in a container), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # the sweep died (e.g. SIGKILL): do not keep computing for nobody
        time.sleep(0.5)


def _init_worker(parent_pid: int) -> None:
    """Pool worker start-up: one BLAS / torch thread, and exit with the parent."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


class LocalPool:
    """A pool of ``workers`` processes on this machine (spawned: safe with torch and threads).

    Each worker uses one BLAS / torch thread (OMP_NUM_THREADS = MKL_NUM_THREADS = 1,
    ``torch.set_num_threads(1)``) and exits when the sweep process dies.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = int(workers or available_cpus())
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self.description = f"local:{self.workers}"
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def submit(self, kind: str, params: Mapping, options: Mapping, init: Mapping | None) -> cf.Future:
        try:
            return self._pool.submit(run_task, kind, dict(params), dict(options), init, 1)
        except cf.process.BrokenProcessPool:
            # a worker died hard (e.g. out of memory); the tasks in flight are recorded as failed
            # by outcome(), the rest of the sweep goes on in a fresh pool
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(run_task, kind, dict(params), dict(options), init, 1)

    def wait_first(self, handles: Iterable[cf.Future]) -> set:
        done, _ = cf.wait(list(handles), return_when=cf.FIRST_COMPLETED)
        return set(done)

    def outcome(self, handle: cf.Future) -> dict:
        try:
            return handle.result()
        except Exception as exc:  # noqa: BLE001
            return _crash_outcome(exc, "worker process failed (this task or another one in flight killed it)")

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


class DaskExecutor:
    """The tasks on a Dask distributed cluster: ``tcp://HOST:PORT`` of its scheduler.

    Start workers with one thread each and one BLAS thread, e.g.
    ``OMP_NUM_THREADS=1 dask worker tcp://HOST:8786 --nthreads 1 --nworkers N``;
    each task also calls ``torch.set_num_threads(1)``.  The workers need hdlora
    installed (the same version: it is part of every result's key).
    """

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        from distributed import Client

        self.address = address
        self.description = address
        try:
            self._client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach the Dask scheduler at {address}: {exc}") from None

        from distributed import as_completed

        self._done = as_completed(loop=self._client.loop)  # bound to this client, not a global default

    def submit(self, kind: str, params: Mapping, options: Mapping, init: Mapping | None) -> Any:
        fut = self._client.submit(run_task, kind, dict(params), dict(options), init, 1, pure=False)
        self._done.add(fut)
        return fut

    def wait_first(self, handles: Iterable[Any]) -> set:
        """At least one finished task (every handle was added to the as_completed iterator at submission)."""
        done = {next(self._done)}
        done.update(self._done.next_batch(block=False))
        return done

    def outcome(self, handle: Any) -> dict:
        try:
            return handle.result()
        except Exception as exc:  # noqa: BLE001 (e.g. KilledWorker)
            return _crash_outcome(exc, "Dask task failed")

    def close(self, cancel: bool = False) -> None:
        self._client.close()


def make_executor(workers: int | None = None, scheduler: Any = None, tasks: Iterable[Any] | None = None):
    """``scheduler`` given: Dask; ``workers == 1``: serial in this process; else a local pool.

    ``scheduler`` is a ``tcp://HOST:PORT`` address, or an object that starts a cluster and
    returns its executor (:class:`hdlora.experiments.slurm.SlurmCluster`, ``--cluster slurm``).
    With ``workers`` None and the ``tasks`` to run given, a small plan (one task, or less
    estimated work than a pool's start-up would save, :func:`hdlora.resources.choose_serial`)
    runs serially; the choice is said in one line on stderr.
    """
    if scheduler is not None and not isinstance(scheduler, str):
        return scheduler.executor()
    if scheduler:
        return DaskExecutor(scheduler)
    if workers is None and tasks is not None:
        import sys

        from ..resources import choose_serial

        serial, why = choose_serial(tasks, None)
        print(why, file=sys.stderr)
        if serial:
            return SerialExecutor()
    if workers == 1:
        return SerialExecutor()
    return LocalPool(workers)
