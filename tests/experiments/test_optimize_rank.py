"""``optimize --over lora_rank[,lam_ft]``: the integer rank axis against ranks solved directly (issue 14)."""

import json
import math

import pytest

from hdlora import Params, cli
from hdlora.experiments.optimize import FLAT_REL, max_lora_rank, optimize, rank_bounds
from hdlora.params import ParamError
from hdlora.theory import solve

# linear sigma, r* = 2 (strengths 1, 0.5), small n_mc: every rank 1..3 converges in a few seconds
BASE = Params(
    alpha=0.1,
    alpha_ft=1.0,
    tokens=3,
    activation="linear",
    lam_ft=2.0,
    teacher_rank=2,
    teacher_strengths=(1.0, 0.5),
)
N_MC = 500


def test_rank_axis_against_an_independent_grid_of_ranks():
    res = optimize(BASE, "finetune_test_error", "lora_rank", bounds={"lora_rank": (1, 3)}, n_mc=N_MC, warn=False)
    direct = {r: solve(BASE.replace(lora_rank=r), n_mc=N_MC, warn=False) for r in (1, 2, 3)}
    assert [e["lora_rank"] for e in res.per_rank] == [1, 2, 3]
    for e in res.per_rank:
        d = direct[e["lora_rank"]]
        assert e["value"] == d.finetune_test_error  # the same solve, the same samples
        assert e["converged"] == d.converged
    ok = {r: d.finetune_test_error for r, d in direct.items() if d.converged}
    assert ok, "the setting is chosen so that the ranks converge"
    best = min(ok, key=ok.get)
    assert res.optimum["lora_rank"] == best and res.value == ok[best]
    assert res.params["lora_rank"] == best
    flat = sorted(r for r, v in ok.items() if abs(v - ok[best]) <= FLAT_REL * abs(ok[best]))
    assert [e["lora_rank"] for e in res.flat_ranks] == flat
    assert res.at_bound["lora_rank"] == (best in (1, 3))
    d = json.loads(json.dumps(res.to_dict(), default=float))
    assert d["optimum"]["lora_rank"] == best and len(d["per_rank"]) == 3


def test_the_overlap_is_maximised_over_rank():
    res = optimize(BASE, "overlap", "lora_rank", bounds={"lora_rank": (1, 2)}, n_mc=N_MC, warn=False)
    vals = {e["lora_rank"]: e["value"] for e in res.per_rank if e["converged"]}
    assert res.maximize and res.value == max(vals.values())


@pytest.mark.slow
def test_lam_ft_tuned_per_rank_beats_an_independent_lam_ft_grid():
    grid = [0.5, 1.0, 2.0, 4.0]
    res = optimize(
        BASE,
        "finetune_test_error",
        "lora_rank,lam_ft",
        bounds={"lora_rank": (1, 2), "lam_ft": (0.5, 4.0)},
        n_mc=N_MC,
        n_grid=3,
        tol=0.05,
        warn=False,
    )
    for e in res.per_rank:
        r = e["lora_rank"]
        vals = [solve(BASE.replace(lora_rank=r, lam_ft=lf), n_mc=N_MC, warn=False) for lf in grid]
        best_grid = min(v.finetune_test_error for v in vals if v.converged)
        assert e["converged"] and e["value"] <= best_grid * (1 + 1e-6), (r, e["value"], best_grid)
        at = solve(BASE.replace(lora_rank=r, lam_ft=e["optimum"]["lam_ft"]), n_mc=N_MC, warn=False)
        assert at.finetune_test_error == pytest.approx(e["value"], rel=1e-6)
    assert res.value == min(e["value"] for e in res.per_rank)


def test_rank_bounds_default_and_limit():
    p = Params(tokens=3)
    assert max_lora_rank(p) == 21  # lora_rank * tokens <= 64
    assert rank_bounds(p, None) == (1, 8)
    assert rank_bounds(Params(tokens=16), None) == (1, 4)
    assert rank_bounds(p, (2, 5)) == (2, 5)
    for bad in ((0, 2), (1.5, 2), (1, 22), (3, 2), (1, math.inf), ("a", 2)):
        with pytest.raises(ParamError, match="lora_rank bounds must be integers"):
            rank_bounds(p, bad)


@pytest.mark.parametrize("bounds", ["lora_rank=0:2", "lora_rank=1.5:3", "lora_rank=1:22", "lora_rank=1:x"])
def test_bad_rank_bounds_refused_in_one_line(bounds, capsys):
    assert cli.main(["optimize", "--over", "lora_rank", "--bounds", bounds, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "lora_rank" in err[0]


def test_bad_lora_rank_flag_refused_in_one_line(capsys):
    assert cli.main(["optimize", "--over", "lam_ft", "--lora-rank", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank" in err[0].replace("-", "_")
