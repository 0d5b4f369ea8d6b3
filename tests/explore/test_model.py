"""The explorer's model (no browser): curves, markers, the reproducing commands, PNG, CLI errors."""

from __future__ import annotations

import math
import shlex
import subprocess
import sys

import pytest

from hdlora import ParamError, Params
from hdlora.cli import build_parser, main, params_from_args
from hdlora.experiments.sweep import parse_sweep
from hdlora.explore.model import (
    View,
    curve_columns,
    render_png,
    simulation_markers,
    solve_curve,
    sweep_toml,
    theory_command,
)

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


def _view(**kw) -> View:
    return View.for_axis(Params(activation="linear", noise=0.7, lam=0.05), kw.pop("axis", "alpha_ft"), **kw)


@pytest.mark.parametrize("axis", ["alpha_ft", "tokens", "lam"])
def test_grid_is_the_sweep_grid(axis):
    v = _view(axis=axis, num=7)
    spec = parse_sweep(tomllib.loads(sweep_toml(v)), "<explore>")
    assert spec.axes == ((axis, tuple(v.xs())),)
    assert len(v.xs()) == 7
    # the fixed parameters of the file are the view's (all but the swept one)
    run = spec.runs[0]
    assert run.kind == "theory" and run.options == {"n_mc": 2000, "seed": 0}
    assert dict(spec.fixed) == {k: x for k, x in v.params.to_dict().items() if k != axis and x is not None}


def test_tokens_axis_is_integer():
    v = _view(axis="tokens", num=20)
    assert v.xs() == list(range(2, 11))
    assert v.point(v.xs()[3]).tokens == 5


def test_theory_command_gives_the_view_point():
    v = _view(num=5).replace(params=Params(activation="linear", reuse=True, beta=0.8, kappa=1.5, noise=0.7))
    x = v.xs()[1]
    words = shlex.split(theory_command(v, x))
    assert words[:2] == ["hdlora", "theory"]
    args = build_parser().parse_args(words[1:])
    assert params_from_args(args, beta=args.beta) == v.point(x)
    assert args.n_mc == v.n_mc


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"num": 1}, "points"),
        ({"n_mc": 10}, "n_mc"),
        ({"start": 0.0}, "log-spaced"),
        ({"start": 3.0, "stop": 3.0}, "differ"),
    ],
)
def test_bad_view_is_one_clear_error(kw, word):
    with pytest.raises(ParamError, match=word):
        _view(**kw)


def test_bad_axis_value_names_the_parameter():
    with pytest.raises(ParamError, match="kappa must be >= 1"):
        _view(axis="kappa", start=0.5, stop=2.0, log=False)


def test_curve_matches_cold_solves_and_marks_points():
    """Warm starts change the path, not the fixed point: the curve equals independent cold solves."""
    from hdlora.theory.solve import solve

    v = _view(num=3, n_mc=500)
    seen = []
    pts = solve_curve(v, on_point=lambda i, p: seen.append(i))
    assert seen == [0, 1, 2]
    for p in pts:
        r = solve(v.point(p.x), n_mc=500, warn=False)
        assert p.converged == r.converged
        assert p.E == pytest.approx(r.finetune_test_error, rel=1e-5)
        assert p.overlap == pytest.approx(r.overlap, rel=1e-5, abs=1e-7)
        assert p.delta_eff == pytest.approx(r.delta_eff, rel=1e-6)  # Q, M: fixed point at tol 1e-7
    # a warm start of the first point from elsewhere (the page's previous view) lands on the same curve, or on
    # another fixed point of the sampled map with the same training objective (measured at n_mc = 500,
    # alpha' = 0.2: m = 0.1904 vs 0.1937, E' 2.3368 vs 2.3334, objective 0.3270198 vs 0.3270192: the samples
    # cannot tell the two apart)
    again = solve_curve(v, init=pts[-1].state)
    for p, a in zip(pts, again):
        if a.E != pytest.approx(p.E, rel=1e-5):
            r_cold = solve(v.point(p.x), n_mc=500, warn=False)
            r_warm = solve(v.point(p.x), n_mc=500, warn=False, init=pts[-1].state)
            assert r_cold.converged and r_warm.converged
            assert r_warm.finetune_test_error == pytest.approx(a.E, rel=1e-9)
            assert r_warm.finetune_objective == pytest.approx(r_cold.finetune_objective, rel=1e-5)
            assert a.E == pytest.approx(p.E, rel=1e-2)
    # columns: the line leaves out non-converged points; markers take them
    pts[1].converged = False
    cols = curve_columns(pts)
    assert math.isnan(cols["theory"]["E"][1]) and cols["nonconverged"]["x"] == [pts[1].x]
    pts[2].replicon_ok = False
    assert curve_columns(pts)["replicon"]["x"] == [pts[2].x]
    png = render_png(v, pts)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cancelled_curve_stops():
    assert solve_curve(_view(num=4, n_mc=500), cancelled=lambda: True) == []


def test_simulation_markers_match_the_fixed_parameters():
    v = _view()
    base = v.params
    rows = [
        {
            "params": base.replace(alpha_ft=1.0).to_dict(),
            "result": {
                "finetune_test_error": 1.0,
                "finetune_test_error_se": 0.1,
                "overlap": 0.5,
                "delta_eff": 2.0,
                "n_seeds": 4,
            },
        },
        {
            "params": base.replace(alpha_ft=2.0, lam=0.5).to_dict(),  # another lambda: not this view
            "result": {"finetune_test_error": 9.0, "overlap": 0.1, "delta_eff": 2.0},
        },
    ]
    m = simulation_markers(rows, v)
    assert m["x"] == [1.0] and m["E"] == [1.0]
    assert m["E_lo"][0] == pytest.approx(1.0 - 0.1 * 2) and m["E_hi"][0] == pytest.approx(1.0 + 0.1 * 2)
    assert m["overlap_lo"] == m["overlap"] == [0.5]  # no se stored: no error bar


def test_cli_errors_exit_2(capsys, tmp_path):
    assert main(["explore", "--points", "1", "--no-browser"]) == 2
    assert "points must be an integer in [2, 60]" in capsys.readouterr().err
    assert main(["explore", "--database", str(tmp_path / "none.sqlite"), "--no-browser"]) == 2
    assert "--database" in capsys.readouterr().err
    assert main(["explore", "--port", "70000", "--no-browser"]) == 2
    assert "--port must be in [0, 65535]" in capsys.readouterr().err


def test_explorer_modules_do_not_import_torch():
    """The explorer's own modules stay torch-free (the solver is imported only when a point is solved)."""
    code = (
        "import sys, hdlora.explore.model, hdlora.explore.cli, hdlora.explore.server\n"
        "try:\n    import hdlora.explore.app\nexcept ImportError:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_warm_start_that_does_not_converge_is_repeated_cold(monkeypatch):
    """solve_point: a warm-started solve that does not converge is solved again from the cold start (as hdlora
    optimize does), and the point is the cold solve's; a converged warm start is kept."""
    import dataclasses

    from hdlora.explore.model import solve_point

    S = sys.modules["hdlora.theory.solve"]  # (the package attribute ``solve`` is the function)

    real = S.solve
    calls = []

    def fake(params, **kw):
        calls.append(kw.get("init") is not None)
        r = real(params, **kw)
        return dataclasses.replace(r, converged=False) if kw.get("init") is not None else r  # the warm start fails

    monkeypatch.setattr(S, "solve", fake)
    v = _view(num=2, n_mc=500)
    init = real(v.point(v.xs()[1]), n_mc=500, warn=False).state
    p = solve_point(v.point(v.xs()[0]), v.xs()[0], n_mc=500, init=init)
    assert calls == [True, False] and p.converged
    cold = real(v.point(v.xs()[0]), n_mc=500, warn=False)
    assert p.E == cold.finetune_test_error and p.state == cold.state
    monkeypatch.setattr(S, "solve", real)
    calls.clear()
    assert solve_point(v.point(v.xs()[0]), v.xs()[0], n_mc=500, init=init).converged


def test_the_first_point_after_a_delta_move_converges():
    """The browser test's case: the first point (linear, alpha' = 0.2, n_mc = 500) after Delta 0.5 -> 1.31,
    warm-started from the previous view's first point, is a converged point equal to the cold solve's or another
    converged fixed point of the same samples."""
    from hdlora.explore.model import solve_point
    from hdlora.theory.solve import solve

    v0 = View(params=Params(activation="linear"), num=6, n_mc=500)
    first = solve_curve(v0.replace(num=2))[0]
    v1 = v0.replace(params=v0.params.replace(noise=1.31))
    p = solve_point(v1.point(0.2), 0.2, n_mc=500, init=first.state)
    assert p.converged and math.isfinite(p.E)
    assert p.E == pytest.approx(solve(v1.point(0.2), n_mc=500, warn=False).finetune_test_error, rel=0.05)
