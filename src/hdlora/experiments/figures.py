"""The six figures of the paper: figure specs -> sweeps -> the results store -> plots.

A figure is one or more sweeps (:mod:`hdlora.experiments.sweep`, built here as sweep
documents and validated by :func:`~hdlora.experiments.sweep.parse_sweep`) sharing one
results database ``<out>/figN.sqlite``, and a plotting function that reads the stored
results back (:func:`~hdlora.experiments.sweep.sweep_frame`).  Running a figure is
therefore resumable (a rerun computes only what is missing) and can run on a Dask
cluster, exactly like ``hdlora sweep``; each sweep is also written as a TOML file next to
the figure (``figN_<sweep>.toml``) so that it can be rerun or extended by hand.

Figures (paper parameters; Sections 4-4.3, Appendix E):

1. E' vs lam for lam' in {0.05, 1, inf} (Delta = 0.5 left, 2 right), LoRA-only (lam = inf)
   lines, Bayes-optimal line, simulations; third panel: E' vs lam' at the optimal lam.
2. E' vs Delta_eff on an effective pre-training (M = 1, Q0 = Q), Delta = 0 / 2, softmax.
3. e = 1: L and E, E', o_w vs lam for lam' in {0.1, 1}.
4. Active fine-tuning: E' with and without Algorithm 1 vs Delta_eff, Delta E', o_w;
   min over lam' in {0.1, 0.2, 0.5, 1} at each point.
5. Linear activation: E' vs Delta_eff and the excess over Delta_eff = 0.
6. Recalibration (App. E): E(beta) vs beta/beta*, E' vs lam' for beta = 1 and 0.8 beta*.

Beyond the paper, figure ``rank`` ("which LoRA rank should I use?", issue 14): a rank-r LoRA on a rank-2
task (teacher strengths 1 and 0.5, orthonormal teacher columns in the simulations), Fig. 1 setting otherwise
(alpha = 0.1, T = 3, kappa0 = kappa = 1, Delta = 0.5, lam = 0.1, softmax): (a) E' and (b) the overlap against
alpha' for r in {1, 2, 3, 4} at a small lam' = 0.2; (c) E' against r at alpha' = 1, for lam' = 0.2 and for
lam' minimised per rank (:func:`hdlora.experiments.optimize.optimize`, task ``rank_optimal_theory_task``).

Effective pre-training (Figs. 2, 4, 5) is parameterised through ``kappa0``: Q0 = 1 + kappa0
and Q = Q0, M = 1, so Delta_eff = Delta/2 + Q0 - 2M + Q = Delta/2 + 2 kappa0 (eq. 25).

The task functions (``*_task``, "module:function" task kinds of the sweep files, run in the
workers) live in :mod:`hdlora.experiments.figure_tasks`, which the results key covers; this
module only builds the sweeps and plots, so editing a plot keeps stored results valid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdlora.params import DEFAULT_N_MC

from .figure_tasks import (
    ACTIVE_THEORY,
    EFF_SIM,
    EFF_THEORY,
    RANK_OPTIMAL,
    RECAL_PRETRAIN,
    RECAL_SIM,
    RECAL_THEORY,
)
from .sweep import SweepSpec, parse_sweep

#: the paper's figures 1-6, and "rank" (beyond the paper: choosing the LoRA rank, issue 14)
FIGURES: tuple[int | str, ...] = (1, 2, 3, 4, 5, 6, "rank")


class FigureError(ValueError):
    """A bad figure number or setting."""


# ----- settings and specs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Sizes of a figure run: simulation D and seeds, Monte-Carlo samples, grid densities."""

    mode: str  # 'paper', 'quick' or 'tiny'
    dim: int
    seeds: int
    n_mc: int
    points: int  # theory points along the x axis
    sim_points: int  # simulated points along the x axis
    bo: Mapping[str, int] = field(default_factory=dict)

    def footnote(self, what: str = "") -> str:
        from hdlora import __version__

        tag = {"paper": "paper grid, sizes as stated", "quick": "QUICK mode (reduced)", "tiny": "TINY test mode"}[
            self.mode
        ]
        return (
            f"simulations: D = {self.dim}, {self.seeds} seed(s), error bars = std over seeds; theory: n_mc = "
            f"{self.n_mc}{what}; {tag}; hdlora {__version__}"
        )


#: Default settings per figure and mode (paper: the paper's D and seeds; quick: a few minutes on 2 cores).
_DEFAULTS: dict[int | str, dict[str, dict[str, Any]]] = {
    1: {
        "paper": dict(dim=150, seeds=4, n_mc=DEFAULT_N_MC, points=16, sim_points=8),
        "quick": dict(dim=80, seeds=2, n_mc=2000, points=7, sim_points=4),
    },
    2: {
        "paper": dict(dim=10000, seeds=5, n_mc=DEFAULT_N_MC, points=10, sim_points=5),
        "quick": dict(dim=200, seeds=2, n_mc=2000, points=6, sim_points=4),
    },
    3: {
        "paper": dict(dim=1000, seeds=5, n_mc=DEFAULT_N_MC, points=14, sim_points=7),
        "quick": dict(dim=60, seeds=2, n_mc=2000, points=7, sim_points=4),
    },
    4: {
        "paper": dict(dim=10000, seeds=5, n_mc=DEFAULT_N_MC, points=8, sim_points=4),
        "quick": dict(dim=60, seeds=2, n_mc=2000, points=5, sim_points=3),
    },
    5: {
        "paper": dict(dim=5000, seeds=5, n_mc=DEFAULT_N_MC, points=10, sim_points=5),
        "quick": dict(dim=200, seeds=2, n_mc=2000, points=6, sim_points=4),
    },
    6: {
        "paper": dict(dim=800, seeds=10, n_mc=DEFAULT_N_MC, points=10, sim_points=5),
        "quick": dict(dim=80, seeds=2, n_mc=2000, points=6, sim_points=3),
    },
    # quick: D = 60 (a rank-4 softmax simulation at alpha' = 1 took 37-61 s per seed at D = 60-100 on this shared
    # 2-core machine)
    # paper: theory at n_mc = 4000 (a rank-3 softmax point at alpha' = 1 took 87 s at n_mc = 4000, 150 iterations;
    # in panel (c) r = 6 took 20 min (not converged) and r = 5 had not finished after 65 min, so (c) stops at r = 4;
    # at 3e4 the figure would take many hours on 2 cores), simulations at D = 200 (a rank-4 seed at D = 300 took 48 s,
    # 45 s of it pre-training, which every one of the 16 simulation tasks repeats)
    "rank": {
        "paper": dict(dim=200, seeds=4, n_mc=4000, points=7, sim_points=4),
        "quick": dict(dim=60, seeds=2, n_mc=1000, points=4, sim_points=2),
    },
}
_TINY = dict(dim=12, seeds=1, n_mc=500, points=2, sim_points=2)
_BO = {
    "paper": {},
    "quick": {"n_mc": 1000, "n_nodes": 8, "n_mc_error": 4000},
    "tiny": {"n_mc": 300, "n_nodes": 6, "n_mc_error": 1000},
}


def settings_for(
    number: int | str, mode: str = "paper", *, dim: int | None = None, seeds: int | None = None, n_mc: int | None = None
) -> Settings:
    check_number(number)
    if mode not in ("paper", "quick", "tiny"):
        raise FigureError(f"mode must be 'paper', 'quick' or 'tiny', got {mode!r}")
    base = dict(_TINY if mode == "tiny" else _DEFAULTS[number][mode])
    if mode == "tiny" and number == 3:  # e = 1 needs N' = alpha' D <= N = alpha D^2
        base["dim"] = 20
    for name, v, lo in (("dim", dim, 2), ("seeds", seeds, 1), ("n_mc", n_mc, 100)):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise FigureError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
            base[name] = v
    return Settings(mode=mode, bo=dict(_BO[mode]), **base)


def check_number(number: Any) -> int | str:
    if isinstance(number, bool) or not isinstance(number, (int, str)) or number not in FIGURES:
        raise FigureError(f"figure number must be one of {list(FIGURES)}, got {number!r}")
    return number


@dataclass(frozen=True)
class Figure:
    """A figure: its sweeps (sharing one database), settings and output paths."""

    number: int | str
    title: str
    settings: Settings
    sweeps: tuple[SweepSpec, ...]
    out: Path
    docs: tuple[dict, ...] = ()
    #: sweeps that depend on stored results (Fig. 1 inset: E' vs lam' at the optimal lam):
    #: a function (figure, frame of the first sweeps) -> sweep documents
    followups: Callable[[Figure, Any], list] | None = None

    def followup_docs(self, frame) -> list[dict]:
        return [] if self.followups is None else list(self.followups(self, frame))

    def followup_specs(self, frame) -> tuple[SweepSpec, ...]:
        return tuple(
            parse_sweep(d, source=f"figure {self.number} ({d['sweep']['name']})", base_dir=self.out)
            for d in self.followup_docs(frame)
        )

    @property
    def database(self) -> Path:
        return self.out / f"fig{self.number}.sqlite"

    def path(self, suffix: str) -> Path:
        return self.out / f"fig{self.number}.{suffix}"

    def sweep(self, name: str) -> SweepSpec:
        for s in self.sweeps:
            if s.name == name:
                return s
        raise KeyError(name)


def _log_axis(start: float, stop: float, num: int) -> dict:
    return {"start": start, "stop": stop, "num": max(1, num), "log": True}


def _sub(values: Sequence[float], k: int) -> list[float]:
    """k values spread over a list (ends included)."""
    values = list(values)
    if k >= len(values):
        return values
    if k <= 1:
        return [values[len(values) // 2]]
    idx = sorted({round(i * (len(values) - 1) / (k - 1)) for i in range(k)})
    return [values[i] for i in idx]


def _grid(start: float, stop: float, num: int) -> list[float]:
    if num <= 1:
        return [start]
    a, b = math.log(start), math.log(stop)
    return [float(math.exp(a + (b - a) * i / (num - 1))) for i in range(num)]


def _lin(start: float, stop: float, num: int) -> list[float]:
    if num <= 1:
        return [start]
    return [start + (stop - start) * i / (num - 1) for i in range(num)]


def _doc(fig: int | str, name: str, db: Path, params: dict, axes: dict, run: dict, continuation: str = "") -> dict:
    return {
        "sweep": {"name": f"fig{fig}-{name}", "database": str(db), "continuation": continuation},
        "params": params,
        "axes": axes,
        "run": run,
    }


FIG1 = dict(alpha=0.1, alpha_ft=3.0, tokens=3, kappa0=1.0, kappa=1.0, activation="softmax")
#: figure "rank": Fig. 1's setting (Delta = 0.5, lam = 0.1) on a rank-2 task with strengths 1 and 0.5
RANK_FIG = dict(
    alpha=0.1,
    tokens=3,
    kappa0=1.0,
    kappa=1.0,
    noise=0.5,
    lam=0.1,
    activation="softmax",
    teacher_rank=2,
    teacher_strengths=[1.0, 0.5],
)
#: the small lam' of panels (a)-(c) and the alpha' of panel (c)
#: (lam' = 0.05, Fig. 1's smallest, left every rank-r branch unconverged, measured at r = 1-4, alpha' = 0.5 and r = 1,
#: alpha' = 1, softmax, n_mc = 1000 and 4000; lam' = 0.1 too at r = 1, alpha' = 1; lam' = 0.2 converged there)
RANK_LAM_SMALL = 0.2
RANK_ALPHA_C = 1.0
#: per mode: alpha' grid, ranks of panels (a)-(b), ranks of panel (c) at lam' small (``ranks_c``) and optimised
#: (``ranks_opt``, default ``ranks_c``), the lam' search (coarse grid, tol on log10, ``max_iter`` per solve), the
#: fixed-point iteration cap of the theory points (``theory_max_iter``, default the solver's), the simulated alpha'
#: (RANK_ALPHA_C among them: panel (c)'s markers)
RANK_GRIDS: dict[str, dict[str, Any]] = {
    "paper": dict(
        alpha_ft=[0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0],
        ranks=[1, 2, 3, 4],
        ranks_c=[1, 2, 3, 4],
        n_grid=4,
        tol=0.1,
        max_iter=150,
        theory_max_iter=250,
        sim_alpha_ft=[1.0, 2.0, 4.0, 8.0],
    ),
    "quick": dict(
        alpha_ft=[1.0, 2.0, 4.0, 8.0],
        ranks=[1, 2, 3, 4],
        ranks_c=[1, 2, 3, 4],
        n_grid=3,
        tol=0.3,
        max_iter=150,
        sim_alpha_ft=[1.0, 4.0],
    ),
    "tiny": dict(alpha_ft=[1.0, 3.0], ranks=[1, 2], ranks_c=[1, 2], n_grid=3, tol=0.3, sim_alpha_ft=[1.0]),
}
FIG3 = dict(alpha=0.2, alpha_ft=3.0, tokens=2, kappa0=0.5, kappa=1.0, noise=0.5, activation="softmax", reuse=True)


def _docs(number: int | str, s: Settings, db: Path) -> tuple[str, list[dict]]:
    th = {"n_mc": s.n_mc}
    sim = {"dim": s.dim, "seeds": s.seeds}
    if number == 1:
        lam = _grid({"paper": 1e-3, "quick": 1e-3, "tiny": 0.1}[s.mode], 10.0 if s.mode != "tiny" else 1.0, s.points)
        lam_ft = [0.05, 1.0, math.inf]
        # tiny (tests): linear sigma, whose pre-training is in closed form (seconds, not minutes)
        base1 = dict(FIG1, activation="linear") if s.mode == "tiny" else dict(FIG1)
        docs = [
            _doc(
                1,
                "theory",
                db,
                dict(base1),
                {"noise": [0.5, 2.0], "lam_ft": lam_ft, "lam": lam},
                {"theory": th, "baselines": ["lora_only"], "bayes_optimal": dict(s.bo)},
                "lam",
            ),
            _doc(
                1,
                "simulate",
                db,
                dict(base1),
                {"noise": [0.5, 2.0], "lam_ft": lam_ft, "lam": _sub(lam, s.sim_points)},
                {"simulate": sim},
                "",
            ),
        ]
        return "E' vs pre-training ridge lambda" + (" (tiny: linear sigma)" if s.mode == "tiny" else ""), docs
    if number in (2, 5):
        act = "softmax" if number == 2 else "linear"
        kappa0 = _lin(0.025, 1.5, s.points)
        alpha_ft = [1.0, 3.0, 10.0]
        noise = [0.0, 2.0] if number == 2 else [0.0]
        base = dict(tokens=3, lam_ft=0.5, activation=act, alpha=0.1, lam=0.1)
        eff = {"M": 1.0, "Q": "Q0"}
        docs = [
            _doc(
                number,
                "theory",
                db,
                dict(base),
                {"noise": noise, "alpha_ft": alpha_ft, "kappa0": kappa0},
                {EFF_THEORY: dict(th, **eff)},
                "kappa0",
            ),
            _doc(
                number,
                "simulate",
                db,
                dict(base),
                {"noise": noise, "alpha_ft": alpha_ft, "kappa0": _sub(kappa0, s.sim_points)},
                {EFF_SIM: dict(sim, **eff)},
                "",
            ),
        ]
        if number == 5:  # the reference Delta_eff = 0: M = Q = Q0 with Delta = 0
            docs.append(
                _doc(
                    5,
                    "reference",
                    db,
                    dict(base, kappa0=1.0),
                    {"noise": [0.0], "alpha_ft": alpha_ft},
                    {EFF_THEORY: dict(th, M="Q0", Q="Q0")},
                    "",
                )
            )
            return "linear sigma: E' vs Delta_eff on an effective pre-training", docs
        return "E' vs Delta_eff on an effective pre-training, softmax", docs
    if number == 3:
        lam = _grid(1e-2, 10.0, s.points)
        # reuse (e = 1) needs N' <= N: at small D the simulations run anyway (Params.sizes checks)
        docs = [
            _doc(3, "theory", db, dict(FIG3), {"lam_ft": [0.1, 1.0], "lam": lam}, {"theory": th}, "lam"),
            _doc(
                3,
                "simulate",
                db,
                dict(FIG3),
                {"lam_ft": [0.1, 1.0], "lam": _sub(lam, s.sim_points)},
                {"simulate": sim},
                "",
            ),
        ]
        return "e = 1 (reused sequences): errors and overlap vs lambda", docs
    if number == 4:
        kappa0 = _lin(0.05, 1.5, s.points)
        lam_ft = [0.1, 0.2, 0.5, 1.0] if s.mode == "paper" else [0.5]
        pool = 100.0
        base = dict(tokens=3, noise=0.0, activation="softmax", alpha=0.1, lam=0.1, active_pool=pool)
        eff = {"M": 1.0, "Q": "Q0"}
        rho = [0.1, 0.3]
        docs = [
            _doc(
                4,
                "theory",
                db,
                dict(base),
                {"alpha_ft": [r * pool for r in rho], "lam_ft": lam_ft, "kappa0": kappa0},
                {ACTIVE_THEORY: dict(th, **eff)},
                "",
            ),
            _doc(
                4,
                "simulate",
                db,
                dict(base),
                {"alpha_ft": [r * pool for r in rho], "lam_ft": lam_ft, "kappa0": _sub(kappa0, s.sim_points)},
                {EFF_SIM: dict(sim, **eff)},
                "",
            ),
        ]
        return "active fine-tuning (Algorithm 1) vs uniform", docs
    if number == 6:
        base = dict(FIG1, noise=0.5)
        lam_left = [0.005, 0.05, 0.5]
        factors = _lin(0.5, 1.5, max(3, 2 * s.points + 1))
        lam_ft = _grid(1e-2, 10.0, s.points)
        docs = [
            _doc(
                6,
                "beta",
                db,
                dict(base),
                {"lam": lam_left, "beta": sorted(set(factors) | {1.0, 0.8})},
                {RECAL_PRETRAIN: dict(th)},
                "",
            ),
            _doc(
                6,
                "uncalibrated",
                db,
                dict(base, lam=0.005, beta=1.0),
                {"lam_ft": lam_ft},
                {"theory": th, "bayes_optimal": dict(s.bo)},
                "lam_ft",
            ),
            _doc(
                6,
                "recalibrated",
                db,
                dict(base, lam=0.005, beta=0.8),
                {"lam_ft": lam_ft},
                {RECAL_THEORY: dict(th)},
                "lam_ft",
            ),
            _doc(
                6,
                "simulate-uncalibrated",
                db,
                dict(base, lam=0.005, beta=1.0),
                {"lam_ft": _sub(lam_ft, s.sim_points)},
                {"simulate": sim},
                "",
            ),
            _doc(
                6,
                "simulate-recalibrated",
                db,
                dict(base, lam=0.005, beta=0.8),
                {"lam_ft": _sub(lam_ft, s.sim_points)},
                {RECAL_SIM: dict(sim, n_mc=s.n_mc)},
                "",
            ),
        ]
        return "recalibration of the frozen map, beta = 0.8 beta* vs 1", docs
    if number == "rank":
        g = RANK_GRIDS[s.mode]
        # tiny (tests): linear sigma (closed-form pre-training)
        base = dict(RANK_FIG, activation="linear") if s.mode == "tiny" else dict(RANK_FIG)
        small = dict(base, lam_ft=RANK_LAM_SMALL)
        at_c = dict(small, alpha_ft=RANK_ALPHA_C)
        if "theory_max_iter" in g:
            th = dict(th, max_iter=g["theory_max_iter"])
        opt = dict(th, n_grid=g["n_grid"], tol=g["tol"], lam_ft_low=0.05, lam_ft_high=3.0)
        if "max_iter" in g:
            opt["max_iter"] = g["max_iter"]
        sim_rank = dict(sim, teacher="orthonormal")
        docs = [
            _doc(
                "rank",
                "theory",
                db,
                small,
                {"lora_rank": g["ranks"], "alpha_ft": g["alpha_ft"]},
                {"theory": th},
                "alpha_ft",
            ),
            _doc("rank", "small", db, at_c, {"lora_rank": g["ranks_c"]}, {"theory": th}, ""),
            _doc("rank", "optimal", db, at_c, {"lora_rank": g.get("ranks_opt", g["ranks_c"])}, {RANK_OPTIMAL: opt}, ""),
            _doc(
                "rank",
                "simulate",
                db,
                small,
                {"lora_rank": g["ranks"], "alpha_ft": g["sim_alpha_ft"]},
                {"simulate": sim_rank},
                "",
            ),
        ]
        return "choosing the LoRA rank r on a rank-2 task (strengths 1, 0.5; simulations: orthonormal w*)" + (
            " (tiny: linear sigma)" if s.mode == "tiny" else ""
        ), docs
    raise FigureError(f"figure number must be one of {list(FIGURES)}, got {number!r}")  # pragma: no cover


def _fig1_inset(fig: Figure, frame) -> list[dict]:
    """E' vs lam' at the optimal lam of each panel (the minimum of the finite-lam' theory curves)."""
    s = fig.settings
    th = _ok(frame, "fig1-theory", "theory") if len(frame) else frame
    docs = []
    for noise in (0.5, 2.0):
        t = th[(th["noise"] == noise) & (th["lam_ft"] < math.inf)] if len(th) else th
        if not len(t):
            continue
        lam_best = float(t.loc[t["finetune_test_error"].idxmin(), "lam"])
        base1 = dict(FIG1, activation="linear") if s.mode == "tiny" else dict(FIG1)
        docs.append(
            _doc(
                1,
                f"inset-noise{noise:g}",
                fig.database.absolute(),
                dict(base1, noise=noise, lam=lam_best),
                {"lam_ft": _grid(1e-2, 10.0, max(3, s.points))},
                {"theory": {"n_mc": s.n_mc}},
                "lam_ft",
            )
        )
    return docs


def build_figure(
    number: int | str,
    *,
    mode: str = "paper",
    out: str | os.PathLike = "results/figures",
    dim: int | None = None,
    seeds: int | None = None,
    n_mc: int | None = None,
) -> Figure:
    """The sweeps of figure ``number`` (validated: every Params of every grid is built); runs nothing."""
    check_number(number)
    s = settings_for(number, mode, dim=dim, seeds=seeds, n_mc=n_mc)
    out = Path(out)
    db = (out / f"fig{number}.sqlite").absolute()
    title, docs = _docs(number, s, db)
    specs = tuple(parse_sweep(d, source=f"figure {number} ({d['sweep']['name']})", base_dir=out) for d in docs)
    return Figure(
        number=number,
        title=title,
        settings=s,
        sweeps=specs,
        out=out,
        docs=tuple(docs),
        followups=_fig1_inset if number == 1 else None,
    )


# ----- running -------------------------------------------------------------------------------------------
def toml_text(doc: Mapping[str, Any]) -> str:
    """A sweep document as TOML (the subset sweep files use: tables of scalars and lists)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "inf" if v == math.inf else ("-inf" if v == -math.inf else repr(v))
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{_k(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    def _k(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else '"' + k + '"'

    lines = []
    for table in ("sweep", "params", "axes"):
        if doc.get(table):
            lines.append(f"[{table}]")
            lines += [f"{_k(k)} = {val(v)}" for k, v in doc[table].items()]
            lines.append("")
    run = doc["run"]
    lines.append("[run]")
    if "baselines" in run:
        lines.append(f"baselines = {val(run['baselines'])}")
    for k, v in run.items():
        if k == "baselines":
            continue
        lines.append(f"[run.{_k(k)}]")
        lines += [f"{_k(a)} = {val(b)}" for a, b in v.items()]
    return "\n".join(lines) + "\n"


def run_figure(fig: Figure, *, workers: int | None = None, scheduler: str | None = None, progress: bool = True) -> list:
    """Run what is missing of every sweep of the figure (resumable); returns the SweepReports."""
    from .store import Store
    from .sweep import run_sweep

    fig.out.mkdir(parents=True, exist_ok=True)

    def write(docs):
        for d in docs:
            (fig.out / f"{d['sweep']['name'].replace('-', '_')}.toml").write_text(toml_text(d))

    write(fig.docs)
    reports = []
    with Store(fig.database) as store:
        for spec in fig.sweeps:
            reports.append(run_sweep(spec, workers=workers, scheduler=scheduler, progress=progress, store=store))
            if reports[-1].interrupted:  # Ctrl-C: stop here, what finished is stored
                return reports
    if fig.followups is not None:
        docs = fig.followup_docs(_frame(fig.sweeps, fig.database))
        write(docs)
        extra = tuple(
            parse_sweep(d, source=f"figure {fig.number} ({d['sweep']['name']})", base_dir=fig.out) for d in docs
        )
        with Store(fig.database) as store:
            for spec in extra:
                reports.append(run_sweep(spec, workers=workers, scheduler=scheduler, progress=progress, store=store))
    return reports


def figure_frame(fig: Figure):
    """All stored results of the figure: one tidy DataFrame with a ``sweep`` column."""
    first = _frame(fig.sweeps, fig.database)
    if fig.followups is None:
        return first
    return _frame(fig.sweeps + fig.followup_specs(first), fig.database)


def _frame(sweeps: Sequence[SweepSpec], database: Path):
    import pandas as pd

    from .store import Store
    from .sweep import sweep_frame

    frames = []
    if not Path(database).exists():
        return pd.DataFrame(columns=["sweep", "label", "status"])
    with Store(database, readonly=True) as store:
        for spec in sweeps:
            f = sweep_frame(spec, store)
            if len(f):
                f.insert(0, "sweep", spec.name)
                frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["sweep", "label", "status"])
    return pd.concat(frames, ignore_index=True, sort=False)


# ----- plotting -------------------------------------------------------------------------------------------
def _ok(df, sweep: str, label: str | None = None):
    d = df[(df["sweep"] == sweep) & (df["status"] == "ok")] if "status" in df else df.iloc[0:0]
    if label is not None:
        d = d[d["label"] == label]
    return d


def _std(d, key: str):
    """Error bar: the standard deviation over seeds (as the paper, App. D) = se x sqrt(n_seeds)."""
    import numpy as np

    se = d.get(f"{key}_se")
    if se is None:
        return None
    n = d["n_seeds"] if "n_seeds" in d else 1
    return np.asarray(se, dtype=float) * np.sqrt(np.asarray(n, dtype=float))


def _line(d, y: str):
    """Theory values for a line, with the non-converged points left out (NaN breaks the line):
    an unconverged state evolution is not a prediction, it is only marked (see _mark_nonconverged)."""
    if "converged" not in d:
        return d[y]
    return d[y].where(d["converged"] != False)  # noqa: E712 (pandas)


def _mark_nonconverged(ax, d, x: str, y: str, color) -> None:
    """x: the state evolution did not converge; open triangle: a replicon condition fails (eqs. 75, 78 >= 1,
    the replica-symmetric fixed point is unstable there, so the line is not a valid prediction)."""
    if "converged" in d:
        bad = d[d["converged"] == False]  # noqa: E712 (pandas)
        if len(bad):
            ax.plot(bad[x], bad[y], "x", color=color, ms=9, mew=2, label=_once(ax, "not converged"))
    bad = d.iloc[0:0]
    if "replicon_ok" in d:
        bad = d[d["replicon_ok"] == False]  # noqa: E712 (pandas)
    elif "replicon_unstable" in d:
        bad = d[d["replicon_unstable"] == True]  # noqa: E712 (pandas)
    if len(bad):
        ax.plot(bad[x], bad[y], "^", color=color, ms=8, mfc="none", label=_once(ax, "replicon > 1 (RS unstable)"))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)


def _once(ax, label: str) -> str | None:
    return None if label in ax.get_legend_handles_labels()[1] else label


def _finish(fig: Figure, mfig, cov: Coverage) -> dict[str, Path]:
    s = fig.settings
    mfig.suptitle(f"Fig. {fig.number}: {fig.title}", fontsize=11)
    # the footer states the settings of the rows drawn (the task keys hold them) and what is not there
    note = "" if cov.complete else f"; INCOMPLETE: {cov.summary()}"
    mfig.text(0.5, 0.005, s.footnote() + note, ha="center", va="bottom", fontsize=7, color="0.3")
    mfig.tight_layout(rect=(0, 0.03, 1, 0.95))
    paths = {}
    for ext in ("png", "pdf"):
        p = fig.path(ext)
        mfig.savefig(p, dpi=130)
        paths[ext] = p
    import matplotlib.pyplot as plt

    plt.close(mfig)
    return paths


_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _fmt(v: float) -> str:
    return "inf" if v == math.inf else f"{v:g}"


def _plot1(fig: Figure, df, plt):
    noises = [0.5, 2.0]
    mfig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    th, sm = _ok(df, "fig1-theory", "theory"), _ok(df, "fig1-simulate", "simulate")
    lo, bo = _ok(df, "fig1-theory", "lora_only"), _ok(df, "fig1-theory", "bayes_optimal")
    best: dict[float, list[tuple[float, float, float]]] = {}
    for ax, noise in zip(axes[:2], noises):
        for i, lf in enumerate([0.05, 1.0, math.inf]):
            c = _COLORS[i]
            t = th[(th["noise"] == noise) & (th["lam_ft"] == lf)].sort_values("lam")
            if len(t):
                ax.plot(t["lam"], _line(t, "finetune_test_error"), "-", color=c, label=f"theory $\\lambda'$={_fmt(lf)}")
                _mark_nonconverged(ax, t, "lam", "finetune_test_error", c)
                if math.isfinite(lf):
                    j = t["finetune_test_error"].idxmin()
                    ax.axvline(t.loc[j, "lam"], color="darkred", ls="--", lw=0.8)
                    best.setdefault(noise, []).append((t.loc[j, "finetune_test_error"], t.loc[j, "lam"], lf))
            s = sm[(sm["noise"] == noise) & (sm["lam_ft"] == lf)].sort_values("lam")
            if len(s):
                ax.errorbar(
                    s["lam"],
                    s["finetune_test_error"],
                    yerr=_std(s, "finetune_test_error"),
                    fmt="s",
                    color=c,
                    ms=5,
                    capsize=2,
                    mfc="none",
                )
            l = lo[(lo["noise"] == noise) & (lo["lam_ft"] == lf)]
            if len(l) and math.isfinite(lf):
                ax.axhline(
                    l["finetune_test_error"].iloc[0],
                    color=c,
                    ls=":",
                    lw=1.2,
                    label=f"LoRA only ($\\lambda=\\infty$), $\\lambda'$={_fmt(lf)}",
                )
        b = bo[bo["noise"] == noise]
        if len(b):
            ax.axhline(b["bo_finetune_test_error"].iloc[0], color="k", ls="--", lw=1.2, label="Bayes-optimal")
        ax.set_xscale("log")
        ax.set_xlabel(r"$\lambda$ (pre-training ridge)")
        ax.set_ylabel(r"$\mathcal{E}'$")
        ax.set_title(f"$\\Delta$ = {noise:g} (squares: simulations)")
        _legend(ax)
    ax = axes[2]
    for i, noise in enumerate(noises):
        t = _ok(df, f"fig1-inset-noise{noise:g}", "theory").sort_values("lam_ft")
        if not len(t):
            continue
        lam_best = float(t["lam"].iloc[0])
        ax.plot(
            t["lam_ft"],
            _line(t, "finetune_test_error"),
            "-",
            color=_COLORS[i],
            label=f"$\\Delta$={noise:g} at $\\lambda$={lam_best:.3g}",
        )
        _mark_nonconverged(ax, t, "lam_ft", "finetune_test_error", _COLORS[i])
        j = t["finetune_test_error"].idxmin()
        ax.axvline(t.loc[j, "lam_ft"], color="darkred", ls="--", lw=0.8)
        fz = th[(th["noise"] == noise) & (th["lam"] == lam_best) & (th["lam_ft"] == math.inf)]
        if len(fz):
            ax.axhline(
                fz["finetune_test_error"].iloc[0],
                color=_COLORS[i],
                ls=":",
                lw=1,
                label=f"$\\lambda'=\\infty$ (frozen), $\\Delta$={noise:g}",
            )
        b = bo[bo["noise"] == noise]
        if len(b):
            ax.axhline(
                b["bo_finetune_test_error"].iloc[0],
                color=_COLORS[i],
                ls="--",
                lw=1,
                label=f"Bayes-optimal, $\\Delta$={noise:g}",
            )
    ax.set_xscale("log")
    ax.set_xlabel(r"$\lambda'$ (LoRA ridge)")
    ax.set_ylabel(r"$\mathcal{E}'$")
    ax.set_title(r"(paper: insets) $\mathcal{E}'$ vs $\lambda'$ at the optimal $\lambda$ of the grid")
    _legend(ax)
    return mfig


def _plot_effective(fig: Figure, df, plt, panels: Sequence[tuple[str, float]], excess: bool = False):
    n = fig.number
    th, sm = _ok(df, f"fig{n}-theory"), _ok(df, f"fig{n}-simulate")
    ncol = len(panels) + (1 if excess else 0)
    mfig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol, 4.4), squeeze=False)
    axes = axes[0]
    ref = _ok(df, "fig5-reference") if excess else None
    for ax, (title, noise) in zip(axes, panels):
        for i, a in enumerate([1.0, 3.0, 10.0]):
            c = _COLORS[i]
            t = th[(th["noise"] == noise) & (th["alpha_ft"] == a)].sort_values("delta_eff")
            if len(t):
                ax.plot(t["delta_eff"], _line(t, "finetune_test_error"), "-", color=c, label=f"theory $\\alpha'$={a:g}")
                _mark_nonconverged(ax, t, "delta_eff", "finetune_test_error", c)
            s = sm[(sm["noise"] == noise) & (sm["alpha_ft"] == a)].sort_values("delta_eff_law")
            if len(s):
                ax.errorbar(
                    s["delta_eff_law"],
                    s["finetune_test_error"],
                    yerr=_std(s, "finetune_test_error"),
                    fmt="o",
                    color=c,
                    ms=5,
                    capsize=2,
                    mfc="none",
                )
        ax.set_xlabel(r"$\Delta_{\rm eff}=\Delta/2+Q_0-2M+Q$  ($M=1$, $Q_0=Q$)")
        ax.set_ylabel(r"$\mathcal{E}'$")
        ax.set_title(title + " (dots: simulations)")
        _legend(ax)
    if ref is not None:  # i.e. excess
        ax = axes[-1]
        for i, a in enumerate([1.0, 3.0, 10.0]):
            c = _COLORS[i]
            r = ref[ref["alpha_ft"] == a]
            if not len(r):
                continue
            e0 = float(r["finetune_test_error"].iloc[0])
            t = th[(th["noise"] == 0.0) & (th["alpha_ft"] == a)].sort_values("delta_eff")
            ax.plot(t["delta_eff"], t["finetune_test_error"] - e0, "-", color=c, label=f"theory $\\alpha'$={a:g}")
            s = sm[(sm["noise"] == 0.0) & (sm["alpha_ft"] == a)].sort_values("delta_eff_law")
            if len(s):
                ax.errorbar(
                    s["delta_eff_law"],
                    s["finetune_test_error"] - e0,
                    yerr=_std(s, "finetune_test_error"),
                    fmt="o",
                    color=c,
                    ms=5,
                    capsize=2,
                    mfc="none",
                )
        ax.set_xlabel(r"$\Delta_{\rm eff}$")
        ax.set_ylabel(r"$\mathcal{E}'(\Delta_{\rm eff})-\mathcal{E}'(\Delta_{\rm eff}=0)$ (theory)")
        ax.set_title("excess error w.r.t. $\\Delta_{\\rm eff}=0$")
        _legend(ax)
    return mfig


def _plot3(fig: Figure, df, plt):
    th, sm = _ok(df, "fig3-theory", "theory"), _ok(df, "fig3-simulate", "simulate")
    mfig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    t0 = th[th["lam_ft"] == 0.1].sort_values("lam")
    s0 = sm[sm["lam_ft"] == 0.1].sort_values("lam")
    ax = axes[0]
    for key, name, c in (
        ("pretrain_train_error", r"$\mathcal{L}$ (train)", "tab:blue"),
        ("pretrain_test_error", r"$\mathcal{E}$ (test)", "tab:red"),
    ):
        ax.plot(t0["lam"], t0[key], "-", color=c, label=name)
        if len(s0):
            ax.errorbar(s0["lam"], s0[key], yerr=_std(s0, key), fmt="o", color=c, ms=5, capsize=2, mfc="none")
    ax.set_title("pre-training")
    for ax, key, lab in ((axes[1], "finetune_test_error", r"$\mathcal{E}'$"), (axes[2], "overlap", r"$o_w$")):
        for i, lf in enumerate([0.1, 1.0]):
            c = _COLORS[i]
            t = th[th["lam_ft"] == lf].sort_values("lam")
            ax.plot(t["lam"], _line(t, key), "-", color=c, label=f"theory $\\lambda'$={lf:g}")
            _mark_nonconverged(ax, t, "lam", key, c)
            s = sm[sm["lam_ft"] == lf].sort_values("lam")
            if len(s):
                ax.errorbar(s["lam"], s[key], yerr=_std(s, key), fmt="o", color=c, ms=5, capsize=2, mfc="none")
        ax.set_ylabel(lab)
        ax.set_title(("fine-tuning test error" if key != "overlap" else "fine-tuning overlap") + " (e = 1)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel(r"$\lambda$")
        _legend(ax)
    return mfig


def _plot4(fig: Figure, df, plt):
    import numpy as np
    import pandas as pd

    th, sm = _ok(df, "fig4-theory"), _ok(df, "fig4-simulate")
    mfig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    pool = 100.0
    for i, a in enumerate(sorted(set(th["alpha_ft"])) if len(th) else []):
        rho = a / pool
        c = _COLORS[i]
        t = th[th["alpha_ft"] == a]
        # min over lam' at each Delta_eff, separately for the active and the uniform runs
        rows = []
        for _, g in t.groupby("kappa0"):
            ia, iu = g["finetune_test_error"].idxmin(), g["uniform_finetune_test_error"].idxmin()
            rows.append(
                dict(
                    delta_eff=g["delta_eff"].iloc[0],
                    act=g.loc[ia, "finetune_test_error"],
                    uni=g.loc[iu, "uniform_finetune_test_error"],
                    o_act=g.loc[ia, "overlap"],
                    o_uni=g.loc[iu, "uniform_overlap"],
                    lam_a=g.loc[ia, "lam_ft"],
                )
            )
        rows.sort(key=lambda r: r["delta_eff"])
        x = np.array([r["delta_eff"] for r in rows])
        act, uni = np.array([r["act"] for r in rows]), np.array([r["uni"] for r in rows])
        axes[0].plot(x, act, "-", color=c, label=f"ActFT, $\\rho$={rho:g}")
        axes[0].plot(x, uni, "--", color=c, label=f"uniform, $\\rho$={rho:g}")
        axes[1].plot(x, uni - act, "-", color=c, label=f"$\\rho$={rho:g}")
        axes[2].plot(x, [r["o_act"] for r in rows], "-", color=c, label=f"ActFT, $\\rho$={rho:g}")
        axes[2].plot(x, [r["o_uni"] for r in rows], "--", color=c, label=f"uniform, $\\rho$={rho:g}")
        s = sm[sm["alpha_ft"] == a]
        if len(s):
            srows = []
            for _, g in s.groupby("kappa0"):
                ia, iu = g["finetune_test_error"].idxmin(), g["uniform_finetune_test_error"].idxmin()
                srows.append((g["delta_eff_law"].iloc[0], g.loc[[ia]], g.loc[[iu]], g.loc[[ia]]))
            srows.sort(key=lambda r: r[0])
            xs = [r[0] for r in srows]
            ga = pd.concat([r[1] for r in srows])
            gu = pd.concat([r[2] for r in srows])
            axes[0].errorbar(
                xs, ga["finetune_test_error"], yerr=_std(ga, "finetune_test_error"), fmt="o", color=c, capsize=2, ms=5
            )
            axes[0].errorbar(
                xs,
                gu["uniform_finetune_test_error"],
                yerr=_std(gu, "uniform_finetune_test_error"),
                fmt="o",
                color=c,
                capsize=2,
                ms=5,
                mfc="none",
            )
            axes[1].errorbar(
                xs,
                ga["delta_finetune_test_error"],
                yerr=_std(ga, "delta_finetune_test_error"),
                fmt="o",
                color=c,
                capsize=2,
                ms=5,
                mfc="none",
            )
            axes[2].errorbar(xs, ga["overlap"], yerr=_std(ga, "overlap"), fmt="o", color=c, capsize=2, ms=5)
            axes[2].errorbar(
                xs,
                gu["uniform_overlap"],
                yerr=_std(gu, "uniform_overlap"),
                fmt="o",
                color=c,
                capsize=2,
                ms=5,
                mfc="none",
            )
    lam_ft = sorted(set(th["lam_ft"])) if len(th) else []
    axes[0].set_ylabel(r"$\mathcal{E}'$ (min over $\lambda'\in$" + f"{[float(v) for v in lam_ft]})")
    axes[0].set_title(r"$\mathcal{E}'(\hat W,\hat w)$ (dashed) vs $\mathcal{E}'(\hat W,\hat w_{\rm ActFT})$")
    axes[1].set_ylabel(r"$\Delta\mathcal{E}'=\mathcal{E}'_{\rm uniform}-\mathcal{E}'_{\rm ActFT}$")
    axes[1].set_title("gain of active fine-tuning (paper: inset)")
    axes[2].set_ylabel(r"$o_w$")
    axes[2].set_title("overlap (filled: ActFT, open: uniform)")
    for ax in axes:
        ax.set_xlabel(r"$\Delta_{\rm eff}$ ($M=1$, $Q_0=Q$, $\Delta=0$)")
        _legend(ax)
    return mfig


def _plot6(fig: Figure, df, plt):
    mfig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    ax = axes[0]
    b = _ok(df, "fig6-beta")
    for i, lam in enumerate(sorted(set(b["lam"])) if len(b) else []):
        c = _COLORS[i]
        t = b[b["lam"] == lam].sort_values("beta")
        ax.plot(t["beta"], t["recalibrated_test_error"], "-", color=c, label=f"$\\lambda$={lam:g}")
        bs = float(t["beta_star"].iloc[0])
        ax.plot([1.0 / bs], [t["pretrain_test_error"].iloc[0]], "o", color=c, ms=7, mfc="none")
    ax.axvline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel(r"$\beta/\beta^\star$, $\beta^\star=M/Q$")
    ax.set_ylabel(r"$\mathcal{E}(\beta)$ (pre-training test error)")
    ax.set_title(r"pre-training, circles: uncalibrated $\beta=1$")
    _legend(ax)
    ax = axes[1]
    for i, (th_name, lab, sim_name, sim_lab) in enumerate(
        (
            ("fig6-uncalibrated", "theory", "fig6-simulate-uncalibrated", "simulate"),
            ("fig6-recalibrated", RECAL_THEORY, "fig6-simulate-recalibrated", RECAL_SIM),
        )
    ):
        c = _COLORS[i]
        name = r"$\beta=1$" if i == 0 else r"$\beta=0.8\beta^\star$"
        t = _ok(df, th_name, lab).sort_values("lam_ft")
        if len(t):
            ax.plot(t["lam_ft"], _line(t, "finetune_test_error"), "-", color=c, label=f"theory {name}")
            _mark_nonconverged(ax, t, "lam_ft", "finetune_test_error", c)
        s = _ok(df, sim_name, sim_lab).sort_values("lam_ft")
        if len(s):
            ax.errorbar(
                s["lam_ft"],
                s["finetune_test_error"],
                yerr=_std(s, "finetune_test_error"),
                fmt="s",
                color=c,
                capsize=2,
                ms=5,
                mfc="none",
            )
    bo = _ok(df, "fig6-uncalibrated", "bayes_optimal")
    if len(bo):
        ax.axhline(bo["bo_finetune_test_error"].iloc[0], color="k", ls="--", lw=1.2, label="Bayes-optimal")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\lambda'$")
    ax.set_ylabel(r"$\mathcal{E}'$")
    ax.set_title(r"fine-tuning at $\lambda=0.005$ (squares: simulations)")
    _legend(ax)
    return mfig


def _plot_rank(fig: Figure, df, plt):
    """(a) E' and (b) the overlap vs alpha' per rank at lam' small; (c) E' vs r at alpha' = RANK_ALPHA_C for lam'
    small and lam' optimised per rank (the optimal lam' written next to each point)."""
    th, sm = _ok(df, "figrank-theory", "theory"), _ok(df, "figrank-simulate", "simulate")
    mfig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ranks = sorted({int(r) for r in th["lora_rank"].dropna()} | {int(r) for r in sm["lora_rank"].dropna()})
    for ax, key, lab in ((axes[0], "finetune_test_error", r"$\mathcal{E}'$"), (axes[1], "overlap", r"overlap $o_w$")):
        for i, r in enumerate(ranks):
            c = _COLORS[i % len(_COLORS)]
            t = th[th["lora_rank"] == r].sort_values("alpha_ft")
            if len(t):
                ax.plot(t["alpha_ft"], _line(t, key), "-", color=c, label=f"theory r={r}")
                _mark_nonconverged(ax, t, "alpha_ft", key, c)
            sr = sm[sm["lora_rank"] == r].sort_values("alpha_ft")
            if len(sr):
                ax.errorbar(sr["alpha_ft"], sr[key], yerr=_std(sr, key), fmt="o", color=c, ms=5, capsize=2, mfc="none")
        ax.set_xscale("log")
        xs = sorted(set(th["alpha_ft"].dropna()) | set(sm["alpha_ft"].dropna()))
        if xs:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_xticks([], minor=True)
        ax.set_xlabel(r"$\alpha'$ (fine-tuning samples / D)")
        ax.set_ylabel(lab)
        ax.set_title(
            f"({'a' if key != 'overlap' else 'b'}) $r^*$=2, $\\lambda'$={RANK_LAM_SMALL:g} (dots: simulations)"
        )
        _legend(ax)
    ax = axes[2]
    small, opt = _ok(df, "figrank-small", "theory"), _ok(df, "figrank-optimal")
    for d, c, name in ((small, "tab:blue", f"$\\lambda'$={RANK_LAM_SMALL:g}"), (opt, "tab:red", r"$\lambda'$ optimal")):
        d = d.sort_values("lora_rank")
        if not len(d):
            continue
        ax.plot(d["lora_rank"], _line(d, "finetune_test_error"), "o-", color=c, label=f"theory {name}")
        _mark_nonconverged(ax, d, "lora_rank", "finetune_test_error", c)
        if "lam_ft_opt" in d and d is not small:
            for _, row in d.iterrows():
                if row["lam_ft_opt"] == row["lam_ft_opt"]:
                    bound = row.get("lam_ft_at_bound") is True or row.get("lam_ft_at_bound") == 1
                    ax.annotate(
                        f"{row['lam_ft_opt']:.2g}" + (" (bound)" if bound else ""),
                        (row["lora_rank"], row["finetune_test_error"]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=c,
                    )
    sc = sm[sm["alpha_ft"] == RANK_ALPHA_C].sort_values("lora_rank") if len(sm) else sm
    if len(sc):
        ax.errorbar(
            sc["lora_rank"],
            sc["finetune_test_error"],
            yerr=_std(sc, "finetune_test_error"),
            fmt="s",
            color="tab:blue",
            ms=5,
            capsize=2,
            mfc="none",
            label=f"simulation $\\lambda'$={RANK_LAM_SMALL:g}",
        )
    ax.axvline(2, color="0.5", ls=":", lw=1)
    rc = sorted({int(r) for d in (small, opt) for r in d["lora_rank"].dropna()})
    if rc:
        ax.set_xticks(rc)
    ax.set_xlabel("LoRA rank r (dotted: r = r* = 2)")
    ax.set_ylabel(r"$\mathcal{E}'$")
    ax.set_title(f"(c) $\\alpha'$={RANK_ALPHA_C:g} (numbers: the optimal $\\lambda'$ in [0.05, 3])")
    _legend(ax)
    return mfig


_PLOTTED = (
    "sweep",
    "lora_rank",
    "lam_ft_opt",
    "lam_ft_at_bound",
    "label",
    "status",
    "lam",
    "lam_ft",
    "noise",
    "alpha_ft",
    "kappa0",
    "beta",
    "n_seeds",
    "converged",
    "finetune_test_error",
    "overlap",
    "pretrain_train_error",
    "pretrain_test_error",
    "delta_eff",
    "delta_eff_law",
    "bo_finetune_test_error",
    "uniform_finetune_test_error",
    "uniform_overlap",
    "delta_finetune_test_error",
    "recalibrated_test_error",
    "beta_star",
)


@dataclass(frozen=True)
class Coverage:
    """What of a figure's tasks the drawn frame holds: per sweep (tasks of its plan, ok, failed)."""

    per_sweep: Mapping[str, tuple[int, int, int]]

    @property
    def tasks(self) -> int:
        return sum(t for t, _, _ in self.per_sweep.values())

    @property
    def ok(self) -> int:
        return sum(o for _, o, _ in self.per_sweep.values())

    @property
    def failed(self) -> int:
        return sum(f for _, _, f in self.per_sweep.values())

    @property
    def missing(self) -> int:
        return self.tasks - self.ok - self.failed

    @property
    def complete(self) -> bool:
        return self.ok == self.tasks

    def summary(self) -> str:
        parts = [
            f"{name}: {o}/{t} ok" + (f", {f} failed" if f else "")
            for name, (t, o, f) in self.per_sweep.items()
            if o < t
        ]
        return f"{self.ok} of {self.tasks} tasks stored as ok ({'; '.join(parts)})"


def coverage(fig: Figure, df) -> Coverage:
    """Count, per sweep of the figure (follow-ups included where they can be built), the tasks of its plan
    and how many of them the frame holds as ok / failed."""
    from .sweep import plan

    specs = list(fig.sweeps)
    if fig.followups is not None and len(df):
        first = df[df["sweep"].isin([sp.name for sp in fig.sweeps])] if "sweep" in df else df.iloc[0:0]
        specs += list(fig.followup_specs(first))
    per = {}
    for spec in specs:
        d = df[df["sweep"] == spec.name] if "sweep" in df else df.iloc[0:0]
        counted = len(d) > 0 and "status" in d
        per[spec.name] = (
            len(plan(spec).tasks),
            int((d["status"] == "ok").sum()) if counted else 0,
            int((d["status"] == "failed").sum()) if counted else 0,
        )
    return Coverage(per)


def stored_modes(fig: Figure) -> list[str]:
    """The modes ('paper', 'quick', 'tiny', default sizes) of which the figure's database holds some results."""
    from .store import Store
    from .sweep import plan

    if not fig.database.exists():
        return []
    found = []
    with Store(fig.database, readonly=True) as store:
        for mode in ("paper", "quick", "tiny"):
            other = build_figure(fig.number, mode=mode, out=fig.out)
            keys = [t.key for sp in other.sweeps for t in plan(sp).tasks]
            if any(r.ok for r in store.lookup(keys).values()):
                found.append(mode)
    return found


def plot_figure(fig: Figure, df=None) -> dict[str, Any]:
    """Draw the figure from the stored results of its own tasks; writes figN.png, figN.pdf and figN.csv.

    Only the rows of the figure's tasks are drawn (their keys hold D, the seeds, n_mc and the code
    version, which the footer states); an incomplete figure says so in its footer.  With no result at
    all nothing is written (an existing figure is not replaced by empty axes): FigureError.
    """
    if df is None:
        df = figure_frame(fig)
    cov = coverage(fig, df)
    if cov.ok == 0:
        hint = ""
        try:
            modes = [m for m in stored_modes(fig) if m != fig.settings.mode]
        except Exception:  # noqa: BLE001 (a hint only)
            modes = []
        if modes:
            hint = (
                f"; the database holds results of the {' / '.join(modes)} mode: add --{modes[0]}"
                if modes[0] != "paper"
                else "; the database holds results of the paper mode: drop --quick / --tiny"
            )
        raise FigureError(
            f"figure {fig.number} ({fig.settings.mode} mode, D = {fig.settings.dim}, "
            f"{fig.settings.seeds} seed(s), n_mc = {fig.settings.n_mc}): none of its {cov.tasks} tasks "
            f"is stored as ok in {fig.database}{hint} (or run without --plot-only); "
            f"{fig.path('png')} is left as it is"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(fig.path("csv"), index=False)
    df = df.copy()
    for col in _PLOTTED:  # missing results (e.g. every task of a sweep failed) plot as nothing, not as an error
        if col not in df:
            df[col] = float("nan")
    n = fig.number
    if n == 1:
        mfig = _plot1(fig, df, plt)
    elif n == 2:
        mfig = _plot_effective(fig, df, plt, [(r"$\Delta=0$", 0.0), (r"$\Delta=2$", 2.0)])
    elif n == 3:
        mfig = _plot3(fig, df, plt)
    elif n == 4:
        mfig = _plot4(fig, df, plt)
    elif n == 5:
        mfig = _plot_effective(fig, df, plt, [(r"linear $\sigma$, $\Delta=0$", 0.0)], excess=True)
    elif n == "rank":
        mfig = _plot_rank(fig, df, plt)
    else:
        mfig = _plot6(fig, df, plt)
    paths: dict[str, Any] = _finish(fig, mfig, cov)
    paths["csv"] = fig.path("csv")
    paths["database"] = fig.database
    paths["coverage"] = cov
    return paths
