"""``hdlora figure N``: reproduce figure N (1-6) of the paper, or ``rank``: run its sweeps (resumable), plot, save.

``hdlora figure rank`` (beyond the paper): choosing the LoRA rank on a rank-2 task (E' and the overlap vs
alpha' per rank, E' vs the rank at lam' small and at lam' optimised per rank).

Writes ``<out>/figN.png``, ``figN.pdf``, ``figN.csv`` (every stored result of the figure,
one row per task), ``figN.sqlite`` (the results database; rerunning the command computes
only what is missing) and the figure's sweep files ``figN_*.toml``.  Prints where the
picture is.

Exit status: 0 when every task is stored as ok, 1 when some failed or are missing (the
figure is still drawn from what is there, and says so), 2 for a bad figure number or
option, or when nothing of the figure is stored (an existing figure is then left as it is,
never replaced by empty axes).
"""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import integer as _int
from .cli import add_executor_arguments, executor_arguments_error, scheduler_argument


def figure_number(text: str) -> int | str:
    """'rank' or an integer (checked against the figures by build_figure)."""
    if text.strip().lower() == "rank":
        return "rank"
    try:
        return _int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a figure number 1-6 or 'rank', got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("number", type=figure_number, help="figure number of the paper, 1-6, or 'rank' (choosing the rank)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="reduced version (smaller D, fewer seeds, points and n_mc): a few minutes on 2 cores",
    )
    mode.add_argument("--tiny", action="store_true", help="test configuration (2 points, D = 12, 1 seed): seconds")
    p.add_argument("--out", default="results/figures", help="output directory")
    add_executor_arguments(p)
    p.add_argument("--dim", type=_int, default=None, help="simulation dimension D (overrides the mode's)")
    p.add_argument("--seeds", type=_int, default=None, help="simulation seeds (overrides the mode's)")
    p.add_argument("--n-mc", type=_int, default=None, help="Monte-Carlo samples of the theory (overrides the mode's)")
    p.add_argument("--plan", action="store_true", help="validate and print the sweeps and task counts; run nothing")
    p.add_argument("--plot-only", action="store_true", help="draw from what is stored; compute nothing")
    p.add_argument("--no-progress", "-q", "--quiet", dest="no_progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan with the memory / time estimates (largest task, total) and stop",
    )


def run(args: argparse.Namespace) -> int:
    from hdlora.cli import dumps

    from .figures import FigureError, build_figure, plot_figure, run_figure
    from .sweep import SweepError, plan

    def fail(msg: str) -> int:
        print(f"hdlora figure: error: {msg}", file=sys.stderr)
        return 2

    if (msg := executor_arguments_error(args)) is not None:
        return fail(msg)
    mode = "quick" if args.quick else ("tiny" if args.tiny else "paper")
    try:
        fig = build_figure(args.number, mode=mode, out=args.out, dim=args.dim, seeds=args.seeds, n_mc=args.n_mc)
    except (FigureError, SweepError, ValueError) as exc:
        return fail(str(exc))
    if args.plan:
        summary = {
            "figure": fig.number,
            "mode": mode,
            "database": str(fig.database),
            "settings": {"dim": fig.settings.dim, "seeds": fig.settings.seeds, "n_mc": fig.settings.n_mc},
            "sweeps": {
                s.name: {
                    "grid": dict(zip(s.axis_names, s.shape)),
                    "runs": [r.label for r in s.runs],
                    "tasks": sum(len(c) for c in plan(s).chains),
                }
                for s in fig.sweeps
            },
        }
        print(dumps(summary))
        return 0
    if not args.plot_only:
        from hdlora.resources_cli import figure_gate

        if (rc := figure_gate(args, fig, mode)) is not None:
            return rc
    if args.plot_only and not fig.database.exists():
        return fail(f"--plot-only: no results database {fig.database} yet; run without --plot-only first")
    from .store import StoreError
    from .sweep import check_writable

    t0 = time.perf_counter()
    reports = []
    try:
        for suffix in ("png", "pdf", "csv"):  # before anything runs, not after
            check_writable(fig.path(suffix), "--out")
        if not args.plot_only:
            with scheduler_argument(args) as scheduler:
                reports = run_figure(fig, workers=args.workers, scheduler=scheduler, progress=not args.no_progress)
        paths = plot_figure(fig)
    except (ConnectionError, FigureError, SweepError, StoreError) as exc:
        return fail(str(exc))
    cov = paths["coverage"]
    wall = time.perf_counter() - t0
    n_tasks = sum(r.n_tasks for r in reports)
    n_computed = sum(r.n_computed for r in reports)
    n_failed = sum(r.n_failed_total for r in reports)
    n_missing = sum(r.n_missing for r in reports)
    n_nc = sum(r.n_not_converged for r in reports)
    interrupted = any(r.interrupted for r in reports)
    if reports:
        print(
            f"figure {fig.number} ({mode}): {n_tasks} tasks, {n_computed} computed now "
            f"({n_nc} not converged), {n_failed} failed, {n_missing} missing, {wall:.1f} s"
        )
    if not cov.complete:
        print(f"  drawn from what is stored: {cov.summary()}", file=sys.stderr)
    print(f"picture: {paths['png']}")
    print(f"  also: {paths['pdf']}, data {paths['csv']}, database {paths['database']}")
    if n_failed:
        print(
            "  failed tasks keep their error in the database (hdlora sweep <out>/figN_*.toml --retry-failed)",
            file=sys.stderr,
        )
    if interrupted:
        return 130
    return 1 if (n_failed or n_missing or not cov.complete) else 0


def main(argv: list[str] | None = None) -> int:
    from hdlora.cli import Parser

    parser = Parser(prog="hdlora figure", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
