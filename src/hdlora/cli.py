"""Command line: ``hdlora <command> [flags]``.

The parameter flags are shared by every command and map one-to-one onto the
fields of :class:`hdlora.Params`.  Each command lives in its own module, which
defines ``add_arguments(parser)`` and ``run(args) -> int``; this file only
dispatches and turns bad input into a one-line error (exit status 2).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from typing import Any, Sequence

from .params import Params, ParamError

# command name -> (module, one-line help). Modules are imported lazily.
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("hdlora.simulate.cli", "finite-D simulation: pre-training + LoRA fine-tuning (L-BFGS)"),
    "theory": ("hdlora.theory.cli", "state evolution of pre-training and fine-tuning (Results 3-5)"),
    "sweep": ("hdlora.experiments.cli", "run a sweep file (TOML): resumable, local pool or Dask cluster"),
    "optimize": ("hdlora.experiments.optimize_cli", "theory-driven tuning of lam, lam_ft, beta"),
    "figure": ("hdlora.experiments.figure_cli", "reproduce a figure of the paper (theory lines, simulation markers, BO, baselines)"),
    "explore": ("hdlora.explore.cli", "interactive explorer of the theory curves in the browser (local Bokeh server)"),
}


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (or inf), got {text!r}") from None


def add_param_arguments(p: argparse.ArgumentParser) -> None:
    """The model parameters, with the paper's symbols in the help."""
    d = Params()
    g = p.add_argument_group("model parameters (paper symbols)")
    g.add_argument("--alpha", type=_float, default=d.alpha, help="alpha: N = alpha D^2 pre-training samples")
    g.add_argument("--alpha-ft", type=_float, default=d.alpha_ft, help="alpha': N' = alpha' D fine-tuning samples")
    g.add_argument("--tokens", type=_float, default=d.tokens, help="T: tokens per sequence (>= 2)")
    g.add_argument("--kappa0", type=_float, default=d.kappa0, help="kappa0: target rank P0 = kappa0 D")
    g.add_argument("--kappa", type=_float, default=d.kappa, help="kappa: student width P = kappa D (>= 1)")
    g.add_argument("--noise", type=_float, default=d.noise, help="Delta: label noise")
    g.add_argument("--lam", type=_float, default=d.lam, help="lambda: pre-training ridge (inf: LoRA only)")
    g.add_argument("--lam-ft", type=_float, default=d.lam_ft, help="lambda': fine-tuning ridge (inf: frozen)")
    g.add_argument("--reuse", action="store_true", help="e = 1: fine-tune on reused pre-training sequences")
    g.add_argument("--activation", default=d.activation, help="softmax | linear (sigma(x) = x/T)")


def params_from_args(args: argparse.Namespace, **extra: Any) -> Params:
    return Params(
        alpha=args.alpha, alpha_ft=args.alpha_ft, tokens=args.tokens, kappa0=args.kappa0,
        kappa=args.kappa, noise=args.noise, lam=args.lam, lam_ft=args.lam_ft,
        reuse=args.reuse, activation=args.activation, **extra)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdlora", description="Theory and simulation of LoRA fine-tuning in a solvable attention model "
                                   "(arXiv 2606.05899).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ParamError as exc:
        print(f"hdlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
