"""Active fine-tuning (Algorithm 1) and recalibration (eq. 26) in the simulator: identities.

Theory-vs-simulation comparisons are in test_applications_theory_vs_sim.py.
"""

import json
import math

import pytest
import torch

from hdlora import ParamError, Params, activations, cli
from hdlora.data import (
    DTYPE,
    Effective,
    draw_noise,
    draw_teacher,
    draw_tokens,
    effective_fields,
    generator,
    quadratic_field,
)
from hdlora.simulate import ACTIVE_KEYS, EFFECTIVE_NAN_KEYS, KEYS, run, run_seed, theory_beta_star
from hdlora.simulate.active import (
    delta_eff_measured,
    effective_pool,
    full_pool,
    select_lowest,
    select_lowest_stream,
    selection_score,
)

SOFTMAX = activations.get("softmax")
EFF = {"Q0": 2.0, "Q": 2.0, "M": 1.0}
P_EFF = Params(alpha=0.1, alpha_ft=3, tokens=3, noise=0.0, lam=0.1, lam_ft=0.5, active_pool=15.0)
P_FULL = Params(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5, active_pool=12.0)


# ----------------------------------------------------------------------------- selection
def test_score_is_zero_at_zero_and_row_shift_invariant_for_softmax():
    z = torch.zeros(2, 3, 3, dtype=DTYPE)
    assert torch.all(selection_score(z, SOFTMAX) == 0)
    # softmax is invariant to z -> z + c 1 1^T: such z are scored as sigma(0) (the one free direction)
    z[1] = 5.0
    assert float(selection_score(z, SOFTMAX)[1]) < 1e-28
    lin = activations.get("linear")
    assert float(selection_score(z, lin)[1]) == pytest.approx(9 * 25 / 9)


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_stream_selection_equals_direct_selection(chunk):
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(403, generator=g, dtype=DTYPE)
    scores[100:140] = 0.25  # ties: broken by pool index in both paths
    payload = torch.arange(403)

    def chunks():
        for s in range(0, 403, chunk):
            yield scores[s : s + chunk], {"id": payload[s : s + chunk]}

    idx, sc, pl, n, total = select_lowest_stream(chunks(), 120)
    direct = select_lowest(scores, 120)
    assert torch.equal(idx, direct) and torch.equal(pl["id"], direct) and torch.equal(sc, scores[direct])
    assert n == 403 and total == pytest.approx(float(scores.sum()))
    # they are the lowest: every kept score <= every dropped score
    mask = torch.ones(403, dtype=torch.bool)
    mask[idx] = False
    assert float(sc.max()) <= float(scores[mask].min())


def test_selection_bad_sizes():
    with pytest.raises(ParamError, match="n_keep"):
        select_lowest(torch.zeros(5, dtype=DTYPE), 6)
    with pytest.raises(ParamError, match="N'"):
        effective_pool(10, 11, 3, Effective(2, 2, 1), 0.0, 1.0, SOFTMAX, draw_teacher(8, 0, 0), 0)


def test_effective_pool_equals_direct_path_and_selects_lowest():
    """Chunked pool (running top-N') == holding the whole pool and sorting, on a small case; the
    uniform set is the first N' of the same pool."""
    T, n_pool, n_keep, beta, chunk = 3, 900, 90, 0.7, 128
    eff, teacher = Effective(2.0, 2.0, 1.0), draw_teacher(16, 0, 5)
    sel = effective_pool(n_pool, n_keep, T, eff, 0.3, beta, SOFTMAX, teacher, seed=5, chunk=chunk)
    g = generator(5, "pool")
    zs, z = zip(*(effective_fields(min(chunk, n_pool - s), T, eff, 0.3, g) for s in range(0, n_pool, chunk)))
    zs, z = torch.cat(zs), beta * torch.cat(z)
    scores = selection_score(z, SOFTMAX)
    direct = select_lowest(scores, n_keep)
    assert torch.equal(sel.index, direct)
    assert torch.equal(sel.active.z_frozen, z[direct]) and torch.equal(sel.active_z_star, zs[direct])
    assert torch.equal(sel.uniform.z_frozen, z[:n_keep]) and torch.equal(sel.uniform_z_star, zs[:n_keep])
    assert sel.score_pool_mean == pytest.approx(float(scores.mean()))
    assert float(sel.scores.max()) <= float(torch.sort(scores).values[n_keep])
    # same tokens for both sets (common random numbers), targets built from each set's z*
    assert torch.equal(sel.active.X, sel.uniform.X)
    chi = sel.active.X @ teacher.w_star / math.sqrt(16)
    target = zs[direct] + chi[:, :, None] * chi[:, None, :] - torch.eye(T, dtype=DTYPE) * teacher.q0
    assert torch.allclose(sel.active.z_star, target, atol=1e-12)


def test_full_pool_equals_direct_path():
    T, D, n_pool, n_keep, beta, chunk = 3, 12, 300, 40, 1.3, 64
    teacher = draw_teacher(D, D, 2)
    W = torch.randn(D, D, generator=generator(9, "pretrain_init"), dtype=DTYPE)
    sel = full_pool(n_pool, n_keep, T, 0.5, beta, SOFTMAX, teacher, W, seed=2, chunk=chunk)
    g = generator(2, "pool")
    Xs, xis = [], []
    for s in range(0, n_pool, chunk):
        c = min(chunk, n_pool - s)
        Xs.append(draw_tokens(c, T, D, g, "cpu"))
        xis.append(draw_noise(c, T, 0.5, g, "cpu"))
    X, xi = torch.cat(Xs), torch.cat(xis)
    z = beta * quadratic_field(X, W, float((W * W).sum()) / math.sqrt(D))
    direct = select_lowest(selection_score(z, SOFTMAX), n_keep)
    assert torch.equal(sel.index, direct) and torch.equal(sel.active.X, X[direct])
    assert torch.allclose(sel.active.z_frozen, z[direct], atol=1e-13)
    assert torch.equal(sel.uniform.X, X[:n_keep]) and torch.equal(sel.uniform.xi, xi[:n_keep])
    z_star = quadratic_field(X, teacher.W_star, teacher.trace_S_star) + xi
    assert torch.allclose(sel.active_z_star, z_star[direct], atol=1e-12)


def test_selected_set_has_smaller_frozen_fields_and_effective_noise():
    """Linear sigma: the score is ||z||_F^2 / T^2, so Algorithm 1 keeps the rho-quantile of ||z||.
    With z = sqrt(Q) zeta1, z* = (M/sqrt(Q)) zeta1 + sqrt(Delta_eff,ActFT) zeta2 (eq. 104), zeta2
    independent of the selection, the per-entry second moment of z - z* on the selected set is
    exactly (1 - M/Q)^2 m2(z) + Delta_eff,ActFT in law, m2(z) = mean of z_ab^2/(1 + delta_ab):
    eq. 28 is its m2 -> 0 limit.  z is NOT ~ 0 at rho = 0.01: in L = T(T+1)/2 = 6 dimensions the
    1% quantile of chi^2_6 is 0.87, so m2(z) ~ Q (3/4)(0.87)/6 ~ 0.2 (vs Q = 2 unselected)."""
    lin = activations.get("linear")
    eff = Effective(2.0, 2.0, 1.0)
    sel = effective_pool(200_000, 2000, 3, eff, 0.0, 1.0, lin, draw_teacher(8, 0, 0), seed=0)
    s = 1.0 + torch.eye(3, dtype=DTYPE)
    m2_sel = float((sel.active.z_frozen**2 / s).mean())
    m2_uni = float((sel.uniform.z_frozen**2 / s).mean())
    assert m2_uni == pytest.approx(2.0, abs=0.1) and m2_sel < 0.15 * m2_uni
    d_sel = delta_eff_measured(sel.active_z_star, sel.active.z_frozen)
    d_uni = delta_eff_measured(sel.uniform_z_star, sel.uniform.z_frozen)
    # eq. 25: 2 + 2 - 2 = 2; eq. 28: 2 - 1/2 = 1.5. s.e. of a per-entry second moment of
    # variance 1.5-2 over 2000 samples x 6 independent entries: ~ 2 sqrt(2/12000) ~ 0.025; 3.5 s.e.
    assert d_uni == pytest.approx(2.0, abs=0.09)
    assert d_sel == pytest.approx(0.25 * m2_sel + 1.5, abs=0.07)
    assert d_sel < d_uni


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def eff_run():
    return run_seed(P_EFF, 60, 0, effective=EFF, restarts=1)


def test_active_keys_and_paired_differences(eff_run):
    r = eff_run
    for k in KEYS + ACTIVE_KEYS:
        assert k in r and (math.isfinite(r[k]) or k in EFFECTIVE_NAN_KEYS), k
    assert r["pool_size"] == 900 and r["labelled_size"] == 180
    assert r["delta_finetune_test_error"] == r["uniform_finetune_test_error"] - r["finetune_test_error"]
    assert r["delta_overlap"] == r["overlap"] - r["uniform_overlap"]
    assert r["selection_score_selected"] < r["selection_score_pool"]
    assert r["delta_eff"] == pytest.approx(2.0) and r["delta_eff_actft"] == pytest.approx(1.5)
    assert r["delta_eff_measured"] < r["uniform_delta_eff_measured"]


def test_same_seed_same_numbers(eff_run):
    again = run_seed(P_EFF, 60, 0, effective=EFF, restarts=1)
    for k in KEYS + ACTIVE_KEYS:
        if k != "wall_time" and k not in EFFECTIVE_NAN_KEYS:
            assert again[k] == eff_run[k], k
    other = run_seed(P_EFF, 60, 1, effective=EFF, restarts=1)
    assert other["finetune_test_error"] != eff_run["finetune_test_error"]


@pytest.mark.parametrize("effective", [EFF, None])
def test_rho_one_selects_the_whole_pool(effective):
    """alpha_bar' = alpha': the labelled set is the whole pool, the same as the uniform set."""
    p = (P_EFF if effective else P_FULL).replace(active_pool=3.0)
    r = run_seed(p, 20, 0, effective=effective, restarts=1)
    assert r["finetune_test_error"] == r["uniform_finetune_test_error"]
    assert r["overlap"] == r["uniform_overlap"] and r["delta_finetune_test_error"] == 0.0


def test_full_pipeline_active_run():
    r = run_seed(P_FULL, 24, 0, restarts=1)
    for k in KEYS + ACTIVE_KEYS:
        assert math.isfinite(r[k]), k
    assert r["pool_size"] == 288 and r["labelled_size"] == 72
    assert r["delta_eff_actft"] <= r["delta_eff"] + 1e-12
    assert r["selection_score_selected"] < r["selection_score_pool"]


def test_no_uniform_comparison_gives_nan():
    r = run_seed(P_EFF, 30, 0, effective=EFF, restarts=1, compare_uniform=False)
    assert math.isnan(r["uniform_finetune_test_error"]) and math.isfinite(r["finetune_test_error"])


def test_run_averages_active_keys():
    res = run(P_EFF, 30, seeds=2, effective=EFF, restarts=1)
    d = res.to_dict()
    for k in ACTIVE_KEYS:
        assert k in d and f"{k}_se" in d, k
    vals = [r["delta_finetune_test_error"] for r in res.per_seed]
    assert d["delta_finetune_test_error"] == pytest.approx(sum(vals) / 2)
    assert d["delta_finetune_test_error_se"] == pytest.approx(abs(vals[0] - vals[1]) / 2)


def test_active_pool_bad_input():
    with pytest.raises(ParamError, match="active_pool"):
        P_EFF.replace(active_pool=2.0)
    with pytest.raises(ParamError, match="active_pool"):
        P_FULL.replace(reuse=True)


# ----------------------------------------------------------------------------- recalibration
def test_optimal_beta_measured_is_M_over_Q():
    base = Params(alpha=0.1, alpha_ft=3, tokens=3, noise=0.5, lam=0.1, lam_ft=0.5)
    r = run_seed(base, 24, 0, optimal_beta="measured", restarts=1)
    assert r["beta"] == pytest.approx(r["M"] / r["Q"], rel=1e-14)
    assert r["M_frozen"] == pytest.approx(r["M"] ** 2 / r["Q"]) and r["Q_frozen"] == pytest.approx(r["M_frozen"])
    # at beta* the effective noise is eq. 26's minimum, which is below Delta_eff(beta = 1)
    assert r["delta_eff"] == pytest.approx(0.25 + r["Q0"] - r["M"] ** 2 / r["Q"])
    r1 = run_seed(base, 24, 0, restarts=1)
    assert r1["beta"] == 1.0 and r1["delta_eff"] >= r["delta_eff"]
    assert r1["Q"] == r["Q"]  # same pre-training
    e = run_seed(base, 24, 0, optimal_beta="measured", effective={"Q0": 2, "Q": 4, "M": 1}, restarts=1)
    assert e["beta"] == 0.25


def test_optimal_beta_theory_is_state_evolution_M_over_Q():
    base = Params(alpha=0.1, alpha_ft=3, tokens=3, noise=0.5, lam=0.1, lam_ft=math.inf, activation="linear")
    b = theory_beta_star(base)
    from hdlora.theory.pretrain import solve_pretrain

    pre = solve_pretrain(base)
    assert b == pytest.approx(pre.M / pre.Q) and 0 < b
    res = run(base, 20, seeds=1, optimal_beta="theory")
    assert res.per_seed[0]["beta"] == pytest.approx(b) and res.meta["beta_theory"] == pytest.approx(b)


def test_optimal_beta_bad_input():
    with pytest.raises(ParamError, match="optimal_beta"):
        run_seed(P_EFF, 20, 0, optimal_beta="best")
    with pytest.raises(ParamError, match="optimal_beta"):
        run_seed(P_EFF.replace(lam=math.inf, active_pool=None), 20, 0, optimal_beta="measured")


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def only_simulate(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"simulate": cli.COMMANDS["simulate"]})
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


BASE = [
    "simulate",
    "--alpha",
    "0.1",
    "--alpha-ft",
    "3",
    "--tokens",
    "3",
    "--noise",
    "0.5",
    "--lam",
    "0.1",
    "--lam-ft",
    "0.5",
    "--dim",
    "20",
    "--seeds",
    "2",
    "--restarts",
    "1",
    "--json",
]


def test_cli_active_pool_and_optimal_beta(only_simulate, capsys):
    assert cli.main(BASE + ["--active-pool", "9", "--beta", "optimal"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ACTIVE_KEYS:
        assert k in d and f"{k}_se" in d, k
    assert d["params"]["active_pool"] == 9.0 and d["optimal_beta"] == "measured"
    for s in d["per_seed"]:
        assert s["beta"] == pytest.approx(s["M"] / s["Q"])


@pytest.mark.parametrize(
    "extra,word",
    [
        (["--active-pool", "2"], "active_pool"),
        (["--active-pool", "5", "--reuse"], "active_pool"),
        (["--beta", "best"], "beta"),
        (["--beta", "optimal", "--lam", "inf"], "optimal_beta"),
    ],
)
def test_cli_bad_input(only_simulate, extra, word, capsys):
    try:
        code = cli.main(BASE + extra)
    except SystemExit as exc:  # argparse rejects a non-number --beta itself
        code = exc.code
    assert code == 2
    assert word in capsys.readouterr().err
