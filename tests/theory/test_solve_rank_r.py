"""The rank-r point (src/hdlora/theory/solve_rank_r.py): dispatch from solve(params), the r = r* = 1 reduction through
the generic path, the branches by rank(m), sweeps and the CLI's one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hdlora import cli
from hdlora.params import Params
from hdlora.theory import solve
from hdlora.theory import solve_rank_r as sr
from hdlora.theory.finetune_rank_r import RankRResult


def test_rank_one_through_the_generic_path_reproduces_solve():
    """r = r* = 1, q0 = 1 through solve_rank_r (every branch, winner) against today's solve(params), both at
    tol = 1e-11 (linear: closed-form pre-training and errors; fine-tuning prox: exact secular vs kernel Newton)."""
    p = Params(activation="linear")
    a = solve(p, n_mc=400, tol=1e-11, max_iter=3000, warn=False)
    b = sr.solve_rank_r(p, n_mc=400, tol=1e-11, max_iter=3000, warn=False)
    assert a.converged and b.converged and b.winner_status == "converged_stable"
    for k in ("q", "m", "v", "finetune_test_error", "finetune_train_error", "forgetting_error", "overlap"):
        assert abs(getattr(a, k) - getattr(b, k)) < 1e-8, (k, getattr(a, k), getattr(b, k))
    assert abs(a.replicon_finetune - b.replicon_finetune) < 1e-8
    assert b.prox_uncertified == 0  # at r = 1 the certificate (R.16) is the trust-region condition: always met
    for k in ("Q", "M", "V", "pretrain_test_error", "delta_eff"):
        assert getattr(a, k) == getattr(b, k)  # the pre-training stage is the same code


@pytest.mark.slow
def test_rank_one_through_the_generic_path_reproduces_solve_softmax():
    p = Params(activation="softmax")
    a = solve(p, n_mc=300, tol=1e-10, max_iter=3000, warn=False)
    b = sr.solve_rank_r(p, n_mc=300, tol=1e-10, max_iter=3000, warn=False)
    assert a.converged and b.converged
    for k in ("q", "m", "v", "finetune_test_error", "finetune_train_error", "forgetting_error", "replicon_finetune"):
        assert abs(getattr(a, k) - getattr(b, k)) < 1e-8, (k, getattr(a, k), getattr(b, k))


def test_rank_one_params_take_the_rank_one_path():
    r = solve(Params(activation="linear", lora_rank=1, teacher_rank=1), n_mc=200, warn=False)
    assert type(r).__name__ == "TheoryResult"
    r2 = solve(Params(activation="linear", lora_rank=1, teacher_rank=1, teacher_strengths=(0.5,)), n_mc=200, warn=False)
    assert isinstance(r2, sr.RankRTheoryResult)


def test_branch_starts():
    q0 = np.diag([1.0, 0.25, 0.5])
    st = sr.branch_starts(3, q0, 0.5, 3.0, 3, seed=0)
    assert list(st) == ["m0", "rank1", "rank2", "full"]
    for name, s in st.items():
        m, q = s["m"], s["q"]
        S = q - m @ np.linalg.inv(q0) @ m.T
        assert np.linalg.eigvalsh(S).min() > 0, name  # a valid covariance (strictly: S^{1/2} has a derivative)
    sv = {k: np.linalg.svd(s["m"], compute_uv=False) for k, s in st.items()}
    assert sv["m0"].max() < 0.1
    assert (sv["rank1"] > 0.1).sum() == 1 and (sv["rank2"] > 0.1).sum() == 2 and (sv["full"] > 0.1).sum() == 3
    # rank1 picks the strongest teacher direction (column 0), rank2 the two strongest (0 and 2)
    assert np.abs(st["rank1"]["m"][0, 0]) > 0.4 and np.abs(st["rank2"]["m"][1, 2]) > 0.3


def _fake(objective, converged=True, replicon=0.5) -> RankRResult:
    return RankRResult(
        r=1, r_star=1, q=[[1.0]], m=[[0.5]], v=[[0.1]], q0=[[1.0]], qhat=[[1.0]], mhat=[[1.0]], vhat=[[1.0]],
        tr_q=1.0, m_fro=0.5, overlap=0.5, eig_q=[1.0], sv_m=[0.5], principal_cosines=[0.5], rank_m=1,
        finetune_test_error=1.0, finetune_train_error=1.0, forgetting_error=1.0, objective=objective,
        replicon_finetune=replicon, delta_eff=1.0, converged=converged, residual=0.0, iterations=1, n_mc=1,
        prox_failed=0, prox_not_max=0, prox_uncertified=None,
    )  # fmt: skip


def test_same_branch():
    a = _fake(1.0)
    assert sr.same_branch(a, _fake(1.2))  # same invariants, other objective: the same fixed point
    b = RankRResult(**{**a.__dict__, "eig_q": [1.2], "history": ()})
    assert not sr.same_branch(a, b)
    c = RankRResult(**{**a.__dict__, "rank_m": 0, "history": ()})
    assert not sr.same_branch(a, c)


@pytest.mark.slow
def test_coarse_to_fine_branches():
    """n_mc = 16000 (coarse stage on 1000 samples): the coinciding branches are merged into the first, which is
    refined on all samples, and the winner is a refined branch."""
    p = Params(activation="linear", lora_rank=2, teacher_rank=2)
    r = solve(p, n_mc=16000, warn=False)
    merged = [b for b in r.branches if b["status"].startswith("merged into")]
    refined = [b for b in r.branches if "objective" in b]
    assert refined and all(b["coarse"]["n_mc"] == 1000 for b in r.branches)
    assert {b["coarse"]["merged_into"] for b in merged} <= {b["name"] for b in refined}
    assert r.winner in {b["name"] for b in refined} and r.converged


def test_pick_winner_never_lets_an_unconverged_or_unstable_branch_win_silently():
    assert sr.pick_winner({"a": _fake(2.0), "b": _fake(1.0, converged=False), "c": _fake(1.5)}) == (
        "c",
        "converged_stable",
    )
    assert sr.pick_winner({"a": _fake(2.0, replicon=1.5), "b": _fake(1.0, replicon=3.0)}) == ("b", "converged_unstable")
    assert sr.pick_winner({"a": _fake(2.0, replicon=0.2), "b": _fake(1.0, replicon=3.0)}) == ("a", "converged_stable")
    assert sr.pick_winner({"a": _fake(2.0, converged=False), "b": None}) == ("a", "unconverged")
    with pytest.raises(FloatingPointError):
        sr.pick_winner({"a": None})


def test_branches_rank_two_task_unequal_strengths():
    """(r, r*) = (1, 2), strengths 1, 0.5, linear sigma: every branch is reported with its objective, replicon,
    status and rank(m); the winner is the lowest objective among the converged stable ones; the adapter's one
    direction is (mostly) the strongest teacher direction."""
    p = Params(activation="linear", lora_rank=1, teacher_rank=2, teacher_strengths=(1.0, 0.5))
    r = solve(p, n_mc=600, warn=False)
    names = [b["name"] for b in r.branches]
    assert names == ["m0", "full"]
    for b in r.branches:
        assert {"objective", "replicon", "status", "rank_m", "converged", "replica_stable"} <= set(b)
    ok = [b for b in r.branches if b["converged"] and b["replica_stable"]]
    assert ok and r.winner == min(ok, key=lambda b: b["objective"])["name"]
    assert r.winner_status == "converged_stable"
    assert r.objective == min(b["objective"] for b in ok)
    assert r.lora_rank == 1 and r.teacher_rank == 2 and np.shape(r.m_matrix) == (1, 2)
    m = np.asarray(r.m_matrix)[0]
    assert abs(m[0]) > 3 * abs(m[1])  # m = w^T w* / D: the strong column (q0 = 1) dominates
    assert r.q == pytest.approx(np.trace(r.q_matrix)) and r.m == pytest.approx(np.linalg.norm(r.m_matrix))
    assert r.overlap == pytest.approx(r.m / math.sqrt(np.linalg.norm(r.q_matrix) * np.linalg.norm(r.q0_matrix)))
    assert len(r.principal_cosines) == 1 and 0 < r.principal_cosines[0] <= 1
    assert r.prox_uncertified is not None  # linear sigma: certificates counted


def test_rank_r_e1_runs_with_the_train_law():
    p = Params(activation="linear", lora_rank=2, teacher_rank=2, reuse=True)
    r = solve(p, n_mc=400, warn=False)
    assert r.params["reuse"] is True and math.isfinite(r.finetune_test_error) and r.winner


def test_sweep_accepts_rank_parameters_and_stores_the_rank_r_keys(tmp_path):
    from hdlora.experiments.executor import SerialExecutor
    from hdlora.experiments.store import Store
    from hdlora.experiments.sweep import parse_sweep, run_sweep

    doc = {
        "sweep": {"database": str(tmp_path / "db.sqlite")},
        "params": {"activation": "linear", "teacher_rank": 2, "teacher_strengths": [1.0, 0.5]},
        "axes": {"lora_rank": [1, 2]},
        "run": {"theory": {"n_mc": 300}},
    }
    spec = parse_sweep(doc)
    rep = run_sweep(spec, executor=SerialExecutor(), progress=False)
    assert rep.n_failed == 0
    with Store(spec.database) as st:
        rows = {r.params["lora_rank"]: r.result for r in st.rows()}
    assert set(rows) == {1, 2}
    for r, res in rows.items():
        assert res["lora_rank"] == r and res["teacher_rank"] == 2
        assert np.shape(res["m_matrix"]) == (r, 2) and len(res["q_eigenvalues"]) == r and res["branches"]


def test_cli_json_has_the_rank_r_keys(capsys):
    import json

    argv = ["theory", "--activation", "linear", "--lora-rank", "2", "--teacher-rank", "2"]
    assert cli.main([*argv, "--teacher-strengths", "1,0.5", "--n-mc", "300", "--json", "-q"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("q_eigenvalues", "m_singular_values", "principal_cosines", "q_matrix", "m_matrix", "v_matrix"):
        assert k in d, k
    assert d["q"] == pytest.approx(sum(d["q_eigenvalues"])) and d["m"] == pytest.approx(np.linalg.norm(d["m_matrix"]))
    assert d["params"]["teacher_strengths"] == [1.0, 0.5] and d["q0_matrix"] == [[1.0, 0.0], [0.0, 0.25]]
    for k in ("converged", "finetune_residual", "finetune_iterations", "replicon_finetune", "branches", "winner"):
        assert k in d, k


@pytest.mark.parametrize(
    "args,words",
    [
        (["--lora-rank", "0"], ["lora_rank", "[1, 64]"]),
        (["--teacher-rank", "0"], ["teacher_rank", "[1, 64]"]),
        (["--lora-rank", "1.5"], ["--lora-rank", "integer"]),
        (["--teacher-rank", "nan"], ["--teacher-rank", "integer"]),
        (["--lora-rank", "22"], ["lora_rank * tokens", "64", "--lora-rank"]),
        (["--teacher-rank", "2", "--teacher-strengths", "1"], ["teacher_strengths", "2"]),
        (["--teacher-strengths", "1,x"], ["--teacher-strengths"]),
        (["--lora-rank", "2", "--baseline", "frozen"], ["frozen"]),
        (["--lora-rank", "2", "--bayes-optimal"], ["--bayes-optimal"]),
    ],
)
def test_cli_bad_ranks_one_line_exit_2(args, words, capsys):
    assert cli.main(["theory", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])


def test_memory_estimate_counts_the_rank_r_prox():
    from hdlora.resources import theory_estimate

    one = theory_estimate(Params(), 30000)
    four = theory_estimate(Params(lora_rank=4, teacher_rank=4), 30000)
    assert "rank-r prox" in " ".join(four.parts) and "rank-r prox" not in " ".join(one.parts)
    assert four.bytes > one.bytes and four.seconds > one.seconds
