"""What the explorer shows, without any web code: the view, its curves, markers, commands and PNG.

A :class:`View` is the state of the page: the fixed parameters (the sliders), the swept
parameter (the x-axis) with its range, and the Monte-Carlo size.  From it:

* :func:`solve_curve` computes the theory curves E' (fine-tuning test error, Result 3 /
  eq. 19), o_w (overlap m / sqrt(q q0)) and Delta_eff (eqs. 25-26) with
  :func:`hdlora.theory.solve`, point by point along the axis, each point warm-started from
  its converged neighbour (as a sweep's continuation chain does);
* :func:`simulation_markers` picks the finite-D simulation rows of a results database whose
  fixed parameters match the view;
* :func:`theory_command` / :func:`sweep_command` write the ``hdlora theory`` and
  ``hdlora sweep`` commands that reproduce the view;
* :func:`render_png` draws the same data with matplotlib (the figure's download).

Nothing here imports torch (the theory is numpy/scipy; the database is SQLite/JSON).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..params import ParamError, Params

# ----- what the page controls ------------------------------------------------------------------------------
# Params field -> (label with the paper's symbol, slider start, end, step)
SLIDERS: dict[str, tuple[str, float, float, float]] = {
    "alpha": ("α (pre-training samples N = αD²)", 0.01, 2.0, 0.01),
    "alpha_ft": ("α' (fine-tuning samples N' = α'D)", 0.1, 10.0, 0.1),
    "tokens": ("T (tokens)", 2, 10, 1),
    "kappa0": ("κ0 (target rank P0 = κ0 D)", 0.1, 3.0, 0.05),
    "kappa": ("κ (student width P = κD)", 1.0, 4.0, 0.05),
    "noise": ("Δ (label noise)", 0.0, 3.0, 0.01),
    "lam": ("λ (pre-training ridge)", 0.001, 5.0, 0.001),
    "lam_ft": ("λ' (fine-tuning ridge)", 0.001, 5.0, 0.001),
    "beta": ("β (recalibration, eq. 26)", 0.05, 2.0, 0.01),
    # beyond the paper (docs/theory/rank_r.md): a rank-r LoRA on a rank-r* task (teacher strengths all 1);
    # the rank-r theory needs r T <= 64 (a point beyond it is shown as failed, with the message)
    "lora_rank": ("r (LoRA rank)", 1, 8, 1),
    "teacher_rank": ("r* (teacher rank)", 1, 4, 1),
}

#: integer parameters (sliders and axes round to integers)
INTEGER_FIELDS = ("tokens", "lora_rank", "teacher_rank")

# x-axis choices: Params field -> (default start, stop, log spacing)
AXES: dict[str, tuple[float, float, bool]] = {
    "alpha_ft": (0.2, 10.0, True),
    "alpha": (0.02, 2.0, True),
    "tokens": (2, 10, False),
    "kappa0": (0.1, 3.0, True),
    "kappa": (1.0, 4.0, False),
    "noise": (0.01, 3.0, True),
    "lam": (0.001, 5.0, True),
    "lam_ft": (0.001, 5.0, True),
    "beta": (0.05, 2.0, False),
    "lora_rank": (1, 8, False),
}

# curve name -> (TheoryResult / simulation result key, axis label)
CURVES: dict[str, tuple[str, str]] = {
    "E": ("finetune_test_error", "E' (fine-tuning test error)"),
    "overlap": ("overlap", "o_w (overlap)"),
    "delta_eff": ("delta_eff", "Δ_eff (effective noise)"),
}

MIN_POINTS, MAX_POINTS = 2, 60
MIN_N_MC = 100


@dataclass(frozen=True)
class View:
    """The state of the explorer: fixed parameters, swept axis and its range, Monte-Carlo size."""

    params: Params = field(default_factory=lambda: Params(activation="linear"))
    axis: str = "alpha_ft"
    start: float = AXES["alpha_ft"][0]
    stop: float = AXES["alpha_ft"][1]
    num: int = 15
    log: bool = True
    n_mc: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ParamError(f"x-axis must be one of {sorted(AXES)}, got {self.axis!r}")
        if isinstance(self.num, bool) or not isinstance(self.num, int) or not MIN_POINTS <= self.num <= MAX_POINTS:
            raise ParamError(f"points must be an integer in [{MIN_POINTS}, {MAX_POINTS}], got {self.num!r}")
        if isinstance(self.n_mc, bool) or not isinstance(self.n_mc, int) or self.n_mc < MIN_N_MC:
            raise ParamError(f"n_mc must be an integer >= {MIN_N_MC}, got {self.n_mc!r}")
        for name in ("start", "stop"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ParamError(f"x-axis {name} must be a finite number, got {v!r}")
        if self.log and (self.start <= 0 or self.stop <= 0):
            raise ParamError(
                f"a log-spaced x-axis needs start > 0 and stop > 0, got {self.start}, {self.stop}; "
                "untick 'log spacing' or choose positive bounds"
            )
        if self.start == self.stop:
            raise ParamError(f"x-axis start and stop must differ, got {self.start} twice")
        # every point of the axis must be a valid Params (e.g. kappa >= 1, T integer >= 2)
        for x in self.xs():
            self.point(x)

    @classmethod
    def for_axis(cls, params: Params, axis: str, **kw: Any) -> View:
        """A view along ``axis`` with that axis' default range."""
        if axis not in AXES:
            raise ParamError(f"x-axis must be one of {sorted(AXES)}, got {axis!r}")
        start, stop, log = AXES[axis]
        kw = {"start": start, "stop": stop, "log": log, **kw}
        return cls(params=params, axis=axis, **kw)

    def replace(self, **kw: Any) -> View:
        return dataclasses.replace(self, **kw)

    def xs(self) -> list[float]:
        """The grid of the axis, the same values ``hdlora sweep`` builds from ``{start, stop, num, log}``
        (T: the distinct integers of that range)."""
        from ..experiments.sweep import _axis_values

        spec = {"start": float(self.start), "stop": float(self.stop), "num": self.num, "log": self.log}
        vals = list(_axis_values("explore", self.axis, spec))
        if self.axis in INTEGER_FIELDS:  # integer axis: distinct rounded values
            vals = sorted({int(round(v)) for v in vals})
        return vals

    def axis_spec(self) -> dict[str, Any] | list:
        """The [axes] entry of the sweep file: a range, or the list of integers for T and r."""
        if self.axis in INTEGER_FIELDS:
            return self.xs()
        return {"start": float(self.start), "stop": float(self.stop), "num": self.num, "log": self.log}

    def point(self, x: float) -> Params:
        return self.params.replace(**{self.axis: int(x) if self.axis in INTEGER_FIELDS else float(x)})


# ----- theory curves ------------------------------------------------------------------------------------------
@dataclass
class CurvePoint:
    """One solved point of the curve (NaN values where the solve raised)."""

    x: float
    E: float
    overlap: float
    delta_eff: float
    converged: bool
    replicon_ok: bool
    wall_time: float
    error: str = ""
    state: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "state"}


def solve_point(
    params: Params, x: float, *, n_mc: int, seed: int = 0, init: Mapping[str, float] | None = None
) -> CurvePoint:
    """:func:`hdlora.theory.solve` at one point; a failure becomes a NaN point with its message.

    A warm start (``init``) that does not converge is repeated once from the default (cold) start, as
    ``hdlora optimize`` does: measured at the explorer's first point after a Delta slider move (linear,
    alpha' = 0.2, n_mc = 500, Delta 0.5 -> 1.31), the warm-started fine-tuning crawled at residual 3e-3 for 500
    iterations near m = 0.20 while the cold start converged in 19 (m = 0.115)."""
    from ..theory.solve import solve

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = solve(params, n_mc=n_mc, seed=seed, init=init, warn=False)
            if init is not None and not r.converged:
                r = solve(params, n_mc=n_mc, seed=seed, warn=False)
    except (ParamError, ArithmeticError, ValueError, RuntimeError) as exc:
        nan = math.nan
        return CurvePoint(x, nan, nan, nan, False, False, time.perf_counter() - t0, error=str(exc))
    return CurvePoint(
        x,
        r.finetune_test_error,
        r.overlap,
        r.delta_eff,
        bool(r.converged),
        bool(r.replicon_ok),
        r.wall_time,
        state=r.state,
    )


def solve_curve(
    view: View,
    *,
    init: Mapping[str, float] | None = None,
    on_point: Callable[[int, CurvePoint], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> list[CurvePoint]:
    """The theory curves along the view's axis, in order, each point warm-started from the previous
    converged one (the first from ``init``, e.g. the first point of the view before a slider moved).
    ``on_point(i, point)`` is called after each point; ``cancelled()`` stops early."""
    out: list[CurvePoint] = []
    for i, x in enumerate(view.xs()):
        if cancelled():
            break
        p = solve_point(view.point(x), x, n_mc=view.n_mc, seed=view.seed, init=init)
        init = p.state if p.converged else init
        out.append(p)
        if on_point is not None:
            on_point(i, p)
    return out


def curve_columns(points: Sequence[CurvePoint]) -> dict[str, dict[str, list]]:
    """Plot columns: the lines (non-converged points left out, NaN breaks the line, as the figures do),
    the non-converged points (x markers) and the replicon-violated ones (open triangles)."""

    def col(pts, key):
        return [float(getattr(p, key)) for p in pts]

    line = {"x": col(points, "x")}
    for name in CURVES:
        line[name] = [float(getattr(p, name)) if p.converged else math.nan for p in points]
    bad = [p for p in points if not p.converged and math.isfinite(p.E)]
    unstable = [p for p in points if p.converged and not p.replicon_ok]
    return {
        "theory": line,
        "nonconverged": {"x": col(bad, "x"), **{n: col(bad, n) for n in CURVES}},
        "replicon": {"x": col(unstable, "x"), **{n: col(unstable, n) for n in CURVES}},
    }


# ----- simulation markers from a results database -------------------------------------------------------------
_COMPARED = tuple(f.name for f in dataclasses.fields(Params))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        a, b = float(a), float(b)
        return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-9 * max(abs(a), abs(b)))
    return a == b


def read_simulation_rows(path: str) -> list[dict]:
    """The finished ``simulate`` rows of a results database (every code version): params and result."""
    import os

    from ..experiments.store import Store

    if not os.path.isfile(path):
        raise ParamError(
            f"--database {path!r} does not exist; give a results database written by "
            "'hdlora sweep' (e.g. results/smoke.sqlite) or leave --database out"
        )
    with Store(path, version="explore-reader") as st:
        return [
            {"params": r.params, "result": r.result}
            for r in st.rows(all_versions=True)
            if r.kind == "simulate" and r.ok and r.result
        ]


def simulation_markers(rows: Iterable[Mapping[str, Any]], view: View) -> dict[str, list]:
    """Markers (x, the three curves and their error bars: std over seeds) of the rows whose parameters equal
    the view's fixed parameters (every Params field but the x-axis)."""
    fixed = view.params.to_dict()
    cols: dict[str, list] = {"x": [], "dim": []}
    for n in CURVES:
        cols[n] = []
        cols[f"{n}_lo"] = []
        cols[f"{n}_hi"] = []
    for row in rows:
        p = row["params"]
        if not all(_same(p.get(k), fixed.get(k)) for k in _COMPARED if k != view.axis):
            continue
        res = row["result"]
        x = p.get(view.axis)
        if x is None:
            continue
        n_seeds = float(res.get("n_seeds", 1) or 1)
        cols["x"].append(float(x))
        cols["dim"].append(res.get("dim"))
        for n, (key, _) in CURVES.items():
            y = res.get(key, math.nan)
            y = math.nan if y is None else float(y)
            se = res.get(f"{key}_se")
            sd = float(se) * math.sqrt(n_seeds) if isinstance(se, (int, float)) and math.isfinite(se) else 0.0
            cols[n].append(y)
            cols[f"{n}_lo"].append(y - sd)
            cols[f"{n}_hi"].append(y + sd)
    return cols


# ----- commands that reproduce the view ----------------------------------------------------------------------
_FLAGS = {
    "alpha": "--alpha",
    "alpha_ft": "--alpha-ft",
    "tokens": "--tokens",
    "kappa0": "--kappa0",
    "kappa": "--kappa",
    "noise": "--noise",
    "lam": "--lam",
    "lam_ft": "--lam-ft",
    "beta": "--beta",
}


def _num(v: float) -> str:
    return "inf" if v == math.inf else repr(float(v)) if not float(v).is_integer() else f"{float(v):g}"


def theory_command(view: View, x: float | None = None) -> str:
    """``hdlora theory ...`` at one point of the view (default: the middle of the axis)."""
    xs = view.xs()
    x = xs[len(xs) // 2] if x is None else x
    p = view.point(x)
    words = ["hdlora", "theory"]
    for name, flag in _FLAGS.items():
        v = getattr(p, name)
        words += [flag, str(int(v)) if name == "tokens" else _num(v)]
    for name, flag in (("lora_rank", "--lora-rank"), ("teacher_rank", "--teacher-rank")):
        if getattr(p, name) != 1:  # the rank-r theory (beyond the paper)
            words += [flag, str(int(getattr(p, name)))]
    if p.reuse:
        words.append("--reuse")
    words += ["--activation", p.activation, "--n-mc", str(view.n_mc)]
    if view.seed:
        words += ["--seed", str(view.seed)]
    return shlex.join(words)


def sweep_toml(view: View, name: str = "explore") -> str:
    """The sweep file of the view: [params] the fixed parameters, [axes] the x-axis, [run.theory] n_mc."""
    from ..experiments.figures import toml_text

    fixed = {k: v for k, v in view.params.to_dict().items() if k != view.axis and v is not None}
    doc = {
        "sweep": {"name": name, "database": f"{name}.sqlite", "continuation": view.axis},
        "params": fixed,
        "axes": {view.axis: view.axis_spec()},
        "run": {"theory": {"n_mc": view.n_mc, "seed": view.seed}},
    }
    return toml_text(doc)


def sweep_command(view: View, name: str = "explore") -> str:
    """A shell snippet that writes the sweep file and runs it (theory along the axis, exported to CSV)."""
    return (
        f"cat > {name}.toml <<'EOF'\n{sweep_toml(view, name).rstrip()}\nEOF\n"
        f"hdlora sweep {name}.toml --export {name}.csv"
    )


# ----- the figure as a PNG ------------------------------------------------------------------------------------
def render_png(
    view: View, points: Sequence[CurvePoint], markers: Mapping[str, list] | None = None, dpi: int = 110
) -> bytes:
    """The three panels (E', o_w, Delta_eff against the axis) drawn with matplotlib, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cols = curve_columns(points)
    fig = Figure(figsize=(13, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (name, (_, label)) in zip(axes, CURVES.items()):
        ax.plot(cols["theory"]["x"], cols["theory"][name], "-", color="tab:blue", label="theory")
        if cols["nonconverged"]["x"]:
            ax.plot(
                cols["nonconverged"]["x"],
                cols["nonconverged"][name],
                "x",
                color="tab:blue",
                ms=9,
                mew=2,
                label="not converged",
            )
        if cols["replicon"]["x"]:
            ax.plot(
                cols["replicon"]["x"],
                cols["replicon"][name],
                "^",
                color="tab:blue",
                ms=8,
                mfc="none",
                label="replicon > 1 (RS unstable)",
            )
        if markers and markers.get("x"):
            y = markers[name]
            err = [
                [a - lo for a, lo in zip(y, markers[f"{name}_lo"])],
                [hi - a for a, hi in zip(y, markers[f"{name}_hi"])],
            ]
            ax.errorbar(markers["x"], y, yerr=err, fmt="o", color="tab:red", ms=5, capsize=2, label="simulation")
        finite = [y for y in cols["theory"][name] if math.isfinite(y)]
        if finite and max(finite) - min(finite) < 1e-3:  # as the page: no magnified solver-tolerance scatter
            mid = (max(finite) + min(finite)) / 2
            ax.set_ylim(mid - 5e-4, mid + 5e-4)
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel(view.axis)
        ax.set_ylabel(label)
        if view.log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    p = view.params
    fig.suptitle(f"hdlora explore: σ = {p.activation}, e = {p.e}, n_mc = {view.n_mc}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
