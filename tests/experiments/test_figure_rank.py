"""``hdlora figure rank`` (issue 14): its sweeps, its optimal-lam' task, its plot, its name on the command line."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hdlora import Params
from hdlora.cli import main as hdlora_main
from hdlora.experiments import figures
from hdlora.experiments.figure_tasks import RANK_OPTIMAL, rank_optimal_theory_task
from hdlora.experiments.figures import RANK_ALPHA_C, RANK_LAM_SMALL, FigureError, build_figure, check_number
from hdlora.experiments.optimize import optimize
from hdlora.experiments.sweep import plan


@pytest.mark.parametrize("mode", ["paper", "quick", "tiny"])
def test_rank_figure_sweeps(mode, tmp_path):
    fig = build_figure("rank", mode=mode, out=tmp_path)
    assert fig.database.name == "figrank.sqlite"
    names = [s.name for s in fig.sweeps]
    assert names == ["figrank-theory", "figrank-small", "figrank-optimal", "figrank-simulate"]
    th = fig.sweep("figrank-theory")
    assert th.fixed["teacher_rank"] == 2 and list(th.fixed["teacher_strengths"]) == [1.0, 0.5]
    assert th.fixed["lam_ft"] == RANK_LAM_SMALL and th.fixed["noise"] == 0.5 and th.fixed["lam"] == 0.1
    assert th.fixed["activation"] == ("linear" if mode == "tiny" else "softmax")
    axes = dict(th.axes)
    assert set(axes["lora_rank"]) <= {1, 2, 3, 4} and axes["lora_rank"][0] == 1
    for t in plan(fig.sweep("figrank-simulate")).tasks:
        assert t.options["teacher"] == "orthonormal" and t.options["dim"] == fig.settings.dim
        t.params.sizes(t.options["dim"])
    opt = plan(fig.sweep("figrank-optimal")).tasks
    assert {t.kind for t in opt} == {RANK_OPTIMAL} and all(t.params.alpha_ft == RANK_ALPHA_C for t in opt)
    sims = {float(a) for a in dict(fig.sweep("figrank-simulate").axes)["alpha_ft"]}
    assert sims <= set(axes["alpha_ft"]) and RANK_ALPHA_C in sims  # panel (c) has its markers
    assert not fig.database.exists()


def test_rank_is_a_figure_name_and_others_are_refused(capsys):
    assert check_number("rank") == "rank" and check_number(3) == 3
    with pytest.raises(FigureError, match="rank"):
        check_number("rnk")
    assert hdlora_main(["figure", "rank", "--quick", "--plan"]) == 0
    capsys.readouterr()
    assert hdlora_main(["figure", "rnk", "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'rank'" in err[0] and "Traceback" not in err[0]


@pytest.mark.slow
def test_rank_optimal_task_is_the_optimiser():
    p = Params(
        alpha=0.1,
        alpha_ft=1.0,
        tokens=3,
        activation="linear",
        lam_ft=2.0,
        lora_rank=2,
        teacher_rank=2,
        teacher_strengths=(1.0, 0.5),
    )
    opts = {"n_mc": 300, "n_grid": 3, "tol": 0.3, "lam_ft_low": 0.5, "lam_ft_high": 4.0}
    got = rank_optimal_theory_task(p, opts, None)
    ref = optimize(
        p,
        "finetune_test_error",
        "lam_ft",
        bounds={"lam_ft": (0.5, 4.0)},
        n_mc=300,
        n_grid=3,
        tol=0.3,
        max_solves=40,
        warn=False,
    )
    assert got["finetune_test_error"] == ref.value and got["lam_ft_opt"] == ref.optimum["lam_ft"]
    assert got["converged"] == ref.converged and got["n_solves"] == ref.n_solves
    with pytest.raises(ValueError, match="unknown option"):
        rank_optimal_theory_task.check_options({"n_mc": 300, "lam": 1})


def test_rank_plot_marks_nonconverged_and_unstable_points(tmp_path):
    fig = build_figure("rank", mode="tiny", out=tmp_path)
    rows = []
    for r in (1, 2):
        for a, conv, rep in ((1.0, True, True), (3.0, r == 1, r == 1)):
            rows.append(
                dict(
                    sweep="figrank-theory",
                    label="theory",
                    status="ok",
                    lora_rank=r,
                    alpha_ft=a,
                    finetune_test_error=1.0 / a + 0.1 * r,
                    overlap=0.5,
                    converged=conv,
                    replicon_ok=rep,
                )
            )
        rows.append(
            dict(
                sweep="figrank-simulate",
                label="simulate",
                status="ok",
                lora_rank=r,
                alpha_ft=1.0,
                finetune_test_error=1.1,
                finetune_test_error_se=0.02,
                overlap=0.5,
                overlap_se=0.01,
                n_seeds=1,
            )
        )
        rows.append(
            dict(
                sweep="figrank-small",
                label="theory",
                status="ok",
                lora_rank=r,
                alpha_ft=1.0,
                finetune_test_error=1.0 + 0.1 * r,
                converged=True,
                replicon_ok=True,
            )
        )
        rows.append(
            dict(
                sweep="figrank-optimal",
                label=RANK_OPTIMAL,
                status="ok",
                lora_rank=r,
                alpha_ft=1.0,
                finetune_test_error=0.9,
                lam_ft_opt=0.3 * r,
                converged=r == 1,
                replicon_ok=True,
            )
        )
    paths = figures.plot_figure(fig, pd.DataFrame(rows))
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(pd.read_csv(paths["csv"])["lam_ft_opt"].dropna().iloc[0])
