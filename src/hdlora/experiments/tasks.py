"""What a sweep can run: a registry of task kinds.

A *kind* maps to a task function ``f(params, options, init) -> dict``:

* ``params``: a validated :class:`hdlora.Params`;
* ``options``: the kind's options from the sweep file (e.g. ``n_mc`` for the
  theory, ``dim`` and ``seeds`` for the simulation), passed on as keyword
  arguments of the library call;
* ``init``: for kinds with ``warm_start``, the result dict of the neighbouring
  point along the continuation axis (or None), so the state evolution starts
  from its neighbour's fixed point; ignored by the others.

Built-in kinds: ``theory`` (:func:`hdlora.theory.solve`), ``simulate``
(:func:`hdlora.simulate.run`), ``bayes_optimal``
(:func:`hdlora.theory.bayes.bayes_optimal`).  The baselines of A.7 are the
theory at special parameters (:data:`BASELINES`): ``frozen`` is lam_ft = inf,
``lora_only`` is lam = inf.  A sweep file may also name its own task function
as ``"package.module:function"`` (same signature; set ``f.warm_start = True``
to receive ``init``).

Heavy modules (torch, the state evolutions) are imported inside the task
functions, in the worker, never at import time of this module.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hdlora.params import Params

from .store import to_jsonable, worker_name

TaskFunction = Callable[[Params, Mapping[str, Any], "Mapping[str, Any] | None"], Mapping[str, Any]]


class TaskKindError(ValueError):
    """An unknown or unavailable task kind, or a bad option for it."""


@dataclass(frozen=True)
class Kind:
    """A registered task kind.

    Attributes:
        name: the name used in sweep files.
        function: "module:attr" of the task function (params, options, init) -> dict.
        library: "module:attr" of the library call that receives the options as keyword
            arguments (used to validate option names before anything runs), or None.
        warm_start: points along the continuation axis are run in order, each receiving
            its neighbour's result as ``init``.
        required: options that must be given.
        description: one line for help texts.
        irrelevant: Params fields the kind does not depend on; they are reset to their
            defaults in the task key, so e.g. a Bayes-optimal line over a lam_ft axis is
            computed once.
    """

    name: str
    function: str
    library: str | None = None
    warm_start: bool = False
    required: tuple[str, ...] = ()
    description: str = ""
    irrelevant: tuple[str, ...] = ()


REGISTRY: dict[str, Kind] = {}

#: baseline name -> (kind, parameter overrides): the A.7 baselines are the theory at special parameters.
BASELINES: dict[str, tuple[str, dict[str, float]]] = {
    "frozen": ("theory", {"lam_ft": math.inf}),  # no LoRA update, w_hat = 0
    "lora_only": ("theory", {"lam": math.inf}),  # no pre-training, W_hat = 0
}
#: Other spellings of the baselines accepted on input (sweep files) only; stored kinds use the canonical one.
BASELINE_ALIASES: dict[str, str] = {"lora-only": "lora_only"}


def register(kind: Kind) -> Kind:
    REGISTRY[kind.name] = kind
    return kind


#: Task functions that moved, so that kind names stored in older databases and sweep files still
#: resolve: old module -> new module ("hdlora.experiments.figures:active_theory_task" now lives in
#: hdlora.experiments.figure_tasks, apart from the plots, under the results key).
MOVED_MODULES: dict[str, str] = {"hdlora.experiments.figures": "hdlora.experiments.figure_tasks"}


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise TaskKindError(f"expected 'package.module:function', got {target!r}")
    module = MOVED_MODULES.get(module, module)
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get(name: str) -> Kind:
    """The kind called ``name``; a "module:function" name is a custom task function."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        try:
            fn = _import(name)
        except (ImportError, AttributeError) as exc:
            raise TaskKindError(f"custom task kind {name!r} cannot be imported: {exc}") from None
        if not callable(fn):
            raise TaskKindError(f"custom task kind {name!r} is not callable")
        return Kind(name=name, function=name, warm_start=bool(getattr(fn, "warm_start", False)))
    known = sorted(REGISTRY) + sorted(BASELINES)
    raise TaskKindError(f"unknown task kind {name!r}; known kinds: {known} (or 'package.module:function')")


def resolve(name: str) -> TaskFunction:
    return _import(get(name).function)


# ----- option values: checked when the sweep file is loaded, one line each ------------------------------------
def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_pos(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _rule_int(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v, lo)), f"an integer >= {lo}"


def _rule_choice(*values: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str) and v in values), " | ".join(repr(x) for x in values)


_RULE_BOOL = ((lambda v: isinstance(v, bool)), "true | false")
_RULE_POS = (_is_pos, "a finite number > 0")


def _rule_tol() -> tuple[Callable[[Any], bool], str]:
    from hdlora import params as params_module

    rng = getattr(params_module, "TOL_RANGE", None)  # the library's bound on tolerances, where it has one
    if rng is None:
        return _RULE_POS
    lo, hi = rng
    return (lambda v: _is_pos(v) and lo <= v <= hi), f"a number in [{lo:g}, {hi:g}]"


def _rule_device() -> tuple[Callable[[Any], bool], str]:
    import re

    return (
        (lambda v: isinstance(v, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", v) is not None),
        "'cpu' | 'auto' | 'cuda' | 'cuda:N'",
    )


def _rule_effective() -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return (
            isinstance(v, dict)
            and set(v) == {"Q0", "Q", "M"}
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v.values())
        )

    return ok, "a table {Q0 = ..., Q = ..., M = ...} of finite numbers"


def _option_rules(kind: str) -> dict[str, tuple[Callable[[Any], bool], str] | None] | None:
    """name -> (check, allowed values) of the built-in kinds' options; None for other kinds."""
    if kind == "theory":
        from hdlora.theory.pretrain import PRETRAIN_METHODS
        from hdlora.theory.solve import BASELINES as SOLVE_BASELINES

        return {
            "n_mc": _rule_int(100),
            "seed": _rule_int(0),
            "baseline": _rule_choice(*SOLVE_BASELINES),
            "tol": _rule_tol(),
            "max_iter": _rule_int(1),
            "method": _rule_choice(*PRETRAIN_METHODS),
            "optimal_beta": _RULE_BOOL,
            "warn": _RULE_BOOL,
        }
    if kind == "simulate":
        from hdlora.data import TEACHERS
        from hdlora.simulate.losses import LOSSES
        from hdlora.simulate.run import OPTIMAL_BETA

        return {
            "dim": None,
            "seeds": None,  # checked by the sweep file loader (with the grid's sizes)
            "device": _rule_device(),
            "loss": _rule_choice(*LOSSES),
            "effective": _rule_effective(),
            "restarts": _rule_int(0),
            "progress": _RULE_BOOL,
            "informed_start": _RULE_BOOL,
            "reduce_width": _RULE_BOOL,
            "pretrain_rtol": _RULE_POS,
            "pretrain_max_iter": _rule_int(1),
            "finetune_rtol": _RULE_POS,
            "finetune_max_iter": _rule_int(1),
            "n_test": _rule_int(1),
            "optimal_beta": _rule_choice(*OPTIMAL_BETA),
            "compare_uniform": _RULE_BOOL,
            "teacher": _rule_choice(*TEACHERS),
        }
    if kind == "bayes_optimal":
        return {
            "n_mc": _rule_int(100),
            "n_nodes": _rule_int(1),
            "n_mc_error": _rule_int(100),
            "seed": _rule_int(0),
            "tol": _RULE_POS,
        }
    return None


def _check_values(name: str, options: Mapping[str, Any], rules: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(rules))
    if unknown:
        raise TaskKindError(f"unknown option(s) {unknown} for task kind {name!r}; allowed: {sorted(rules)}")
    for opt, value in options.items():
        rule = rules[opt]
        if rule is not None and not rule[0](value):
            raise TaskKindError(f"{opt} = {value!r}: must be {rule[1]}")


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise TaskKindError when the kind is unavailable or an option is missing, unknown or out of range.

    Imports the library module (not the heavy computation), so that a sweep naming a kind
    whose implementation is missing fails before anything runs.  The built-in kinds check
    every option's value (:func:`_option_rules`); a custom task function may define
    ``f.check_options(options)`` raising ValueError with a one-line message.
    """
    kind = get(name)
    missing = [k for k in kind.required if k not in options]
    if missing:
        raise TaskKindError(f"task kind {name!r} needs option(s) {missing}")
    if kind.library is None:
        fn = resolve(name)
        check = getattr(fn, "check_options", None)
        if callable(check):
            try:
                check(dict(options))
            except (ValueError, TypeError) as exc:
                raise TaskKindError(str(exc)) from None
        return
    try:
        lib = _import(kind.library)
    except (ImportError, AttributeError) as exc:
        raise TaskKindError(f"task kind {name!r} is not available: {kind.library} cannot be imported ({exc})") from None
    rules = _option_rules(kind.name) if REGISTRY.get(kind.name) is kind else None
    if rules is not None:
        _check_values(name, options, rules)
        return
    try:
        sig = inspect.signature(lib)
    except (TypeError, ValueError):  # pragma: no cover (builtins)
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [
        n
        for n, p in sig.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in ("params", "init")
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TaskKindError(f"unknown option(s) {unknown} for task kind {name!r}; {kind.library} accepts {allowed}")


def check_devices(name: str, options: Mapping[str, Any]) -> None:
    """Raise TaskKindError when ``device`` asks for CUDA and this machine has none (local runs only:
    the workers of a Dask cluster may have GPUs the client lacks)."""
    device = options.get("device")
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise TaskKindError(
                f"device = {device!r}: no CUDA GPU on this machine; allowed here: 'cpu' | 'auto' "
                "(or run on GPU workers with --scheduler)"
            )


def _result_dict(r: Any) -> dict:
    d = to_jsonable(r)
    if not isinstance(d, dict):
        raise TypeError(f"a task function must return a mapping or an object with to_dict(), got {type(r).__name__}")
    return d


# ----- built-in task functions (run in the worker) ---------------------------------------------------
def theory_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """State evolution (Results 3-5), warm-started from the neighbouring point's result."""
    from hdlora.theory.solve import solve

    kwargs = dict(options)
    if init is not None:
        kwargs["init"] = init
    return _result_dict(solve(params, **kwargs))


def simulate_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Finite-D simulation (pre-training + LoRA), averaged over the seeds by the simulator."""
    from hdlora.simulate.run import run

    return _result_dict(run(params, **dict(options)))


def bayes_optimal_task(params: Params, options: Mapping[str, Any], init: Mapping[str, Any] | None) -> dict:
    """Bayes-optimal fine-tuning error (Appendix B)."""
    from hdlora.theory import bayes

    return _result_dict(bayes.bayes_optimal(params, **dict(options)))


register(
    Kind(
        "theory",
        f"{__name__}:theory_task",
        "hdlora.theory:solve",
        warm_start=True,
        description="state evolution of pre-training and fine-tuning (Results 3-5)",
    )
)
register(
    Kind(
        "simulate",
        f"{__name__}:simulate_task",
        "hdlora.simulate:run",
        required=("dim", "seeds"),
        description="finite-D simulation; options dim, seeds",
    )
)
register(
    Kind(
        "bayes_optimal",
        f"{__name__}:bayes_optimal_task",
        "hdlora.theory.bayes:bayes_optimal",
        description="Bayes-optimal pre-training and fine-tuning errors (Result 6, Appendix B)",
        irrelevant=("lam", "lam_ft", "kappa", "beta", "active_pool"),
    )
)  # documented in bayes_optimal


# ----- execution of one task (in the worker) -------------------------------------------------------------
_THREADS_SET = False


def limit_threads(n: int = 1) -> None:
    """One BLAS / torch thread in this process (workers of a pool each use one core)."""
    global _THREADS_SET
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if not _THREADS_SET:
        try:
            import torch

            torch.set_num_threads(n)
        except ImportError:  # pragma: no cover
            pass
        _THREADS_SET = True


def run_task(
    kind: str,
    params: Mapping[str, Any],
    options: Mapping[str, Any],
    init: Mapping[str, Any] | None = None,
    threads: int | None = 1,
) -> dict:
    """Run one task; never raises for a failure of the task itself.

    Returns a dict with ``status`` ('ok' or 'failed'), ``result`` (dict or None),
    ``error`` (traceback text or None), ``warnings`` (messages raised during the
    task, e.g. non-convergence), ``wall_s`` and ``worker`` (host:pid).
    """
    if threads is not None:
        limit_threads(threads)
    t0 = time.perf_counter()
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = resolve(kind)
            result = _result_dict(fn(Params.from_dict(params), dict(options), init))
        status, error = "ok", None
    except Exception:  # noqa: BLE001 (a failing task is recorded, not raised)
        status, result, error = "failed", None, traceback.format_exc()
    from hdlora import code_version

    msgs = [f"{w.category.__name__}: {w.message}" for w in caught]
    return {
        "status": status,
        "result": result,
        "error": error,
        "warnings": msgs,
        "wall_s": time.perf_counter() - t0,
        "worker": worker_name(),
        "version": code_version(),
    }
