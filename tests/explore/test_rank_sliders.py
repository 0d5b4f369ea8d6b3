"""The explorer's rank sliders (issue 14): LoRA rank r and teacher rank r*, wired to the rank-r theory."""

from __future__ import annotations

import shlex

from hdlora import Params
from hdlora.cli import build_parser
from hdlora.explore.model import AXES, INTEGER_FIELDS, SLIDERS, View, solve_point, theory_command
from hdlora.theory import solve
from hdlora.theory.cli import rank_params


def test_rank_sliders_are_integer_sliders():
    for name in ("lora_rank", "teacher_rank"):
        label, start, end, step = SLIDERS[name]
        assert start == 1 and end > start and step == 1 and name in INTEGER_FIELDS
    assert "r (LoRA rank)" in SLIDERS["lora_rank"][0] and "r*" in SLIDERS["teacher_rank"][0]


def test_lora_rank_axis_is_integer():
    v = View.for_axis(Params(activation="linear", teacher_rank=2), "lora_rank", num=20)
    assert v.xs() == list(range(AXES["lora_rank"][0], AXES["lora_rank"][1] + 1))
    assert v.point(v.xs()[2]).lora_rank == 3


def test_rank_point_is_the_rank_r_theory_and_its_command():
    p = Params(activation="linear", alpha_ft=1.0, lam_ft=2.0, lora_rank=2, teacher_rank=2)
    v = View.for_axis(p, "alpha_ft", num=3, n_mc=300)
    x = v.xs()[1]
    pt = solve_point(v.point(x), x, n_mc=300)
    ref = solve(v.point(x), n_mc=300, warn=False)
    assert pt.E == ref.finetune_test_error and pt.overlap == ref.overlap and pt.converged == ref.converged
    words = shlex.split(theory_command(v, x))
    args = build_parser().parse_args(words[1:])
    assert rank_params(args)["lora_rank"] == 2 and rank_params(args)["teacher_rank"] == 2


def test_a_rank_beyond_the_theory_is_a_failed_point_with_its_message():
    p = Params(activation="linear", lora_rank=8, teacher_rank=1, tokens=10)  # r T = 80 > 64
    pt = solve_point(p, 1.0, n_mc=200)
    assert not pt.converged and "lora_rank" in pt.error
