"""hdlora.theory.solve / `hdlora theory`: the chained pre-training + fine-tuning point."""

import dataclasses
import json
import math

import pytest

from hdlora import Params
from hdlora.cli import main
from hdlora.theory import effective as eff
from hdlora.theory import solve

LIN = Params(activation="linear", alpha=0.1, alpha_ft=3, tokens=3, noise=0.5, lam=0.1, lam_ft=0.5)
N = 3000  # small Monte-Carlo budget: these tests check wiring and identities, not accuracy

REQUIRED = (
    "Q",
    "M",
    "V",
    "q",
    "m",
    "v",
    "pretrain_train_error",
    "pretrain_test_error",
    "finetune_train_error",
    "finetune_test_error",
    "forgetting_error",
    "overlap",
    "delta_eff",
    "replicon_pretrain",
    "replicon_finetune",
    "converged",
    "iterations",
    "wall_time",
)


@pytest.fixture(scope="module")
def lin():
    return solve(LIN, n_mc=N)


def test_result_has_every_key_and_is_consistent(lin):
    d = lin.to_dict()
    for k in REQUIRED:
        assert k in d, k
    assert lin.converged and lin.pretrain_converged and lin.finetune_converged
    assert lin.overlap == pytest.approx(lin.m / math.sqrt(lin.q))  # o_w = m / sqrt(q q0), q0 = 1
    assert lin.delta_eff == pytest.approx(LIN.noise / 2 + LIN.Q0 + lin.Q - 2 * lin.M)  # eq. 25
    assert lin.delta_eff_actft <= lin.delta_eff + 1e-12  # eq. 28 <= eq. 25
    with pytest.raises(Exception):
        lin.q = 0.0  # frozen result


def test_warm_start_reaches_same_point_in_fewer_iterations(lin):
    again = solve(LIN, n_mc=N, init=lin)
    assert again.iterations < lin.iterations
    for k in ("Q", "M", "q", "m"):
        assert getattr(again, k) == pytest.approx(getattr(lin, k), rel=1e-5, abs=1e-7)


def test_baselines_are_the_special_parameters(lin):
    fz = solve(LIN, n_mc=N, baseline="frozen")
    assert fz.q == 0 and fz.m == 0 and fz.Q == pytest.approx(lin.Q, rel=1e-9)
    assert fz.finetune_test_error == pytest.approx(solve(LIN.replace(lam_ft=math.inf), n_mc=N).finetune_test_error)
    lo = solve(LIN, n_mc=N, baseline="lora-only")
    assert lo.Q == 0 and lo.M == 0 and lo.q > 0
    # LoRA improves over the frozen pre-training at this point (Fig. 1's claim)
    assert lin.finetune_test_error < fz.finetune_test_error


def test_optimal_beta_minimises_delta_eff(lin):
    rb = solve(LIN, n_mc=N, optimal_beta=True)
    assert rb.params["beta"] == pytest.approx(lin.M / lin.Q)
    assert rb.delta_eff == pytest.approx(eff.delta_eff_min(LIN.Q0, lin.Q, lin.M, LIN.noise))
    assert rb.delta_eff <= lin.delta_eff


def test_cli_json_has_every_key(capsys):
    rc = main(["theory", "--activation", "linear", "--n-mc", str(N), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for k in REQUIRED:
        assert k in d, k


@pytest.mark.parametrize(
    "argv,word",
    [
        (["--kappa", "0.5"], "kappa"),
        (["--tokens", "1"], "tokens"),
        (["--noise", "-1"], "noise"),
        (["--activation", "tanh"], "activation"),
        (["--n-mc", "5"], "n-mc"),
        (["--lam", "nan"], "lam"),
    ],
)
def test_cli_bad_input_is_one_line_error(argv, word, capsys):
    assert main(["theory", *argv]) == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err


def test_status_names_the_engine_status():
    from hdlora.theory.engine import CONVERGED, NOT_CONVERGED, REPLICA_UNSTABLE

    p = Params(activation="linear", alpha=0.1, alpha_ft=3, tokens=3, noise=0.5, lam=0.1, lam_ft=0.5)
    r = solve(p, n_mc=2000)
    assert r.status == CONVERGED and r.to_dict()["status"] == CONVERGED
    assert dataclasses.replace(r, replicon_ok=False).status == REPLICA_UNSTABLE
    assert dataclasses.replace(r, converged=False).status == NOT_CONVERGED


def test_replicons_reported_with_upper_bound_and_tail():
    """Both replicons (eqs. 75, 78) come with mean + 2 s.e. and the top-10 share of their per-sample terms."""
    from hdlora import Params
    from hdlora.theory import solve

    r = solve(Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5), n_mc=2000)
    for name in ("pretrain", "finetune"):
        mean, up, tail = (getattr(r, f"replicon_{name}{s}") for s in ("", "_upper", "_tail"))
        assert 0 < mean < up < 1.5 * mean, name
        assert 10 / 2000 <= tail < 1, name  # at least the share of 10 equal terms, below the whole sum
    d = r.to_dict()
    assert {"replicon_pretrain_upper", "replicon_finetune_tail", "finetune_objective", "status"} <= set(d)


@pytest.fixture
def searches(monkeypatch):
    """A list that gets one entry per global prox search of the fine-tuning (its start set is built once each)."""
    from hdlora.theory import finetune

    calls = []
    starts = finetune._rank_one_starts
    monkeypatch.setattr(finetune, "_rank_one_starts", lambda *a, **k: calls.append(1) or starts(*a, **k))
    return calls


def _options(n):
    """solve's options at n samples (seed 0, its default tol and max_iter, no warnings)."""
    from hdlora.theory.solve import StageOptions

    return StageOptions(n_mc=n, seed=0, tol=1e-7, max_iter=500, method=None, optimal_beta=False, warn=False)


def _stage_args(p, n):
    """The fine-tuning stage's fields and law at p (solve's pre-training stage, n samples)."""
    from hdlora.theory.solve import pretrain_stage

    p, pre, _, zs, z = pretrain_stage(p, _options(n), None)
    return p, zs, z, dict(Q0=p.Q0, Q=pre.Q, M=pre.M)


def test_first_prox_search_of_a_warm_start_is_skipped_only_where_a_search_found_one_maximum(searches):
    """solve's coarse start: the main solve skips the fine-tuning's first global prox search when the coarse solve's
    final search found no second maximum (the search at the fixed point is kept: same fixed point, bit for bit, at
    such a point), and keeps it where the coarse search found second maxima."""
    from hdlora.theory.finetune import solve_finetune
    from hdlora.theory.solve import _coarse_state

    fig1 = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
    p, zs, z, law = _stage_args(fig1, N)
    cold = solve_finetune(p, zs, z, **law, seed=0, warn=False)
    assert cold.converged and cold.n_second_maxima == 0
    start = {"m": cold.m * 1.01, "q": cold.q * 0.99, "v": cold.v}
    searches.clear()
    with_search = solve_finetune(p, zs, z, **law, seed=0, init=start, warn=False)
    n_with = len(searches)
    without = solve_finetune(p, zs, z, **law, seed=0, init=start, first_search=False, warn=False)
    assert len(searches) - n_with == n_with - 1  # the first iteration's search, and only it, left out
    assert (without.q, without.m, without.v) == (with_search.q, with_search.m, with_search.v)
    assert without.finetune_test_error == with_search.finetune_test_error
    assert _coarse_state(fig1, None, _options(1000))[1] is False

    # T = 2, lam' = 0.05 (a validation point): the coarse search finds second prox maxima
    t2 = Params(tokens=2, kappa0=0.5, kappa=1, noise=0.5, alpha=0.2, alpha_ft=3, lam=2.0, lam_ft=0.05)
    p2, zs2, z2, law2 = _stage_args(t2, 3750)
    assert solve_finetune(p2, zs2, z2, **law2, seed=0, tol=1e-4, warn=False).n_second_maxima > 0
    state, first_search = _coarse_state(t2, None, _options(3750))
    assert state is not None and first_search is True


def test_warm_start_without_second_maxima_skips_the_first_search_and_keeps_the_point(searches):
    """A warm start from a result whose final prox search found no second maximum (finetune_second_maxima == 0)
    searches only at the fixed point; the point is the one the search at the first iteration gives, bit for bit."""
    fig1 = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
    near = solve(fig1.replace(lam=0.12), n_mc=N, warn=False)
    assert near.finetune_second_maxima == 0
    searches.clear()
    skipped = solve(fig1, n_mc=N, init=near, warn=False)
    n_skipped = len(searches)
    searched = solve(fig1, n_mc=N, init=near.state, warn=False)  # the state alone: no hint, first search
    assert len(searches) - n_skipped == n_skipped + 1
    for key in ("Q", "M", "V", "q", "m", "v", "finetune_test_error", "forgetting_error"):
        assert getattr(skipped, key) == getattr(searched, key), key
    hinted = solve(fig1, n_mc=N, init={**near.state, "finetune_second_maxima": 0}, warn=False)
    assert hinted.q == skipped.q and len(searches) == 2 * n_skipped + 2
