"""``hdlora explore``: the interactive explorer in the browser (a local Bokeh server)."""

from __future__ import annotations

import argparse
import sys

from ..params import ParamError

_AXES = ("alpha_ft", "alpha", "tokens", "kappa0", "kappa", "noise", "lam", "lam_ft", "beta")  # = model.AXES


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _float, add_param_arguments

    add_param_arguments(p)
    p.set_defaults(activation="linear")  # a linear point solves in ~0.2 s: a live explorer by default
    g = p.add_argument_group("explorer")
    g.add_argument(
        "--beta", type=_float, default=1.0, help="beta: recalibration W_hat -> sqrt(beta) W_hat (eq. 26) (default: 1)"
    )
    g.add_argument("--x-axis", choices=_AXES, default="alpha_ft", help="swept parameter (default: alpha_ft)")
    g.add_argument("--points", type=int, default=15, help="points along the x-axis (default: 15)")
    g.add_argument(
        "--n-mc",
        type=int,
        default=2000,
        help="Monte-Carlo samples per expectation (default: 2000, small for speed; the paper uses 3e4)",
    )
    g.add_argument(
        "--database",
        default=None,
        metavar="RESULTS.sqlite",
        help="results database of 'hdlora sweep': its simulation rows matching the view become markers",
    )
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=0, help="port (default: 0, a free one; the URL is printed)")
    g.add_argument("--no-browser", action="store_true", help="do not open a browser; only print the URL")


def run(args: argparse.Namespace) -> int:
    from ..cli import params_from_args
    from .model import View, read_simulation_rows

    if not 0 <= args.port <= 65535:
        raise ParamError(f"--port must be in [0, 65535] (0: a free port), got {args.port}")
    params = params_from_args(args, beta=args.beta)
    view = View.for_axis(params, args.x_axis, num=args.points, n_mc=args.n_mc)
    rows = read_simulation_rows(args.database) if args.database else []
    try:
        import bokeh  # noqa: F401
    except ImportError:
        print("hdlora explore: error: needs Bokeh; install it with: pip install 'hdlora[explore]'", file=sys.stderr)
        return 2
    from .server import serve

    return serve(view, rows, host=args.host, port=args.port, open_browser=not args.no_browser)
