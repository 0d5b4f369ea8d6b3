"""hdlora figure N: specs build valid sweeps; a tiny end-to-end run writes PNG/PDF/CSV and is resumable."""

from __future__ import annotations

import math
import sqlite3

import pandas as pd
import pytest

from hdlora.cli import main as hdlora_main
from hdlora.experiments import figures
from hdlora.experiments import tasks as task_kinds
from hdlora.experiments.figures import FigureError, build_figure, settings_for, toml_text
from hdlora.experiments.sweep import SweepSpec, load_sweep, plan


@pytest.mark.parametrize("mode", ["paper", "quick", "tiny"])
@pytest.mark.parametrize("number", figures.FIGURES)
def test_specs_build_valid_sweeps(number, mode, tmp_path):
    """Every Params of every grid validates (parse_sweep builds them all) and every task kind resolves."""
    fig = build_figure(number, mode=mode, out=tmp_path)
    assert fig.sweeps and all(isinstance(s, SweepSpec) for s in fig.sweeps)
    for spec in fig.sweeps:
        p = plan(spec)
        assert p.tasks
        for t in p.tasks:
            task_kinds.resolve(t.kind)  # importable task function
            if t.kind in ("simulate", figures.EFF_SIM, figures.RECAL_SIM):
                assert t.options["dim"] == fig.settings.dim
                assert t.options["seeds"] == fig.settings.seeds
                t.params.sizes(t.options["dim"])
    assert not tmp_path.joinpath(f"fig{number}.sqlite").exists()  # building runs and writes nothing


def test_paper_settings_are_the_papers():
    assert (settings_for(1).dim, settings_for(1).seeds) == (150, 4)
    assert (settings_for(3).dim, settings_for(3).seeds) == (1000, 5)
    assert (settings_for(2).dim, settings_for(4).dim, settings_for(5).dim) == (10000, 10000, 5000)
    fig = build_figure(1)
    th = fig.sweep("fig1-theory")
    assert th.fixed["alpha"] == 0.1 and th.fixed["alpha_ft"] == 3.0 and th.fixed["tokens"] == 3
    assert dict(th.axes)["lam_ft"] == (0.05, 1.0, math.inf)
    assert dict(th.axes)["noise"] == (0.5, 2.0)
    assert {r.label for r in th.runs} == {"theory", "lora_only", "bayes_optimal"}
    fig4 = build_figure(4)
    assert dict(fig4.sweeps[0].axes)["lam_ft"] == (0.1, 0.2, 0.5, 1.0)
    assert sorted(a / 100 for a in dict(fig4.sweeps[0].axes)["alpha_ft"]) == [0.1, 0.3]


def test_overrides_and_bad_input(tmp_path):
    fig = build_figure(2, mode="quick", out=tmp_path, dim=33, seeds=3, n_mc=1234)
    assert (fig.settings.dim, fig.settings.seeds, fig.settings.n_mc) == (33, 3, 1234)
    assert "D = 33" in fig.settings.footnote() and "QUICK" in fig.settings.footnote()
    with pytest.raises(FigureError, match="figure number"):
        build_figure(7)
    with pytest.raises(FigureError, match="--dim"):
        build_figure(1, dim=1)
    assert hdlora_main(["figure", "0", "--out", str(tmp_path)]) == 2
    assert hdlora_main(["figure", "9", "--plan"]) == 2
    assert hdlora_main(["figure", "3", "--plot-only", "--out", str(tmp_path)]) == 2  # nothing stored yet


def test_plot_with_nothing_stored_refuses_and_writes_nothing(tmp_path):
    """No result of the figure: FigureError, nothing written (an existing figure is never replaced by empty axes)."""
    for n in figures.FIGURES:
        fig = build_figure(n, mode="tiny", out=tmp_path)
        with pytest.raises(FigureError, match="none of its .* tasks is stored as ok"):
            figures.plot_figure(fig, pd.DataFrame(columns=["sweep", "label", "status"]))
        assert not fig.path("png").exists() and not fig.path("csv").exists()


def test_plot_with_unrelated_rows_only_draws_and_says_it_is_incomplete(tmp_path):
    """Every figure's plotting copes with sweeps whose results are all missing (columns absent)."""
    for n in figures.FIGURES:
        fig = build_figure(n, mode="tiny", out=tmp_path)
        df = pd.DataFrame({"sweep": [fig.sweeps[-1].name], "label": ["x"], "status": ["ok"]})
        paths = figures.plot_figure(fig, df)
        assert paths["png"].stat().st_size > 0
        assert not paths["coverage"].complete and paths["coverage"].ok == 1


def test_written_sweep_files_load(tmp_path):
    """The figN_*.toml written next to the figure are valid sweep files with the same tasks."""
    fig = build_figure(6, mode="tiny", out=tmp_path)
    for d, spec in zip(fig.docs, fig.sweeps):
        f = tmp_path / "x.toml"
        f.write_text(toml_text(d))
        again = load_sweep(f)
        assert [t.key for t in plan(again).tasks] == [t.key for t in plan(spec).tasks]


def test_tiny_figure1_end_to_end_and_resume(tmp_path, capsys):
    """Fig. 1 at D = 12, 2 lam points, 1 seed: PNG, PDF, CSV with the expected columns; a rerun computes nothing."""
    out = tmp_path / "figs"
    args = ["figure", "1", "--tiny", "--out", str(out), "--workers", "1", "--no-progress"]
    assert hdlora_main(args) == 0
    printed = capsys.readouterr().out
    png = out / "fig1.png"
    assert f"picture: {png}" in printed
    for name in ("fig1.png", "fig1.pdf", "fig1.csv", "fig1.sqlite"):
        assert (out / name).stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "fig1.pdf").read_bytes()[:5] == b"%PDF-"
    df = pd.read_csv(out / "fig1.csv")
    for col in (
        "sweep",
        "label",
        "lam",
        "lam_ft",
        "noise",
        "status",
        "finetune_test_error",
        "finetune_test_error_se",
        "bo_finetune_test_error",
    ):
        assert col in df.columns, col
    assert set(df["label"]) == {"theory", "lora_only", "bayes_optimal", "simulate"}
    assert (df["status"] == "ok").all()
    sims = df[df["label"] == "simulate"]
    assert len(sims) == 2 * 3 * 2 and (sims["dim"] == 12).all()
    assert {s for s in df["sweep"]} >= {"fig1-theory", "fig1-simulate", "fig1-inset-noise0.5", "fig1-inset-noise2"}
    with sqlite3.connect(out / "fig1.sqlite") as con:
        n_rows = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        ids = {r[0] for r in con.execute("SELECT DISTINCT run_id FROM results")}
    # rerun: nothing new is computed, the same rows (same run ids) are there
    assert hdlora_main(args) == 0
    printed = capsys.readouterr().out
    assert "0 computed now" in printed
    with sqlite3.connect(out / "fig1.sqlite") as con:
        assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == n_rows
        assert {r[0] for r in con.execute("SELECT DISTINCT run_id FROM results")} == ids
    assert sorted(p.name for p in out.glob("fig1_*.toml")) == [
        "fig1_inset_noise0.5.toml",
        "fig1_inset_noise2.toml",
        "fig1_simulate.toml",
        "fig1_theory.toml",
    ]
