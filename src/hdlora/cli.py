"""Command line: ``hdlora <command> [flags]``.

The parameter flags are shared by every command and map one-to-one onto the
fields of :class:`hdlora.Params`.  Each command lives in its own module, which
defines ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches and turns bad input into a one-line error (exit status 2).

Start-up is instant: building a parser imports nothing heavy (no torch, dask,
matplotlib, pandas, scipy); each command imports what it needs inside its
``run``, and only the module of the command being run is imported at all
(``hdlora --help`` imports none of them).

Exit status: 0 success, 1 some work failed (sweeps, figures), 2 bad input (one
line on stderr naming the parameter, its range and the way out), 130
interrupted (Ctrl-C).  A closed output pipe (``hdlora ... | head``) ends quietly.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .params import TOL_RANGE, Params

# command name -> (module, one-line help). Modules are imported lazily: only the one that runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("hdlora.simulate.cli", "finite-D simulation: pre-training + LoRA fine-tuning (L-BFGS)"),
    "theory": ("hdlora.theory.cli", "state evolution of pre-training and fine-tuning (Results 3-5)"),
    "sweep": ("hdlora.experiments.cli", "run a sweep file (TOML): resumable, local pool or Dask cluster"),
    "optimize": ("hdlora.experiments.optimize_cli", "theory-driven tuning of lam, lam_ft, beta"),
    "figure": (
        "hdlora.experiments.figure_cli",
        "reproduce a figure of the paper (theory lines, simulation markers, BO, baselines)",
    ),
    "explore": ("hdlora.explore.cli", "interactive explorer of the theory curves in the browser (local Bokeh server)"),
}

#: names of the library's bad-input exception classes: turned into one line + exit 2 by :func:`main`.
#: (Matched by name along the MRO so that this module imports none of their heavy modules.)
USER_ERRORS = ("ParamError", "SweepError", "FigureError", "ResourceError", "StoreError")


# ----------------------------------------------------------------------------- argument types
def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (or inf), got {text!r}") from None


def _lam(text: str) -> float:
    """--lam: a number >= 0, inf, or 0+ (= 0: the lam -> 0+ limit; in the theory the min-norm interpolator
    while the data are interpolated, see :mod:`hdlora.theory.pretrain`)."""
    if text.strip() == "0+":
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0, inf, or 0+ (the lam -> 0+ limit), got {text!r}"
        ) from None


def integer(text: str) -> int:
    """An integer flag: ``3e4`` and ``30000.0`` are accepted (integral), ``1000.5``, ``nan``, ``inf`` refused."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (3e4 is accepted), got {text!r}") from None
    if not math.isfinite(x) or x != int(x):
        raise argparse.ArgumentTypeError(f"expected an integer (3e4 is accepted), got {text!r}")
    return int(x)


def tolerance(text: str) -> float:
    """The fixed-point tolerance: a number in TOL_RANGE (the library enforces the same range)."""
    lo, hi = TOL_RANGE
    x = _float(text)
    if not (lo <= x <= hi):
        raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {text!r}; leave it out for the default")
    return x


class Parser(argparse.ArgumentParser):
    """argparse with defaults in every help and errors on ONE stderr line (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(message.split())
        if message.endswith("expected one argument"):
            message += "; write a value that starts with '-' as --flag=VALUE"
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_param_arguments(p: argparse.ArgumentParser) -> None:
    """The model parameters, with the paper's symbols in the help."""
    d = Params()
    g = p.add_argument_group("model parameters (paper symbols)")
    g.add_argument("--alpha", type=_float, default=d.alpha, help="alpha: N = alpha D^2 pre-training samples")
    g.add_argument("--alpha-ft", type=_float, default=d.alpha_ft, help="alpha': N' = alpha' D fine-tuning samples")
    g.add_argument("--tokens", type=integer, default=d.tokens, help="T: tokens per sequence (integer >= 2)")
    g.add_argument("--kappa0", type=_float, default=d.kappa0, help="kappa0: target rank P0 = kappa0 D")
    g.add_argument("--kappa", type=_float, default=d.kappa, help="kappa: student width P = kappa D (>= 1)")
    g.add_argument("--noise", type=_float, default=d.noise, help="Delta: label noise")
    g.add_argument(
        "--lam",
        type=_lam,
        default=d.lam,
        help="lambda: pre-training ridge (inf: LoRA only; 0 or 0+: the lam -> 0+ limit)",
    )
    g.add_argument("--lam-ft", type=_float, default=d.lam_ft, help="lambda': fine-tuning ridge (inf: frozen)")
    g.add_argument("--reuse", action="store_true", help="e = 1: fine-tune on reused pre-training sequences")
    g.add_argument("--activation", default=d.activation, help="softmax | linear (sigma(x) = x/T)")


def _strengths(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"teacher_strengths must be comma-separated numbers > 0 such as 1,0.5, got {text!r}"
        ) from None


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    """The rank-r LoRA / rank-r* task flags (beyond the paper; docs/theory/rank_r.md): fields of Params."""
    g = p.add_argument_group("rank-r LoRA on a rank-r* task (beyond the paper; defaults: the paper's rank one)")
    g.add_argument("--lora-rank", type=integer, default=1, help="r: rank of the LoRA update w (D x r), integer >= 1")
    g.add_argument(
        "--teacher-rank", type=integer, default=1, help="r*: rank of the fine-tuning teacher w* (D x r*), integer >= 1"
    )
    g.add_argument(
        "--teacher-strengths",
        type=_strengths,
        default=None,
        help="s_1,...,s_r*: column strengths of w* (w*_k = s_k g_k, q0 = diag(s_k^2)); default all 1",
    )


def rank_params(args: argparse.Namespace) -> dict[str, Any]:
    """The rank fields of Params from :func:`add_rank_arguments`'s flags."""
    return {"lora_rank": args.lora_rank, "teacher_rank": args.teacher_rank, "teacher_strengths": args.teacher_strengths}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """--quiet (no progress, no warnings on stderr; errors are still printed)."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no warnings on stderr")


def params_from_args(args: argparse.Namespace, **extra: Any) -> Params:
    return Params(
        alpha=args.alpha,
        alpha_ft=args.alpha_ft,
        tokens=args.tokens,
        kappa0=args.kappa0,
        kappa=args.kappa,
        noise=args.noise,
        lam=args.lam,
        lam_ft=args.lam_ft,
        reuse=args.reuse,
        activation=args.activation,
        **extra,
    )


# ----------------------------------------------------------------------------- output
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _jsonable(x.item())
    return x


def dumps(obj: Any) -> str:
    """Strict JSON (NaN -> null, inf -> "inf")."""
    return json.dumps(_jsonable(obj), indent=2, allow_nan=False)


def format_table(rows: dict[str, Any], title: str = "") -> str:
    """A readable two-column table for the non-JSON output."""
    width = max((len(k) for k in rows), default=0)
    lines = [title] if title else []
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def print_warnings(command: str, messages: Sequence[str], quiet: bool = False) -> None:
    """The run's warnings (non-converged solves, replicon violations...) on stderr, also in --json mode."""
    if quiet:
        return
    for m in messages:
        print(f"hdlora {command}: warning: {m}", file=sys.stderr)


# ----------------------------------------------------------------------------- dispatch
def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is one), or None."""
    for a in argv:
        if a in COMMANDS:
            return a
        if not a.startswith("-"):
            return None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; the flags of command ``only`` (default: every command) are added, others get none.

    Adding a command's flags imports its (light) CLI module; ``hdlora --help`` needs none.
    """
    parser = Parser(
        prog="hdlora",
        description="Theory and simulation of LoRA fine-tuning in a solvable attention model (arXiv 2606.05899).",
    )
    parser.add_argument(
        "--version",
        action=_Version,
        help="show the package version and the code version that keys stored results, and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=module)
        if only is None or only == name:
            importlib.import_module(module).add_arguments(sp)
            if not any("--quiet" in a.option_strings for a in sp._actions):
                add_common_arguments(sp)
    return parser


class _Version(argparse.Action):
    """--version: computed only when asked (hashing the numerics sources)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ._version import code_version

        print(f"hdlora {__version__} (code version keying stored results: {code_version()})")
        parser.exit()


def _is_user_error(exc: BaseException) -> bool:
    return any(c.__name__ in USER_ERRORS for c in type(exc).__mro__)


def _stdout_gone() -> None:
    """stdout's reader has gone (``| head``): send further output to /dev/null so that the exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # pragma: no cover (stdout without a file descriptor)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser(only=command or "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and bad flags (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    name = f"hdlora {args.command}"
    try:
        # --dry-run is handled by each command (hdlora.resources: the estimate, then stop)
        rc = int(importlib.import_module(args._module).run(args) or 0)
        sys.stdout.flush()
        return rc
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return 141  # as a Unix tool killed by SIGPIPE (128 + 13), silently
    except Exception as exc:
        if not _is_user_error(exc):
            raise  # a bug: keep the traceback
        msg = " ".join(str(exc).split())
        print(f"{name}: error: {msg}", file=sys.stderr)
        return 2


def console_main() -> None:  # pragma: no cover (the ``hdlora`` executable)
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console_main()
