"""The command line's side of the size checks (:mod:`hdlora.resources`): ``--dry-run`` and the
refusals of ``theory``, ``simulate``, ``optimize`` and ``figure``.

Kept out of :mod:`hdlora.resources`, which the simulator calls (token storage, its own refusal),
so that the results key (:func:`hdlora._version.code_version`, which skips CLI modules) does not
take in the figure and sweep planning these gates import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .params import ParamError, Params
from .resources import (
    Estimate,
    ResourceError,
    _is_cuda,
    available_memory,
    check_simulate,
    check_theory,
    fits,
    fmt_bytes,
    fmt_seconds,
    largest_fitting,
    limit_for,
    plan_estimate,
    refuse_message,
    simulate_estimate,
    theory_estimate,
)


def gate(
    est: Estimate, *, dry_run: bool, json_out: bool = False, check=None, extra: Mapping | None = None
) -> int | None:
    """The CLI hook: with ``dry_run`` print the estimate (and ``extra``) and return 0; else run
    ``check()`` (which raises :class:`ResourceError` when the run does not fit) and return None."""
    if dry_run:
        limit, source = limit_for(est)
        d = dict(extra or {})
        d.update(est.to_dict())
        d.update({"available": limit, "available_from": source, "fits": fits(est, limit)})
        if json_out:
            import json

            print(json.dumps(d, indent=2, default=str))
        else:
            print(
                f"dry run: {est.what}: memory ~{fmt_bytes(est.bytes)} ({est.biggest(3)}); "
                f"available {fmt_bytes(limit)} ({source}); fits: {'yes' if d['fits'] else 'no'}; "
                f"expected time ~{fmt_seconds(est.seconds)}" + "".join(f"; {k} {v}" for k, v in est.choices.items())
            )
        return 0
    if check is not None:
        check()
    return None


# --------------------------------------------------------------------------- CLI hooks (one call each)
def simulate_gate(args, params: Params, effective) -> int | None:
    """``hdlora simulate``: estimate, then ``--dry-run`` (print, exit 0) or refuse when it does not fit."""
    if isinstance(args.seeds, bool) or not isinstance(args.seeds, int) or args.seeds < 1:
        raise ParamError(f"--seeds must be an integer >= 1, got {args.seeds!r}")
    if isinstance(args.restarts, bool) or not isinstance(args.restarts, int) or args.restarts < 0:
        raise ParamError(f"--restarts must be an integer >= 0, got {args.restarts!r}")
    device = str(args.device)
    if device == "auto":
        device = "cuda" if _cuda_present() else "cpu"
    kw: dict[str, Any] = dict(
        seeds=args.seeds,
        device=device,
        effective=effective is not None,
        restarts=args.restarts,
        reduce_width=bool(getattr(args, "reduce_width", False)),
    )
    est = simulate_estimate(params, args.dim, **kw)
    return gate(
        est,
        dry_run=bool(getattr(args, "dry_run", False)),
        json_out=bool(getattr(args, "json", False)),
        check=lambda: check_simulate(params, args.dim, **kw),
    )


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def theory_gate(args, params: Params) -> int | None:
    """``hdlora theory``: estimate, then ``--dry-run`` (print, exit 0) or refuse when it does not fit."""
    kw: dict[str, Any] = dict(bayes_optimal=bool(getattr(args, "bayes_optimal", False)))
    est = theory_estimate(params, args.n_mc, **kw)
    return gate(
        est,
        dry_run=bool(getattr(args, "dry_run", False)),
        json_out=bool(getattr(args, "json", False)),
        check=lambda: check_theory(params, args.n_mc, **kw),
    )


def optimize_gate(args, params: Params) -> int | None:
    """``hdlora optimize``: one solve's memory, ``--max-solves`` solves' time."""
    solves = max(1, int(args.max_solves)) if isinstance(args.max_solves, int) else 1
    est = theory_estimate(params, args.n_mc, solves=solves, what="optimize")
    return gate(
        est,
        dry_run=bool(getattr(args, "dry_run", False)),
        json_out=bool(getattr(args, "json", False)),
        check=lambda: check_theory(params, args.n_mc, solves=solves, what="optimize"),
    )


# --------------------------------------------------------------------------- plans (sweeps, figures)


def _figure_tasks(fig) -> list:
    from .experiments.sweep import plan

    return [t for s in fig.sweeps for c in plan(s).chains for t in c]


def figure_gate(args, fig, mode: str) -> int | None:
    """``hdlora figure``: ``--dry-run`` prints the plan and the estimates (exit 0); otherwise refuse
    (one line) when the largest task does not fit, else say on stderr what the run will take."""
    import sys

    tasks = _figure_tasks(fig)
    pe = plan_estimate(tasks)
    limit, source = available_memory()
    ok = pe.largest is None or fits(pe.largest, limit_for(pe.largest)[0])
    if getattr(args, "dry_run", False):
        import json

        from .experiments.sweep import plan

        d = {
            "figure": fig.number,
            "mode": mode,
            "settings": {"dim": fig.settings.dim, "seeds": fig.settings.seeds, "n_mc": fig.settings.n_mc},
            "sweeps": {
                s.name: {"grid": dict(zip(s.axis_names, s.shape)), "tasks": sum(len(c) for c in plan(s).chains)}
                for s in fig.sweeps
            },
        }
        d.update(pe.to_dict())
        d.update(
            {
                "available": limit,
                "available_from": source,
                "fits": ok,
                "note": "time: serial, rough (order of magnitude); memory: the largest task (x workers in a pool)",
            }
        )
        print(json.dumps(d, indent=2, default=str))
        return 0
    if not ok:
        est = pe.largest
        assert est is not None  # ok is True when there is no largest task
        lim, src = limit_for(est)
        hints = ["--quick"]
        if not _is_cuda(est.device):
            hints.append('a GPU (sweep option device = "cuda")')
        dmax = _largest_figure_dim(fig, mode, lim)
        if dmax is not None:
            hints.append(f"a smaller --dim (<= {dmax} fits)")
        raise ResourceError(
            f"figure {fig.number}: largest task: "
            + refuse_message(est, lim, src, ", ".join(hints)).replace(
                "expected time", f"whole figure ({pe.n_tasks} tasks, serial) ~{fmt_seconds(pe.seconds)}; that task", 1
            )
        )
    if pe.largest is not None:
        print(
            f"figure {fig.number}: {pe.n_tasks} tasks, largest ~{fmt_bytes(pe.largest.bytes)} of "
            f"{fmt_bytes(limit)} available ({pe.largest.what}"
            + "".join(f", {k} {v}" for k, v in pe.largest.choices.items())
            + f"), expected ~{fmt_seconds(pe.seconds)} of work (rough)",
            file=sys.stderr,
        )
    return None


def _largest_figure_dim(fig, mode: str, limit: int) -> int | None:
    from .experiments.figures import build_figure

    def make(d):
        f = build_figure(fig.number, mode=mode, out=fig.out, dim=d, seeds=fig.settings.seeds, n_mc=fig.settings.n_mc)
        pe = plan_estimate(_figure_tasks(f))
        return pe.largest or Estimate("", {})

    return largest_fitting(make, 2, max(2, fig.settings.dim - 1), limit)
