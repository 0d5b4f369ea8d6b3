"""The state-evolution engine (hdlora.theory.engine) on maps with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from hdlora.theory.engine import (
    CONVERGED,
    CONVERGED_MC,
    NOT_CONVERGED,
    REPLICA_UNSTABLE,
    BranchChoiceWarning,
    CarryDependenceError,
    MCResolution,
    Stage,
    check_carry_independence,
    residual,
    solve_stage,
)
from hdlora.theory.fixed_point import NonConvergenceWarning, iterate


def map_stage(F, **kw):
    """A stage from a plain map F(x) (no carry)."""
    return Stage(init=lambda p, s: None, update=lambda x, c: (F(x), c, None), **kw)


def solve_quiet(stage, starts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        warnings.simplefilter("ignore", BranchChoiceWarning)
        return solve_stage(stage, starts, **kw)


def test_contraction_reaches_its_known_fixed_point_and_records_the_iteration():
    # F(x) = cos(x): the Dottie number 0.739085133215160...
    st = map_stage(np.cos, names=("x",))
    r = solve_stage(st, {"uninformed": [1.0]}, tol=1e-12)
    b = r.branch
    assert r.status == CONVERGED and b.status == CONVERGED and r.converged
    assert r.state["x"] == pytest.approx(0.7390851332151607, abs=1e-11)
    # the residual is measured at the returned point
    assert b.residual == residual(np.cos(b.x), b.x) <= 1e-12
    assert b.iterations == len(b.history) and b.history[-1] == b.residual
    # Anderson needs far fewer evaluations than plain iteration (rate |sin x*| = 0.67: ~70 for 1e-12)
    plain = solve_stage(st, {"uninformed": [1.0]}, tol=1e-12, anderson=0)
    assert plain.status == CONVERGED and plain.iterations > 3 * b.iterations


def test_oscillating_map_plain_iteration_cannot_converge_and_the_engine_does():
    # F(x) = 1 - 1.5 (x - 1): slope -1.5, plain iteration diverges with growing oscillation
    F = lambda x: 1.0 - 1.5 * (x - 1.0)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        old = iterate(
            lambda s: ({"x": float(F(s["x"]))}, None),
            {"x": 2.0},
            mixing=1.0,
            tol=1e-10,
            max_iter=500,
            anderson=0,
            min_mixing=1.0,
        )
    # plain iteration (no acceleration, mixing held at 1): the growing oscillation never converges
    assert not old.converged and old.mixing == 1.0 and old.residual > 1.0  # (the best point evaluated: the start)
    # fixed_point.iterate is the engine: with its defaults (Anderson) it converges
    new = iterate(lambda s: ({"x": float(F(s["x"]))}, None), {"x": 2.0}, mixing=1.0, tol=1e-10)
    assert new.converged and new.state["x"] == pytest.approx(1.0, abs=1e-9) and new.iterations <= 4
    # the engine's stall rule halves the mixing even without acceleration
    r = solve_stage(map_stage(F), {"u": [2.0]}, mixing=1.0, anderson=0, tol=1e-10)
    assert r.status == CONVERGED and r.x[0] == pytest.approx(1.0, abs=1e-9)
    assert r.branch.mixing < 0.8 and any("mixing reduced" in e for _, e in r.branch.events)
    # with Anderson (a secant step on a linear map) in a few evaluations
    a = solve_stage(map_stage(F), {"u": [2.0]}, mixing=1.0, tol=1e-10)
    assert a.status == CONVERGED and a.x[0] == pytest.approx(1.0, abs=1e-10) and a.iterations <= 4


def test_repelling_fixed_point_no_damping_converges_anderson_does():
    # F(x) = 2x - 1: fixed point 1 with slope 2; damped step multiplier 1 + a > 1 for every a > 0
    F = lambda x: 2.0 * x - 1.0  # noqa: E731
    for a in (1.0, 0.5, 0.1):
        with pytest.warns(NonConvergenceWarning, match="not converged"):
            d = solve_stage(map_stage(F), {"u": [1.5]}, mixing=a, anderson=0, max_iter=60)
        assert d.status == NOT_CONVERGED and not d.converged and abs(d.x[0] - 1.0) > 0.4
    r = solve_stage(map_stage(F), {"u": [1.5]}, mixing=0.5, tol=1e-12)
    assert r.status == CONVERGED and r.x[0] == pytest.approx(1.0, abs=1e-12)


def double_well(tilt):
    """Gradient step on V(x) = (x^2 - 1)^2 + tilt x: fixed points = stationary points of V."""
    V = lambda x: (x * x - 1.0) ** 2 + tilt * x  # noqa: E731
    F = lambda x: x - 0.05 * (4 * x**3 - 4 * x + tilt)  # noqa: E731
    minima = sorted(r.real for r in np.roots([4.0, 0.0, -4.0, tilt]) if abs(r.imag) < 1e-12 and 12 * r.real**2 - 4 > 0)
    return V, F, minima


def test_two_fixed_points_both_found_lower_objective_chosen_other_kept():
    V, F, (xl, xr) = double_well(0.3)
    st = map_stage(F, objective=lambda x, c: (float(V(x[0])), None))
    r = solve_stage(st, {"uninformed": [1.3], "informed": [-1.3]}, tol=1e-12)
    assert r.branches["uninformed"].x[0] == pytest.approx(xr, abs=1e-10)
    assert r.branches["informed"].x[0] == pytest.approx(xl, abs=1e-10)
    assert V(xl) < V(xr)  # the tilt makes the left well lower
    assert r.chosen == "informed" and r.status == CONVERGED and not r.undecided
    other = r.branches["uninformed"]
    assert other.status == CONVERGED and other.objective == pytest.approx(V(xr), rel=1e-12)
    (c,) = r.comparisons
    assert c.other == "uninformed" and c.verdict == "higher" and c.diff == pytest.approx(V(xr) - V(xl), rel=1e-9)
    # the same two starts in the other order: same choice
    r2 = solve_stage(st, {"informed": [-1.3], "uninformed": [1.3]}, tol=1e-12)
    assert r2.chosen == "informed"


def test_starts_converging_to_the_same_point_are_not_undecided():
    V, F, (xl, xr) = double_well(0.3)
    st = map_stage(F, objective=lambda x, c: (float(V(x[0])), None))
    r = solve_stage(st, {"a": [1.5], "b": [0.8]}, tol=1e-12)
    assert r.comparisons[0].verdict == "same point" and not r.undecided and r.flags == ()


def noisy_double_well(tilt, n=100, seed=0):
    """Two branches whose per-sample objectives V(x) + x u_i differ by noise of s.e. ~ |x_l - x_r| / sqrt(n)."""
    V, F, minima = double_well(tilt)
    u = np.random.default_rng(seed).standard_normal(n)
    st = Stage(
        init=lambda p, s: s,
        update=lambda x, c: (F(x), c, None),
        objective=lambda x, c: (float(np.mean(V(x[0]) + x[0] * c)), V(x[0]) + x[0] * c),
    )
    return st, u, V, minima


def test_undecided_when_paired_objectives_differ_within_two_standard_errors():
    st, u, V, (xl, xr) = noisy_double_well(0.01)
    with pytest.warns(BranchChoiceWarning, match="undecided"):
        r = solve_stage(st, {"informed": [-1.3], "uninformed": [1.3]}, samples=u, tol=1e-12)
    (c,) = r.comparisons
    d = (V(xr) + xr * u) - (V(xl) + xl * u)
    assert c.se == pytest.approx(np.std(d, ddof=1) / 10, rel=1e-9) and c.se > 0.1
    assert abs(c.diff) <= 2 * c.se and c.verdict == "undecided" and r.undecided
    # a clear objective gap on the same samples is decided
    st2, u2, V2, _ = noisy_double_well(1.0)
    r2 = solve_stage(st2, {"informed": [-1.3], "uninformed": [1.3]}, samples=u2, tol=1e-12)
    assert r2.chosen == "informed" and r2.comparisons[0].verdict == "higher" and not r2.undecided


def test_branches_on_different_samples_are_not_compared():
    from hdlora.theory.engine import choose_branch

    st, u, _, _ = noisy_double_well(0.3)
    a = solve_stage(st, {"informed": [-1.3]}, samples=u, samples_key=("mc", 0), tol=1e-12).branch
    b = solve_stage(st, {"uninformed": [1.3]}, samples=u, samples_key=("mc", 1), tol=1e-12).branch
    with pytest.raises(ValueError, match="same samples"):
        choose_branch([a, b])


def test_replica_unstable_branch_with_lower_objective_is_not_chosen_silently():
    V, F, (xl, xr) = double_well(0.3)
    # the lower (left) branch is declared replica-unstable through aux
    st = Stage(
        init=lambda p, s: None,
        update=lambda x, c: (F(x), c, {"replicon": 1.7 if x[0] < 0 else 0.4}),
        objective=lambda x, c: (float(V(x[0])), None),
    )
    with pytest.warns(BranchChoiceWarning, match="replica-unstable"):
        r = solve_stage(st, {"informed": [-1.3], "uninformed": [1.3]}, tol=1e-12)
    assert r.branches["informed"].status == REPLICA_UNSTABLE and r.branches["informed"].replicon == 1.7
    assert r.chosen == "uninformed" and r.status == CONVERGED
    assert any("'informed'" in f and "replica-unstable" in f for f in r.flags)
    # only unstable branches: the lowest is returned, with status replica-unstable
    st_all = Stage(
        init=st.init, update=lambda x, c: (F(x), c, None), objective=st.objective, replicon=lambda x, c, aux: 2.0
    )
    with pytest.warns(BranchChoiceWarning, match="no replica-stable"):
        r2 = solve_stage(st_all, {"informed": [-1.3], "uninformed": [1.3]}, tol=1e-12)
    assert r2.chosen == "informed" and r2.status == REPLICA_UNSTABLE and not r2.converged


def test_non_convergent_map_is_flagged_and_warned():
    # F(x) = x + 1 has no fixed point
    with pytest.warns(NonConvergenceWarning, match="not converged"):
        r = solve_stage(map_stage(lambda x: x + 1.0, name="shift"), {"u": [0.0]}, max_iter=40)
    b = r.branch
    assert r.status == NOT_CONVERGED and b.status == NOT_CONVERGED and b.iterations == 40 and b.reason
    # the returned point is one where F was evaluated, with its residual
    assert b.residual == pytest.approx(residual(b.x + 1.0, b.x), rel=1e-12) and b.residual > 1e-3


def test_nan_image_stops_and_is_not_converged():
    with pytest.warns(NonConvergenceWarning):
        r = solve_stage(map_stage(lambda x: x * math.nan), {"u": [1.0]})
    assert r.status == NOT_CONVERGED and r.branch.iterations == 1 and math.isnan(r.branch.residual)


def test_converged_requires_the_cap_whatever_tol():
    # tol = 0.1 asked; converged still needs residual <= 1e-3
    r = solve_stage(map_stage(lambda x: 0.5 * x + 0.5), {"u": [10.0]}, tol=0.1, anderson=0)
    assert r.status == CONVERGED and r.residual <= 1e-3


def test_domain_leaving_accelerated_step_rejected_and_history_reset_never_clipped():
    # F(x) = x - 0.1 tanh(x - 1), domain x > 0: far from 1 the residual is nearly constant, so the first
    # secant (Anderson) step extrapolates to x ~ -70, outside the domain
    calls = []

    def F(x):
        calls.append(float(x[0]))
        return x - 0.1 * np.tanh(x - 1.0)

    st = map_stage(F, domain=lambda x: bool(x[0] > 0))
    r = solve_stage(st, {"u": [5.0]}, tol=1e-10, max_iter=2000)
    b = r.branch
    assert r.status == CONVERGED and b.x[0] == pytest.approx(1.0, abs=1e-9)
    assert b.n_rejected >= 1
    assert any("leaves the domain" in e and "history reset" in e for _, e in b.events)
    assert min(calls) > 0  # the map was never evaluated outside the domain
    assert all(c != 1e-12 for c in calls)


def test_damped_step_leaving_the_domain_is_shortened_not_clipped():
    # F(x) = -1 everywhere on x > 0: the full damped step leaves; halving keeps it inside; no fixed point
    calls = []

    def F(x):
        calls.append(float(x[0]))
        return np.array([-1.0])

    with pytest.warns(NonConvergenceWarning):
        r = solve_stage(map_stage(F, domain=lambda x: bool(x[0] > 0)), {"u": [1.0]}, anderson=0, max_iter=20)
    assert r.status == NOT_CONVERGED and min(calls) > 0 and r.branch.x[0] > 0


def test_start_outside_the_domain_is_not_solved():
    with pytest.warns(NonConvergenceWarning, match="outside the domain"):
        r = solve_stage(map_stage(lambda x: x, domain=lambda x: bool(x[0] > 0)), {"u": [-1.0]})
    assert r.status == NOT_CONVERGED and r.branch.iterations == 0


def test_vector_contraction_with_rotation_anderson_on_vectors():
    # F(x) = c + 0.95 R(theta) (x - c) in 3-D: a slow rotating contraction (plain rate 0.95)
    th = 1.0
    R = np.array([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0], [0.0, 0.0, 1.0]])
    A = 0.95 * R
    c = np.array([1.0, -2.0, 0.5])
    st = map_stage(lambda x: c + A @ (x - c), names=("m", "q", "v"))
    r = solve_stage(st, {"uninformed": np.zeros(3)}, tol=1e-10, anderson=5)
    assert r.status == CONVERGED and np.allclose(r.x, c, atol=1e-9)
    assert set(r.state) == {"m", "q", "v"}
    plain = solve_stage(st, {"uninformed": np.zeros(3)}, tol=1e-10, anderson=0, max_iter=5000)
    assert plain.status == CONVERGED and np.allclose(plain.x, c, atol=1e-8)
    b, p = r.branch, plain.branch
    assert b.iterations <= 12 < 100 < p.iterations  # linear 3-D map: Anderson(m >= 3) is exact in a few steps
    assert b.iterations == len(b.history) and p.iterations == len(p.history)
    assert b.history[-1] <= 1e-10 and p.history[-1] <= 1e-10


def test_verify_that_changes_the_map_resets_the_history():
    # the map's target moves once, when verify (the global search) finds a "better basin" at the first candidate
    def update(x, c):
        return 0.5 * x + 0.5 * c["target"], c, None

    def verify(x, c):
        if c["target"] == 1.0:
            return {"target": 3.0}, True
        return c, False

    st = Stage(init=lambda p, s: {"target": 1.0}, update=update, verify=verify)
    r = solve_stage(st, {"u": [0.0]}, tol=1e-12)
    assert r.status == CONVERGED and r.x[0] == pytest.approx(3.0, abs=1e-11)
    assert any("verify changed the map" in e for _, e in r.branch.events)


def test_mc_resolution_hook_explains_a_residual_floor():
    # a map with a jump at its would-be fixed point (like samples switching between two maxima): no exact fixed point
    jump = 1e-4
    F = lambda x: 0.5 * x + 0.5 + np.where(x >= 1.0, -jump, jump)  # noqa: E731
    with pytest.warns(NonConvergenceWarning):
        plain = solve_stage(map_stage(F), {"u": [3.0]}, tol=1e-10, max_iter=200)
    assert plain.status == NOT_CONVERGED and plain.residual > 1e-6

    def explain(x, carry, aux, res):
        return MCResolution(floor=4 * jump, evidence={"jump": jump, "switching samples": 1})

    r = solve_stage(map_stage(F, mc_resolution=explain), {"u": [3.0]}, tol=1e-10, max_iter=200)
    assert r.status == CONVERGED_MC and r.converged and r.branch.mc.evidence["jump"] == jump
    assert 1e-10 < r.residual <= 4 * jump
    # a floor that does not explain the residual leaves it not converged
    with pytest.warns(NonConvergenceWarning):
        r2 = solve_stage(
            map_stage(F, mc_resolution=lambda *a: MCResolution(1e-9)), {"u": [3.0]}, tol=1e-10, max_iter=200
        )
    assert r2.status == NOT_CONVERGED


def test_inner_tolerance_follows_the_residual():
    seen = []

    def update(x, c, inner_tol):
        seen.append(inner_tol)
        return np.cos(x), c, None

    st = Stage(init=lambda p, s: None, update=update, inner_tol=True)
    r = solve_stage(st, {"u": [1.0]}, tol=1e-10, anderson=0)
    assert r.converged and seen[0] == pytest.approx(1e-2)
    h = r.branch.history
    assert all(t == pytest.approx(1e-2 * res) for t, res in zip(seen[1:], h[:-1]))


def test_carry_independence_helper():
    # good: the carry is a warm start of an inner Newton solve of y^3 = x, solved to full precision
    def cube_root_update(x, c):
        y = c["y0"] if c["y0"] is not None else np.ones_like(x)
        for _ in range(100):
            y = y - (y**3 - x) / (3 * y**2)
        return 0.5 * y + 0.5, {"y0": y}, None

    good = Stage(init=lambda p, s: {"y0": None}, update=cube_root_update)
    dev = check_carry_independence(good, [8.0], [{"y0": None}, {"y0": np.array([5.0])}, {"y0": np.array([0.3])}])
    assert dev < 1e-12

    # bad: the carry decides which of two fixed points of an inner problem is returned (a tracked local maximum)
    def basin_update(x, c):
        root = c["basin"] * np.sqrt(np.abs(x))
        return root, c, None

    bad = Stage(init=lambda p, s: {"basin": 1.0}, update=basin_update, name="bad stage")
    with pytest.raises(CarryDependenceError, match="depends on the carry"):
        check_carry_independence(bad, [4.0], [{"basin": 1.0}, {"basin": -1.0}])


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"mixing": 0.0}, "mixing"),
        ({"mixing": 1.5}, "mixing"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"anderson": -1}, "anderson"),
        ({"stall": 0}, "stall"),
    ],
)
def test_bad_settings_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        solve_stage(map_stage(lambda x: x), {"u": [0.0]}, **kw)


def test_no_starts_refused():
    with pytest.raises(ValueError, match="start"):
        solve_stage(map_stage(lambda x: x), {})


# ------------------------------------------------------------------ real stages, wrapped read-only
def pretrain_linear_stage(params):
    """Pre-training state evolution for sigma(x) = x/T with the closed-form output channel (eqs. 49-54)."""
    from hdlora.theory.pretrain import A0_of, input_channel, output_channel_exact

    A0, T = A0_of(params), params.tokens

    def update(x, c):
        Q, M, V = x
        h = output_channel_exact(params.alpha, A0, T, Q, M, V)
        try:
            new, _ = input_channel(params.kappa0, params.kappa, params.lam, h["Mhat"], h["Qhat"], h["Vhat"])
        except FloatingPointError:
            return np.full(3, math.nan), c, h
        return np.array([new["Q"], new["M"], new["V"]]), c, h

    return Stage(
        init=lambda p, s: None,
        update=update,
        names=("Q", "M", "V"),
        name="pre-training (linear, exact)",
        domain=lambda x: bool(x[2] > 0 and x[0] > 0 and x[0] >= x[1] ** 2 / A0),
    )


@pytest.mark.parametrize("alpha, lam", [(0.1, 0.1), (0.5, 0.01), (2.0, 0.1), (0.3, 1e-3)])
def test_real_stage_pretrain_linear_reaches_solve_pretrain_fixed_point(alpha, lam):
    from hdlora import Params
    from hdlora.theory.pretrain import solve_pretrain

    p = Params(alpha=alpha, tokens=3, kappa0=1.0, kappa=1.0, noise=0.5, lam=lam, activation="linear")
    ref = solve_pretrain(p, method="exact", tol=1e-10, max_iter=5000)
    assert ref.converged
    x0 = [0.5 * p.Q0, 0.4 * p.Q0, 1.0]  # solve_pretrain's default start
    r = solve_stage(pretrain_linear_stage(p), {"informed": x0, "uninformed": [0.5, 1e-3, 1.0]}, tol=1e-10)
    assert r.status == CONVERGED and r.flags == ()  # both starts reach the one fixed point
    # both residuals <= 1e-10 on a contraction: the two points agree to ~1e-10 (measured <= 3e-11)
    for k in "QMV":
        assert r.state[k] == pytest.approx(ref.state[k], abs=1e-9)


def finetune_linear_stage(params, z_star, z, seed, n, purpose="finetune"):
    """Fine-tuning state evolution (eqs. 67-72) for sigma(x) = x/T as solve_finetune builds it (exact prox,
    'direct' form), on the same samples (purpose None: numpy.random.default_rng(seed) draws instead of the named
    stream); objective alpha' L'_train + lam' q per sample."""
    from hdlora.theory.finetune import _linear_update  # read-only use of the stage's update map
    from hdlora.theory.prox_rank_one_linear import LinearRankOneProx
    from hdlora.theory.sampling import standard_normals, to_sym

    T, ap, lft = params.tokens, params.alpha_ft, params.lam_ft
    xn = standard_normals(n, 2 * T, seed, purpose=purpose)
    cs, zeta = xn[:, :T], xn[:, T:]
    Zs, Zb = to_sym(z_star, T), params.beta * to_sym(z, T)
    outer = cs[:, :, None] * cs[:, None, :]
    Y = (Zs + outer - np.eye(T)) / T  # sigma(z* + chi* chi*^T - q0 I), q0 = 1

    def init(p, samples):
        lin = LinearRankOneProx(Zb - Zs - outer, cs, zeta)
        return {"lin": lin, "update": _linear_update(lin, ap, lft, T, "direct")}

    def update(x, c):
        new, aux = c["update"]({"m": x[0], "q": x[1], "v": x[2]})
        return np.array([new["m"], new["q"], new["v"]]), c, aux

    def objective(x, c):
        m, q, v = x
        chi = c["lin"].to_original(c["lin"](m, q, v)["y"])
        X = Zb - q * np.eye(T) + chi[:, :, None] * chi[:, None, :]
        per = ap * np.sum((X / T - Y) ** 2, axis=(1, 2)) + lft * q
        return float(per.mean()), per

    return Stage(
        init=init,
        update=update,
        objective=objective,
        names=("m", "q", "v"),
        name="fine-tuning (linear)",
        domain=lambda x: bool(x[2] > 0 and x[1] > 0 and x[0] ** 2 <= x[1]),
    )


@pytest.mark.parametrize("lam_ft, Q", [(0.5, 2.0), (0.05, 2.0)])
def test_real_stage_finetune_linear_reaches_solve_finetune_fixed_point_and_rejects_the_uninformed_branch(lam_ft, Q):
    from hdlora import Params
    from hdlora.theory.finetune import _default_init, solve_finetune
    from hdlora.theory.sampling import frozen_fields

    T, n, Q0, M = 3, 4000, 1.0, 0.8
    p = Params(tokens=T, noise=0.5, alpha_ft=3.0, lam_ft=lam_ft, activation="linear")
    f = frozen_fields(n, T, Q0 + p.noise / 2, Q, M, seed=1)
    ref = solve_finetune(p, f["z_star"], f["z"], Q0=Q0, Q=Q, M=M, seed=2, tol=1e-10, max_iter=2000)
    assert ref.converged
    st = finetune_linear_stage(p, f["z_star"], f["z"], 2, n)
    d0 = _default_init(p)
    r = solve_stage(st, {"informed": [d0["m"], d0["q"], d0["v"]], "uninformed": [1e-3, 0.5, d0["v"]]}, tol=1e-10)
    inf, uni = r.branches["informed"], r.branches["uninformed"]
    assert inf.status == CONVERGED and inf.residual <= 1e-10
    for i, k in enumerate("mqv"):
        assert inf.x[i] == pytest.approx(ref.state[k], abs=1e-9)
    # the objective is alpha' L'_train + lam' q at the fixed point (solve_finetune's train error)
    assert inf.objective == pytest.approx(p.alpha_ft * ref.finetune_train_error + lam_ft * ref.q, rel=1e-9)
    # on these samples the uninformed start converges to the m ~ 0 fixed point of the sampled map (at n = 2000 it
    # reaches the mirror branch m < 0 instead), clearly higher: not chosen
    assert uni.status == CONVERGED and abs(uni.x[0]) < 0.05
    assert r.chosen == "informed" and not r.undecided
    (c,) = r.comparisons
    assert c.other == "uninformed" and c.verdict == "higher" and c.diff > 10 * c.se


def test_a_failed_start_is_recorded_and_flagged_but_does_not_stop_the_solve():
    # F(x) = x^2: damped iteration from 0.5 reaches 0; from 3 it blows up (no fixed point reachable)
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
        warnings.simplefilter("error", NonConvergenceWarning)  # no warning: the answer converged
        warnings.simplefilter("error", BranchChoiceWarning)
        r = solve_stage(map_stage(lambda x: x * x), {"a": [0.5], "b": [3.0]}, anderson=0, tol=1e-12)
    assert r.chosen == "a" and r.status == CONVERGED and r.x[0] == pytest.approx(0.0, abs=1e-12)
    b = r.branches["b"]
    assert b.status == NOT_CONVERGED and "non-finite" in b.reason
    assert b.residual == residual(b.x * b.x, b.x)  # the best point evaluated, residual measured there
    assert any(f.startswith("not converged: branch 'b'") for f in r.flags)


def test_real_stage_finetune_from_m0_recovers_acceleration_after_a_transient_stagnation():
    # measured: from m = 0 (n = 2000) the iteration stagnates while m leaves 0, falls back to damped iteration at
    # mixing 0.02, and without re-enabling Anderson stopped at residual 2.4e-5 after 500 iterations (on the
    # default_rng(2) rank-one normals of that measurement, not the named stream solve_finetune draws now)
    from hdlora import Params
    from hdlora.theory.finetune import _default_init
    from hdlora.theory.sampling import frozen_fields

    T, n, Q0, M, Q = 3, 2000, 1.0, 0.8, 2.0
    p = Params(tokens=T, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation="linear")
    f = frozen_fields(n, T, Q0 + p.noise / 2, Q, M, seed=1)
    st = finetune_linear_stage(p, f["z_star"], f["z"], 2, n, purpose=None)
    r = solve_stage(st, {"m0": [0.0, 0.5, _default_init(p)["v"]]}, tol=1e-10, max_iter=500)
    ev = [e for _, e in r.branch.events]
    assert r.status == CONVERGED and r.residual <= 1e-10
    assert any("fallback" in e for e in ev) and any("Anderson re-enabled" in e for e in ev)


def test_stagnation_calls_verify_and_a_changed_map_resets_the_history():
    """A map the iteration cannot settle on (here: steps of +-0.1 that never shrink, as when samples are tracked in
    non-global prox maxima) is a candidate too: on stagnation the engine calls verify, whose change of the map
    (here: to the contraction 0.5 x + 1) resets the history; without it the start is not converged."""

    def update(x, c):
        if c["good"]:
            return 0.5 * x + 1.0, c, None
        step = 0.1 if int(math.floor(10.0 * x[0])) % 2 == 0 else -0.1
        return x + step, c, None

    def verify(x, c):
        return ({"good": True}, True) if not c["good"] else (c, False)

    st = Stage(init=lambda p, s: {"good": False}, update=update, verify=verify, names=("x",))
    r = solve_stage(st, {"s": [0.05]}, tol=1e-10, max_iter=200, warn=False)
    assert r.status == CONVERGED and r.x[0] == pytest.approx(2.0, abs=1e-9)
    assert any("stagnation: verify changed the map" in e for _, e in r.branch.events)
    r0 = solve_stage(st, {"s": [0.05]}, tol=1e-10, max_iter=200, stall_verify=0, warn=False)
    assert r0.status == NOT_CONVERGED


def _jump_map(jump):
    """A map with a jump at its would-be fixed point 1 (samples switching between two maxima): no exact fixed point."""
    return lambda x: 0.5 * x + 0.5 + np.where(x >= 1.0, -jump, jump)


def test_stop_early_ends_a_stagnation_the_monte_carlo_floor_explains():
    jump = 1e-4
    explain = lambda *a: MCResolution(floor=4 * jump, evidence={"jump": jump})  # noqa: E731
    full = solve_stage(map_stage(_jump_map(jump), mc_resolution=explain), {"u": [3.0]}, tol=1e-10, max_iter=300)
    early = solve_stage(
        map_stage(_jump_map(jump), mc_resolution=explain), {"u": [3.0]}, tol=1e-10, max_iter=300, stop_early=True
    )
    assert full.status == early.status == CONVERGED_MC
    assert full.branch.iterations == 300 and early.branch.iterations < 60  # stopped at the first stagnation
    assert early.residual <= 4 * jump and early.branch.mc.evidence["jump"] == jump
    assert abs(early.x[0] - 1.0) <= 4 * jump
    assert any("stagnation within the Monte-Carlo floor" in e for _, e in early.branch.events)


@pytest.mark.parametrize("jump, floor", [(1e-4, 1e-9), (1e-2, 4e-2)])
def test_stop_early_does_not_stop_a_stagnation_the_floor_does_not_explain_or_above_the_cap(jump, floor):
    # a floor below the residual, or a residual above CONVERGED_CAP (1e-3) however large the floor: the iteration goes on
    st = map_stage(_jump_map(jump), mc_resolution=lambda *a: MCResolution(floor))
    r = solve_stage(st, {"u": [3.0]}, tol=1e-10, max_iter=150, stop_early=True, warn=False)
    assert r.branch.iterations == 150
    assert not any("stopped" in e for _, e in r.branch.events)


def _cycling_stage(targets):
    """verify moves the map's target along ``targets`` at each candidate (then keeps it): like a global prox search that
    moves samples to other maxima at every candidate fixed point."""

    def update(x, c):
        return 0.5 * x + 0.5 * targets[c["k"]], c, None

    def verify(x, c):
        return ({"k": c["k"] + 1}, True) if c["k"] + 1 < len(targets) else (c, False)

    return Stage(init=lambda p, s: {"k": 0}, update=update, verify=verify, names=("x",))


def test_stop_early_ends_map_cycles_without_progress_as_not_converged():
    targets = [1.0 + 0.1 * (k % 2) for k in range(40)]  # the new map's residual at each candidate stays 0.025
    full = solve_stage(_cycling_stage(targets), {"u": [0.0]}, tol=1e-10, max_iter=2000, warn=False)
    early = solve_stage(_cycling_stage(targets), {"u": [0.0]}, tol=1e-10, max_iter=2000, stop_early=True, warn=False)
    assert full.status == CONVERGED and full.x[0] == pytest.approx(targets[-1], abs=1e-9)  # after 39 map changes
    assert early.status == NOT_CONVERGED
    n_changes = sum("verify changed the map" in e for _, e in early.branch.events)
    assert n_changes == 6  # CYCLE_MIN candidates, then the rule
    assert "changed the map at 6 candidate fixed points without progress" in early.branch.reason
    assert early.branch.iterations < full.branch.iterations / 4


def test_stop_early_lets_map_cycles_that_make_progress_converge():
    targets = [1.0 + 0.1 * 0.2**k for k in range(12)]  # the new map's residual at each candidate falls 5x per change
    r = solve_stage(_cycling_stage(targets), {"u": [0.0]}, tol=1e-10, max_iter=2000, stop_early=True, warn=False)
    assert r.status == CONVERGED and r.x[0] == pytest.approx(targets[-1], abs=1e-9)
    assert sum("verify changed the map" in e for _, e in r.branch.events) == 11
