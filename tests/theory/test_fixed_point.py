"""The damped fixed-point iterator (hdlora.theory.fixed_point.iterate) on maps with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from hdlora.theory.fixed_point import NonConvergenceWarning, iterate


def test_contraction_reaches_its_known_fixed_point():
    # F(x) = cos(x) has the unique fixed point x = 0.739085133215... (Dottie number)
    r = iterate(lambda s: ({"x": math.cos(s["x"])}, None), {"x": 1.0}, mixing=1.0, tol=1e-12)
    assert r.converged
    assert r.state["x"] == pytest.approx(0.7390851332151607, abs=1e-11)
    assert r.residual <= 1e-12
    assert r.iterations == len(r.history)


def test_damping_converges_an_oscillating_map_plain_iteration_cannot():
    # F(x) = 1 - 1.5 (x - 1) + 1 ... fixed point x = 1 with slope -1.5: plain iteration diverges,
    # damping (1 - a) + a(-1.5) has modulus < 1 for a < 0.8.
    f = lambda s: ({"x": 1.0 - 1.5 * (s["x"] - 1.0)}, None)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        plain = iterate(f, {"x": 2.0}, mixing=1.0, tol=1e-10, max_iter=40, min_mixing=1.0, anderson=0)
    assert not plain.converged
    damped = iterate(f, {"x": 2.0}, mixing=0.5, tol=1e-10, anderson=0)
    assert damped.converged and damped.state["x"] == pytest.approx(1.0, abs=1e-9)


def test_non_convergent_map_is_flagged_and_warned():
    # F(x) = x + 1 has no fixed point
    with pytest.warns(NonConvergenceWarning, match="not converged"):
        r = iterate(lambda s: ({"x": s["x"] + 1.0}, None), {"x": 0.0}, tol=1e-8, max_iter=30, name="shift")
    assert not r.converged and r.iterations == 30 and r.residual > 1e-8


def test_nan_stops_and_is_not_converged():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        r = iterate(lambda s: ({"x": math.nan}, None), {"x": 1.0}, max_iter=10)
    assert not r.converged and math.isnan(r.residual) and r.iterations == 1


def test_anderson_default_is_faster_than_damped_iteration_on_a_slow_contraction():
    # F(x) = 0.95 x + 0.05: fixed point 1, contraction 0.95 (damped iteration needs ~500 steps for 1e-12)
    f = lambda s: ({"x": 0.95 * s["x"] + 0.05}, None)  # noqa: E731
    plain = iterate(f, {"x": 0.0}, mixing=1.0, tol=1e-12, anderson=0)
    fast = iterate(f, {"x": 0.0}, mixing=1.0, tol=1e-12)
    assert plain.converged and fast.converged and fast.state["x"] == pytest.approx(1.0, abs=1e-11)
    assert fast.iterations <= 5 < 400 < plain.iterations


def test_bounds_are_a_domain_and_aux_is_the_last_call():
    calls = []

    def f(s):
        calls.append(s["v"])
        return {"v": 0.5 * s["v"] + 1.0}, len(calls)

    r = iterate(f, {"v": -5.0}, bounds={"v": (0.1, np.inf)}, tol=1e-12, mixing=1.0)
    assert calls[0] == 0.1  # the start was clipped into the box (later steps that leave it are shortened)
    assert r.converged and r.state["v"] == pytest.approx(2.0, abs=1e-11)
    assert r.aux == len(calls)


def test_relative_residual_on_large_values():
    # residual is |F(x) - x| / max(1, |x|): a 1e-9 relative error at x ~ 1e6 counts as converged at 1e-8
    r = iterate(lambda s: ({"x": 1e6 * (1 + 1e-9)}, None), {"x": 1e6}, tol=1e-8, mixing=1.0)
    assert r.converged and r.iterations == 1


@pytest.mark.parametrize(
    "kw, msg",
    [({"mixing": 0.0}, "mixing"), ({"mixing": 1.5}, "mixing"), ({"tol": 0.0}, "tol"), ({"max_iter": 0}, "max_iter")],
)
def test_bad_settings_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        iterate(lambda s: (s, None), {"x": 0.0}, **kw)
