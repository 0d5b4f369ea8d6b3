"""scripts/landscape_rank.py (issue 14, the landscape against the LoRA rank) runs end to end at a
small D, writes one CSV row per start, skips what its CSV already holds, and draws its plot."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "landscape_rank.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("landscape_rank", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_runs_end_to_end_and_resumes(script, tmp_path, capsys):
    out, png = tmp_path / "ls.csv", tmp_path / "ls.png"
    base = ["--dim", "24", "--seeds", "0", "--starts", "2", "--csv", str(out), "--plot", str(png)]
    assert script.main(base + ["--ranks", "1", "2", "--settings", "hard", "easy", "--n-mc", "2000"]) == 0
    rows = _rows(out)
    assert len(rows) == 2 * 2 * 3  # settings x ranks x (informed + 2 random)
    assert set(rows[0]) == set(script.FIELDS)
    assert {(r["setting"], r["r"]) for r in rows} == {(s, r) for s in ("hard", "easy") for r in ("1", "2")}
    for r in rows:
        assert r["start"] in ("informed", "random0", "random1")
        for k in ("objective", "E_ft", "E_ft_trunc", "overlap", "sv1", "wall_time", "polish_drop"):
            assert math.isfinite(float(r[k])), (k, r[k])
        assert 0.0 <= float(r["overlap"]) <= 1.0 + 1e-12
        if r["r"] == "1":  # rank one: no extra direction, the truncation is w itself
            assert float(r["sv2"]) == 0.0 and r["E_ft_trunc"] == r["E_ft"]
        else:
            assert float(r["sv1"]) >= float(r["sv2"]) >= 0.0
    easy = [r for r in rows if r["setting"] == "easy"]
    assert float(easy[0]["Q0"]) == 2.0 and 0 < float(easy[0]["Q"]) < 2  # from the state evolution
    assert {(float(r["Q0"]), float(r["Q"]), float(r["M"])) for r in rows if r["setting"] == "hard"} == {(4.0, 4.0, 1.0)}
    assert png.stat().st_size > 0
    summary = capsys.readouterr().out
    assert "hard" in summary and "easy" in summary
    # resumable: the groups already in the CSV are skipped, a new rank is added
    assert script.main(base + ["--ranks", "1", "4", "--settings", "hard", "--no-plot"]) == 0
    rows2 = _rows(out)
    assert rows2[: len(rows)] == rows
    assert len(rows2) == len(rows) + 3 and {r["r"] for r in rows2[len(rows) :]} == {"4"}


def test_reach_fraction_counts_starts_within_tolerance(script):
    def row(start, obj):
        return dict(
            setting="hard", D=24.0, seed=0.0, r=1.0, start=start, N_ft=36.0, objective=obj, E_ft=1.0, overlap=0.5,
            E_ft_trunc=1.0, sv1=1.0, sv2=0.0, sv3=0.0, sv4=0.0, sv_rest=0.0, polish_drop=0.0, converged=1.0,
            wall_time=0.1, iterations=3.0, numerical_rank=1.0,
        )  # fmt: skip

    rows = [row("informed", 1.0), row("random0", 1.0 + 1e-10), row("random1", 1.0 + 5e-4), row("random2", 1.2)]
    (s,) = script.summarise(rows, 1e-8)
    assert s["frac_reach"] == pytest.approx(1 / 3)
    assert s["frac_near_0.001"] == pytest.approx(2 / 3) and s["frac_near_0.01"] == pytest.approx(2 / 3)
    assert s["gap_miss_min"] == pytest.approx(5e-4) and s["gap_miss_max"] == pytest.approx(0.2)


def test_bad_arguments_refused(script):
    with pytest.raises(SystemExit) as e:
        script.main(["--dim", "8", "--ranks", "16"])
    assert e.value.code == 2
