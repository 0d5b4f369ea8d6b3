import math

import pytest

from hdlora import ParamError, Params


def test_defaults_valid():
    p = Params()
    assert p.e == 0 and p.Q0 == 2.0 and not p.frozen and not p.lora_only


@pytest.mark.parametrize(
    "field,value,word",
    [
        ("kappa", 0.5, "kappa"),
        ("kappa0", 0.0, "kappa0"),
        ("kappa0", -1, "kappa0"),
        ("tokens", 1, "tokens"),
        ("tokens", 2.5, "tokens"),
        ("alpha", 0, "alpha"),
        ("alpha_ft", -1, "alpha_ft"),
        ("noise", -0.1, "noise"),
        ("lam", -1, "lam"),
        ("lam_ft", -1e-3, "lam_ft"),
        ("alpha", math.nan, "alpha"),
        ("noise", math.nan, "noise"),
        ("lam", "abc", "lam"),
        ("activation", "relu", "activation"),
        ("beta", 0.0, "beta"),
        ("alpha", math.inf, "alpha"),
    ],
)
def test_bad_input_names_field(field, value, word):
    with pytest.raises(ParamError, match=word):
        Params(**{field: value})


def test_infinite_regularisations_allowed():
    p = Params(lam=math.inf, lam_ft=math.inf)
    assert p.frozen and p.lora_only


def test_reuse_needs_enough_pretraining_samples():
    p = Params(alpha=0.001, alpha_ft=3, reuse=True)
    with pytest.raises(ParamError, match="reuse"):
        p.sizes(100)  # N = 10 < N' = 300
    assert p.sizes(10_000)["N"] == 100_000


def test_from_dict_rejects_unknown():
    with pytest.raises(ParamError, match="unknown"):
        Params.from_dict({"alpha": 0.1, "gamma": 1})


def test_active_pool_checked():
    with pytest.raises(ParamError, match="active_pool"):
        Params(alpha_ft=3, active_pool=2)
    assert Params(alpha_ft=3, active_pool=30).rho == pytest.approx(0.1)


def test_ranks_and_teacher_strengths():
    from hdlora.params import MAX_RANK

    p = Params(lora_rank=2, teacher_rank=2, teacher_strengths="1,0.5")
    assert (p.lora_rank, p.teacher_rank, p.teacher_strengths, p.q0) == (2, 2, (1.0, 0.5), (1.0, 0.25))
    assert not p.rank_one and Params().rank_one and Params(lora_rank=3.0).lora_rank == 3
    assert Params.from_dict(p.to_dict()) == p
    for bad in (
        {"lora_rank": 0},
        {"lora_rank": 1.5},
        {"lora_rank": MAX_RANK + 1},
        {"teacher_rank": True},
        {"teacher_rank": "x"},
        {"teacher_rank": 2, "teacher_strengths": (1.0,)},
        {"teacher_strengths": (0.0,)},
        {"teacher_strengths": (math.inf,)},
        {"teacher_strengths": 3},
    ):
        with pytest.raises(ParamError) as e:
            Params(**bad)
        assert ("rank" in str(e.value) or "strengths" in str(e.value)) and "\n" not in str(e.value)
