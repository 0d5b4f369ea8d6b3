"""The rank-r LoRA simulator (issue 11, beyond the paper): teacher draws, the fine-tuning objective
and its gradient, the starts, the invariants, rank one bit for bit, the CLI and sweep inputs."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from hdlora import Params, activations, cli
from hdlora.data import draw_teacher, generator, lora_field, rank_one_field
from hdlora.resources import simulate_estimate
from hdlora.simulate import VECTOR_KEYS, run, run_seed
from hdlora.simulate.finetune import canonical_gauge, finetune_loss_sum, finetune_value_and_grad, starts
from hdlora.simulate.metrics import rank_one_parameters, rank_r_parameters

REFERENCE = Path(__file__).parent / "data" / "rank_one_reference.json"
SMALL = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
F64 = torch.float64


def _rand(*shape, seed=0, stream="pretrain_init"):
    return torch.randn(*shape, generator=generator(seed, stream), dtype=F64)


# ----------------------------------------------------------------------------- rank one, bit for bit
def _same(old, new, where=""):
    """Exact equality of a reference value (JSON) and a new one; non-finite floats stored as repr."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for k, v in old.items():
            assert k in new, f"{where}{k} missing"
            _same(v, new[k], f"{where}{k}.")
    elif isinstance(old, str) and old in ("nan", "inf", "-inf"):
        assert isinstance(new, float) and repr(new) == old, (where, old, new)
    else:
        assert old == new, (where, old, new)


def test_rank_one_numbers_bit_identical_to_the_paper_code_path():
    """r = r* = 1, s = 1, Gaussian: every key of every case equals the numbers recorded before the rank-r
    change (tests/simulate/data/make_rank_one_reference.py run on commit dfcdafa), bit for bit."""
    ref = json.loads(REFERENCE.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, case in ref["cases"].items():
                new = run_seed(Params(**case["params"]), ref["D"], ref["seed"], **case["kwargs"])
                _same(case["result"], new, f"{name}: ")
    finally:
        torch.set_num_threads(threads)
    t = ref["teacher"]
    teacher = draw_teacher(t["D"], t["P0"], t["seed"])
    assert teacher.w_star.tolist() == t["w_star"] and teacher.W_star[0].tolist() == t["W_star_row0"]
    # the explicit rank-one arguments change nothing either
    same = draw_teacher(t["D"], t["P0"], t["seed"], rank=1, strengths=(1.0,), kind="gaussian")
    assert torch.equal(same.w_star, teacher.w_star) and torch.equal(same.W_star, teacher.W_star)


# ----------------------------------------------------------------------------- teacher
def test_gaussian_teacher_columns_and_independence_of_r_star():
    one = draw_teacher(40, 30, 5)
    three = draw_teacher(40, 30, 5, rank=3, strengths=(1.0, 0.5, 2.0))
    assert three.w_star.shape == (40, 3) and three.rank == 3 and one.rank == 1
    assert torch.equal(three.W_star, one.W_star)  # pre-training teacher does not depend on r*
    assert torch.equal(three.w_star[:, 0], one.w_star)  # g_1 is the rank-one w*
    eff = draw_teacher(40, 0, 5, rank=3, strengths=(1.0, 0.5, 2.0))  # effective mode: same w*
    assert torch.equal(eff.w_star, three.w_star)
    g = draw_teacher(40, 30, 5, rank=3).w_star
    assert torch.equal(three.w_star, g * torch.tensor([1.0, 0.5, 2.0], dtype=F64))
    assert math.isclose(three.q0, float((three.w_star**2).sum()) / 40, rel_tol=1e-15)


@pytest.mark.parametrize("rank,s", [(1, None), (1, (0.5,)), (3, (1.0, 0.5, 2.0)), (2, None)])
def test_orthonormal_teacher_gives_q0_exactly(rank, s):
    D = 50
    t = draw_teacher(D, 0, 2, rank=rank, strengths=s, kind="orthonormal")
    w = t.w_star.reshape(D, -1)
    q0 = w.T @ w / D
    want = torch.diag(torch.tensor(s or (1.0,) * rank, dtype=F64) ** 2)
    assert torch.allclose(q0, want, rtol=0, atol=1e-13), q0
    g = draw_teacher(D, 0, 2, rank=rank).w_star.reshape(D, -1)  # the same frame, orthonormalised
    assert float(w[:, 0] @ g[:, 0]) > 0
    assert torch.allclose(w[:, 0] / w[:, 0].norm(), g[:, 0] / g[:, 0].norm(), atol=1e-14)
    assert t.w_star.is_contiguous()


def test_teacher_rank_above_dim_is_refused():
    with pytest.raises(ValueError, match="teacher_rank"):
        draw_teacher(3, 0, 0, rank=4)


# ----------------------------------------------------------------------------- the objective
def _problem(D=7, r=2, rs=2, n=5, T=3, seed=0):
    X = _rand(n, T, D, seed=seed)
    zf = _rand(n, T, T, seed=seed + 1)
    zf = zf + zf.transpose(-1, -2)
    w_star = _rand(D, rs, seed=seed + 2)
    w = _rand(D, r, seed=seed + 3)
    return X, zf, w_star, w


@pytest.mark.parametrize("act", ["softmax", "linear"])
@pytest.mark.parametrize("loss", ["sequence", "attention"])
@pytest.mark.parametrize("r,rs", [(2, 2), (3, 1), (1, 2), (3, 3)])
def test_objective_against_a_direct_evaluation(act, loss, r, rs):
    """(sum_mu loss_mu + lam' ||w||_F^2)/N' with y = sigma(z*') X formed explicitly, sample by sample."""
    sigma = activations.get(act)
    D, T, n, lam = 7, 3, 5, 0.3
    X, zf, w_star, w = _problem(D, r, rs, n, T)
    if r == 1:
        w = w[:, 0].contiguous()
    z_star_pre = _rand(n, T, T, seed=9)
    z_star_pre = z_star_pre + z_star_pre.transpose(-1, -2)
    total = 0.0
    for mu in range(n):
        Xm = X[mu]
        W = w.reshape(D, -1)
        chi, chi_s = Xm @ W / math.sqrt(D), Xm @ w_star / math.sqrt(D)
        q, q0 = W.T @ W / D, w_star.T @ w_star / D
        z = zf[mu] + chi @ chi.T - torch.trace(q) * torch.eye(T, dtype=F64)
        zs = z_star_pre[mu] + chi_s @ chi_s.T - torch.trace(q0) * torch.eye(T, dtype=F64)
        if loss == "sequence":
            y_hat, y = sigma(z) @ Xm, sigma(zs) @ Xm
            total += float(((y_hat - y) ** 2).sum()) / D
        else:
            total += float(((sigma(z) - sigma(zs)) ** 2).sum())
    direct = (total + lam * float((w * w).sum())) / n

    from hdlora.data import Dataset, gram

    target = z_star_pre + lora_field(X, w_star)[1]
    data = Dataset(X, torch.zeros_like(zf), target, gram(X), z_frozen=zf)
    value, grad = finetune_value_and_grad(data, sigma, lam, loss, chunk=2)(w)
    assert math.isclose(value, direct, rel_tol=1e-12), (value, direct)
    assert grad.shape == w.shape


@pytest.mark.parametrize("act", ["softmax", "linear"])
@pytest.mark.parametrize("r,rs", [(2, 2), (3, 1)])
def test_gradient_against_finite_differences(act, r, rs):
    """The gradient of the rank-r objective (the centering -tr(q) I differentiated) against central
    differences of the value, entry by entry, and torch's gradcheck of the chunk loss."""
    sigma = activations.get(act)
    X, zf, w_star, w = _problem(6, r, rs, 4, 3, seed=3)
    target = sigma(zf + lora_field(X, w_star)[1] + 0.3)
    G = X @ X.transpose(-1, -2) / 6
    from hdlora.data import Dataset

    data = Dataset(X, torch.zeros_like(zf), torch.logit(target.clamp(1e-6, 1 - 1e-6)), G, z_frozen=zf)
    vg = finetune_value_and_grad(data, sigma, 0.2, "sequence", chunk=3)
    _, grad = vg(w)
    h = 1e-6
    fd = torch.empty_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            e = torch.zeros_like(w)
            e[i, j] = h
            fd[i, j] = (vg(w + e)[0] - vg(w - e)[0]) / (2 * h)
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-8), (grad - fd).abs().max()
    wl = w.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: finetune_loss_sum(w, X, zf, target, G, sigma, "sequence"), (wl,))
    # the centering is differentiated: a stop-gradient on tr(q) changes the gradient
    assert float((grad - _grad_stop_trace(X, zf, target, G, sigma, w, 0.2)).abs().max()) > 1e-6


def _grad_stop_trace(X, zf, target, G, sigma, w, lam):
    wl = w.clone().requires_grad_(True)
    D, T = w.shape[0], X.shape[1]
    chi = X @ wl / math.sqrt(D)
    field = chi @ chi.transpose(-1, -2) - torch.eye(T, dtype=F64) * float((w * w).sum()) / D
    B = sigma(zf + field) - target
    ((((B @ G) * B).sum() + lam * (wl * wl).sum()) / X.shape[0]).backward()
    return wl.grad


def test_matrix_path_at_rank_one_agrees_with_the_vector_path():
    """The generic D x r code at r = 1 (a D x 1 matrix) gives the rank-one numbers to rounding."""
    X, zf, w_star, w = _problem(9, 1, 1, 6, 3, seed=4)
    v = w[:, 0].contiguous()
    chi1, f1 = rank_one_field(X, v)
    chi2, f2 = lora_field(X, w)
    assert torch.allclose(chi1, chi2[..., 0], rtol=0, atol=1e-14) and torch.allclose(f1, f2, rtol=0, atol=1e-13)
    sigma = activations.get("softmax")
    from hdlora.data import Dataset, gram

    data = Dataset(X, torch.zeros_like(zf), zf + lora_field(X, w_star)[1], gram(X), z_frozen=zf)
    vg = finetune_value_and_grad(data, sigma, 0.4, "sequence", chunk=4)
    (a, ga), (b, gb) = vg(v), vg(w)
    assert math.isclose(a, b, rel_tol=1e-13) and torch.allclose(ga, gb[:, 0], rtol=0, atol=1e-13)
    p1, pr = rank_one_parameters(v, w_star[:, 0]), rank_r_parameters(w, w_star)
    for k in ("q", "q0", "overlap"):
        assert math.isclose(p1[k], pr[k], rel_tol=1e-13), k
    assert math.isclose(abs(p1["m"]), pr["m"], rel_tol=1e-13)


# ----------------------------------------------------------------------------- starts, gauge, invariants
def test_starts_truncate_or_pad_the_teacher():
    ws = _rand(20, 3, seed=1)
    s = dict(restarts=2, init_scale=0.5, informed=True, pad_scale=0.05)
    trunc = starts(ws, 2, generator(0, "finetune_init"), **s)
    assert [n for n, _ in trunc] == ["informed", "random0", "random1"]
    assert torch.equal(trunc[0][1], ws[:, :2]) and trunc[1][1].shape == (20, 2)
    pad = starts(ws[:, :1], 3, generator(0, "finetune_init"), **s)[0][1]
    assert torch.equal(pad[:, 0], ws[:, 0]) and pad.shape == (20, 3)
    assert 0 < float(pad[:, 1:].abs().max()) < 0.5  # small, not zero: a zero column never moves
    one = starts(ws, 1, generator(0, "finetune_init"), **s)
    assert one[0][1].shape == (20,) and torch.equal(one[0][1], ws[:, 0])
    # rank one: the paper's starts, drawn as before
    v = ws[:, 0].contiguous()
    old_g = generator(0, "finetune_init")
    old = [v.clone()] + [0.5 * torch.randn(20, generator=old_g, dtype=F64) for _ in range(2)]
    new = starts(v, 1, generator(0, "finetune_init"), **s)
    assert all(torch.equal(a, b) for a, (_, b) in zip(old, new))


def test_canonical_gauge_is_an_orthogonal_rotation_with_m_in_svd_form():
    D = 30
    ws = _rand(D, 2, seed=2)
    w = _rand(D, 3, seed=3)
    c = canonical_gauge(w, ws)
    O = torch.linalg.lstsq(w, c).solution
    assert torch.allclose(O.T @ O, torch.eye(3, dtype=F64), atol=1e-12)
    a, b = rank_r_parameters(w, ws), rank_r_parameters(c, ws)
    for k in ("q", "m", "q0", "overlap"):
        assert math.isclose(a[k], b[k], rel_tol=1e-12), k
    for k in ("q_eigenvalues", "m_singular_values", "principal_cosines"):
        assert torch.allclose(torch.tensor(a[k]), torch.tensor(b[k]), atol=1e-12), k
    m = torch.tensor(b["m_matrix"])
    sv = torch.linalg.svdvals(m)
    assert torch.allclose(m[:2].norm(dim=1), sv, atol=1e-12) and float(m[2].abs().max()) < 1e-12
    q = torch.tensor(b["q_matrix"])  # the column outside the teacher directions: its own q entry
    assert q.shape == (3, 3) and torch.allclose(q, q.T)


def test_invariants_of_known_matrices():
    D = 40
    basis, _ = torch.linalg.qr(_rand(D, 3, seed=4))
    ws = math.sqrt(D) * basis[:, :2]  # q0 = I_2
    w = torch.stack([ws[:, 0], 0.5 * (ws[:, 1] + math.sqrt(D) * basis[:, 2]) / 1.0], dim=1)
    p = rank_r_parameters(w, ws)
    assert math.isclose(p["q0"], 2.0, rel_tol=1e-13) and math.isclose(p["q"], 1.5, rel_tol=1e-13)
    assert torch.allclose(torch.tensor(p["principal_cosines"]), torch.tensor([1.0, 1 / math.sqrt(2)]), atol=1e-12)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=F64)
    assert math.isclose(p["m"], float(m.norm()), rel_tol=1e-13)
    q = torch.tensor([[1.0, 0.0], [0.0, 0.5]], dtype=F64)
    assert math.isclose(p["overlap"], float(m.norm()) / math.sqrt(float(q.norm()) * math.sqrt(2)), rel_tol=1e-12)
    z = rank_r_parameters(torch.zeros(D, 2, dtype=F64), ws)
    assert z["overlap"] == 0.0 and z["principal_cosines"] == [] and z["numerical_rank"] == 0
    # a column 1e-4 times smaller than the other is below the numerical rank threshold (1e-3)
    tiny = torch.stack([ws[:, 0], 1e-4 * ws[:, 1]], dim=1)
    assert rank_r_parameters(tiny, ws)["numerical_rank"] == 1


# ----------------------------------------------------------------------------- fine-tuning behaviour
# a perfectly pre-trained map and no noise: z = z* exactly (effective law Q = M = Q0, Delta = 0), so
# the fine-tuning target is the rank-r* teacher field alone
CLEAN = dict(alpha=0.1, alpha_ft=30, tokens=3, kappa0=1, kappa=1, noise=0.0, lam=0.1, lam_ft=1e-3)
PERFECT = {"Q0": 2.0, "Q": 2.0, "M": 2.0}


@pytest.mark.parametrize("informed,restarts", [(True, 0), (False, 2)])
def test_r_equal_r_star_recovers_the_teacher_without_noise(informed, restarts):
    p = Params(**CLEAN, lora_rank=2, teacher_rank=2, teacher_strengths=(1.0, 0.6))
    with warnings.catch_warnings():
        # the informed start is already near the minimiser: its gradient is tiny at the start, and a
        # relative tolerance of 1e-6 of it may stall in rounding; judge the end gradient absolutely
        warnings.simplefilter("ignore")
        out = run_seed(p, 40, 0, effective=PERFECT, teacher="orthonormal", informed_start=informed, restarts=restarts)
    assert out["finetune_grad_norm"] < 1e-7, out["finetune_grad_norm"]
    assert out["overlap"] > 0.99, out["overlap"]
    assert min(out["principal_cosines"]) > 0.99, out["principal_cosines"]
    assert torch.allclose(torch.tensor(out["m_singular_values"]), torch.tensor([1.0, 0.36]), atol=0.05)
    assert (
        out["finetune_test_error"]
        < 0.05 * run_seed(p.replace(lam_ft=math.inf), 40, 0, effective=PERFECT)["finetune_test_error"]
    )


def test_extra_directions_vanish_under_a_large_ridge():
    """r = 3 > r* = 1 with noise (Delta = 0.5, an imperfect pre-training): under a small lam' the two
    extra directions of w fit noise (singular values of order one); under a large lam' they go to ~0
    (numerical rank 1) while the teacher direction stays."""
    eff = {"Q0": 2.0, "Q": 0.8, "M": 0.9}
    sv = {}
    for lam_ft in (0.01, 4.0):
        p = Params(**dict(SMALL, alpha_ft=10, lam_ft=lam_ft), lora_rank=3, teacher_rank=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = run_seed(p, 40, 1, effective=eff, teacher="orthonormal")
        sv[lam_ft] = out["w_singular_values"]
        if lam_ft == 4.0:
            assert out["numerical_rank"] == 1 and out["principal_cosines"][0] > 0.9, out["principal_cosines"]
    assert min(sv[0.01][1:]) > 0.1 * sv[0.01][0], sv
    assert sv[4.0][0] > 0.3 and max(sv[4.0][1:]) < 1e-3 * sv[4.0][0], sv


@pytest.mark.parametrize(
    "extra,kwargs",
    [
        ({}, {}),
        ({"reuse": True, "alpha": 0.5, "activation": "linear"}, {}),
        ({"active_pool": 6.0}, {}),
        ({}, {"effective": {"Q0": 2.0, "Q": 0.8, "M": 0.9}}),
    ],
)
def test_rank_r_pipeline_modes(extra, kwargs):
    p = Params(**dict(SMALL, **extra), lora_rank=2, teacher_rank=3, teacher_strengths=(1.0, 0.7, 0.4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_seed(p, 20, 0, restarts=1, **kwargs)
    assert len(out["q_eigenvalues"]) == 2 and len(out["m_singular_values"]) == 2
    assert torch.tensor(out["m_matrix"]).shape == (2, 3) and torch.tensor(out["q0_matrix"]).shape == (3, 3)
    assert math.isclose(out["q"], sum(out["q_eigenvalues"]), rel_tol=1e-12)
    assert math.isclose(out["m"], math.hypot(*out["m_singular_values"]), rel_tol=1e-12)
    assert set(out["finetune_start_objectives"]) == {"informed", "random0"}
    assert out["finetune_objective"] == min(out["finetune_start_objectives"].values())
    assert 0 <= out["overlap"] <= 1 and all(0 <= c <= 1 for c in out["principal_cosines"])
    for k in ("finetune_test_error", "forgetting_error", "finetune_train_error"):
        assert math.isfinite(out[k]) and out[k] > 0


def test_run_averages_the_lists_over_seeds():
    p = Params(**SMALL, lora_rank=2, teacher_rank=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(p, 16, 2, restarts=1, teacher="orthonormal")
    for k in VECTOR_KEYS[:3]:
        per = torch.tensor([r[k] for r in res.per_seed])
        assert torch.allclose(torch.tensor(res.mean[k]), per.mean(0), atol=1e-15)
        assert len(res.se[k]) == per.shape[1]
    d = res.to_dict()
    assert d["teacher"] == "orthonormal" and d["params"]["lora_rank"] == 2


def test_lam_ft_inf_gives_a_zero_rank_r_update():
    p = Params(**dict(SMALL, lam_ft=math.inf), lora_rank=2, teacher_rank=2)
    out = run_seed(p, 16, 0)
    assert out["q"] == 0 and out["overlap"] == 0 and out["numerical_rank"] == 0


# ----------------------------------------------------------------------------- resources
def test_resource_estimate_counts_the_rank_r_weights():
    e1, e3 = (simulate_estimate(Params(lora_rank=r, teacher_rank=r), 100) for r in (1, 3))
    assert e3.parts["fine-tuning L-BFGS state"] == 3 * e1.parts["fine-tuning L-BFGS state"]
    assert e3.parts["LoRA starts"] == 3 * e1.parts["LoRA starts"]
    assert e3.parts["teacher"] - e1.parts["teacher"] == 8 * 100 * 2
    assert e3.seconds > e1.seconds


# ----------------------------------------------------------------------------- command line
BAD_CLI = [
    (["--lora-rank", "0"], ["lora_rank", "[1, 64]"]),
    (["--lora-rank", "1.5"], ["--lora-rank", "integer"]),
    (["--teacher-rank", "2.5"], ["--teacher-rank", "integer"]),
    (["--teacher-rank", "2", "--teacher-strengths", "1"], ["teacher_strengths", "2 finite numbers > 0"]),
    (["--teacher-strengths", "0"], ["teacher_strengths", "> 0"]),
    (["--teacher-rank", "2", "--teacher-strengths", "1,-0.5"], ["teacher_strengths", "> 0"]),
    (["--teacher-strengths", "x"], ["teacher_strengths"]),
    (["--teacher", "uniform"], ["--teacher", "gaussian", "orthonormal"]),
]


@pytest.mark.parametrize("args,words", BAD_CLI)
def test_bad_rank_flags_one_line_exit_2(args, words, capsys):
    assert cli.main(["simulate", "--dry-run", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])


def test_rank_above_dim_one_line_exit_2(capsys):
    assert cli.main(["simulate", "--dim", "4", "--lora-rank", "5", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank" in err[0] and "dim" in err[0], err


def test_cli_runs_rank_r(capsys):
    argv = ["simulate", "--dim", "12", "--seeds", "1", "--restarts", "0", "--json", "-q"]
    argv += ["--lora-rank", "2", "--teacher-rank", "2", "--teacher-strengths", "1,0.5", "--teacher", "orthonormal"]
    assert cli.main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["lora_rank"] == 2 and d["params"]["teacher_strengths"] == [1.0, 0.5]
    assert d["teacher"] == "orthonormal" and math.isclose(d["q0"], 1.25, rel_tol=1e-12)
    assert len(d["q_eigenvalues"]) == 2 and len(d["per_seed"][0]["m_matrix"]) == 2


# ----------------------------------------------------------------------------- sweeps
def test_sweep_files_take_the_ranks_and_the_teacher(tmp_path, capsys):
    from hdlora.experiments.cli import main

    f = tmp_path / "s.toml"
    f.write_text(
        "[params]\nteacher_rank = 2\nteacher_strengths = [1.0, 0.5]\n[axes]\nlora_rank = [1, 2]\n"
        "[run.simulate]\ndim = 12\nseeds = 1\nrestarts = 0\nteacher = 'orthonormal'\n"
    )
    assert main([str(f), "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    bad = tmp_path / "b.toml"
    bad.write_text("[axes]\nlora_rank = [1, 2]\n[run.simulate]\ndim = 12\nseeds = 1\nteacher = 'uniform'\n")
    assert main([str(bad), "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher = 'uniform'" in err[0] and "orthonormal" in err[0], err
    bad.write_text("[axes]\nlora_rank = [1, 0]\n[run.simulate]\ndim = 12\nseeds = 1\n")
    assert main([str(bad), "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora_rank" in err[0], err
