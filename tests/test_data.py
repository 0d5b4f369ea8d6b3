"""The data model (eq. 6): laws of the generated fields, centering, reuse, seeds."""

import math

import pytest
import torch

from hdlora import ParamError
from hdlora.data import (
    Effective,
    draw_noise,
    draw_teacher,
    effective_fields,
    finetune_dataset,
    generator,
    pretrain_dataset,
    rank_one_field,
)


def _var_and_se(x: torch.Tensor):
    """Sample variance of a centred-in-law sample and its standard error (from the 4th moment)."""
    x = x.double().flatten()
    x2 = x * x
    return float(x2.mean()), float(x2.std() / math.sqrt(x.numel()))


def test_noise_law():
    T, Delta, n = 3, 0.8, 100_000
    xi = draw_noise(n, T, Delta, generator(0, "pretrain_data"), "cpu")
    assert torch.equal(xi, xi.transpose(-1, -2))
    for a in range(T):
        for b in range(T):
            v, se = _var_and_se(xi[:, a, b])
            expected = Delta if a == b else Delta / 2  # eq. 6: N(0, Delta / (2 - delta_ab))
            assert abs(v - expected) < 5 * se, (a, b, v, expected, se)
            assert abs(float(xi[:, a, b].mean())) < 5 * math.sqrt(expected / n)
    # distinct upper-triangle entries are uncorrelated
    c = float((xi[:, 0, 1] * xi[:, 0, 2]).mean())
    assert abs(c) < 5 * (Delta / 2) / math.sqrt(n)


@pytest.fixture(scope="module")
def pre_set():
    D, T, n, Delta = 40, 3, 20_000, 0.6
    teacher = draw_teacher(D, 40, seed=3)
    return teacher, pretrain_dataset(n, T, Delta, teacher, seed=3), Delta


def test_target_field_variances_and_centering(pre_set):
    """z* = X S* X^T/D - delta_ab Tr S*/D + xi: entries centred, off-diagonal variance Q0 + Delta/2,
    diagonal 2 (Q0 + Delta/2), with Q0 = Tr S*^2 / D^2 of this teacher (exact for Gaussian X, eq. 38)."""
    teacher, data, Delta = pre_set
    D = teacher.D
    S = teacher.W_star @ teacher.W_star.T / math.sqrt(teacher.P0)
    Q0 = float(torch.trace(S @ S)) / D**2
    z = data.z_star
    for a in range(3):
        for b in range(a, 3):
            v, se = _var_and_se(z[:, a, b])
            expected = (1 + (a == b)) * (Q0 + Delta / 2)
            assert abs(v - expected) < 5 * se, (a, b, v, expected, se)
            mean_se = math.sqrt(expected / data.n)
            assert abs(float(z[:, a, b].mean())) < 5 * mean_se
    # the centering matters: without it the diagonal mean would be Tr S*/D, many standard errors away
    assert float(torch.trace(S)) / D > 50 * math.sqrt(2 * (Q0 + Delta / 2) / data.n)


def test_rank_one_field_law(pre_set):
    """chi* = X w*/sqrt(D) ~ N(0, q0) per token, tokens independent; the centred rank-one term
    chi* chi*^T - q0 I has mean zero (population centering eq. 34)."""
    teacher, data, _ = pre_set
    chi, field = rank_one_field(data.X, teacher.w_star)
    q0 = teacher.q0
    for a in range(3):
        v, se = _var_and_se(chi[:, a])
        assert abs(v - q0) < 5 * se
        # Gaussian: 4th moment 3 q0^2
        m4 = float((chi[:, a] ** 4).mean())
        assert abs(m4 - 3 * q0**2) < 5 * float((chi[:, a] ** 4).std()) / math.sqrt(data.n)
    assert abs(float((chi[:, 0] * chi[:, 1]).mean())) < 5 * q0 / math.sqrt(data.n)
    for a in range(3):
        for b in range(3):
            assert abs(float(field[:, a, b].mean())) < 5 * float(field[:, a, b].std()) / math.sqrt(data.n)


def test_finetune_target_adds_rank_one_term(pre_set):
    teacher, data, Delta = pre_set
    ft = finetune_dataset(50, 3, Delta, teacher, seed=3, reuse_from=data)
    expected = data.z_star[:50] + rank_one_field(data.X[:50], teacher.w_star)[1]
    torch.testing.assert_close(ft.z_star, expected, rtol=0, atol=1e-12)


def test_reuse_shares_sequences_and_noise(pre_set):
    teacher, data, Delta = pre_set
    ft = finetune_dataset(100, 3, Delta, teacher, seed=3, reuse_from=data)
    # e = 1: the very same tensors (views of the pre-training storage), not copies
    assert ft.X.data_ptr() == data.X.data_ptr() and ft.xi.data_ptr() == data.xi.data_ptr()
    assert torch.equal(ft.X, data.X[:100]) and torch.equal(ft.xi, data.xi[:100])
    fresh = finetune_dataset(100, 3, Delta, teacher, seed=3)
    assert not torch.allclose(fresh.X, data.X[:100]) and not torch.allclose(fresh.xi, data.xi[:100])
    with pytest.raises(ParamError, match="reuse"):
        finetune_dataset(data.n + 1, 3, Delta, teacher, seed=3, reuse_from=data)


def test_effective_fields_law():
    """(z*, z) ~ Q (eq. 13): entry covariance (1 + delta_ab) [[Q0 + Delta/2, M], [M, Q]]."""
    eff, Delta, n, T = Effective(Q0=2.0, Q=1.5, M=1.0), 1.0, 100_000, 3
    zs, z = effective_fields(n, T, eff, Delta, generator(1, "effective_train"))
    assert torch.equal(zs, zs.transpose(-1, -2)) and torch.equal(z, z.transpose(-1, -2))
    for a, b in [(0, 0), (0, 1), (1, 2), (2, 2)]:
        s = 1 + (a == b)
        for x, y, expected in [(zs, zs, s * (eff.Q0 + Delta / 2)), (z, z, s * eff.Q), (zs, z, s * eff.M)]:
            prod = x[:, a, b] * y[:, a, b]
            assert abs(float(prod.mean()) - expected) < 5 * float(prod.std()) / math.sqrt(n)


@pytest.mark.parametrize(
    "eff,word",
    [
        ({"Q0": 1, "Q": 1}, "keys"),
        ({"Q0": -1, "Q": 1, "M": 0}, "Q0"),
        ({"Q0": 1, "Q": -1, "M": 0}, "Q"),
        ({"Q0": 1, "Q": 1, "M": 5}, "M"),
        ({"Q0": 1, "Q": "x", "M": 0}, "Q"),
        ({"Q0": 1, "Q": math.nan, "M": 0}, "Q"),
    ],
)
def test_effective_bad_input(eff, word):
    with pytest.raises(ParamError, match=word):
        Effective.from_mapping(eff, 0.5)


def test_seeds_are_deterministic_and_streams_independent():
    a, b, c = draw_teacher(20, 10, 5), draw_teacher(20, 10, 5), draw_teacher(20, 10, 6)
    assert torch.equal(a.W_star, b.W_star) and torch.equal(a.w_star, b.w_star)
    assert not torch.equal(a.W_star, c.W_star)
    # w* does not depend on P0 (drawn first), so the effective mode shares it with the full one
    assert torch.equal(draw_teacher(20, 0, 5).w_star, a.w_star)
    d1, d2 = pretrain_dataset(30, 2, 0.5, a, seed=5), pretrain_dataset(30, 2, 0.5, a, seed=5)
    assert torch.equal(d1.X, d2.X) and torch.equal(d1.xi, d2.xi) and torch.equal(d1.z_star, d2.z_star)
    with pytest.raises(ParamError, match="seed"):
        generator(-1, "teacher")
