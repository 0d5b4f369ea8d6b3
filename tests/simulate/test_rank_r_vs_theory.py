"""Rank-r LoRA: the simulator against the rank-r theory (issue 11), on an effective pre-training.

The full-pipeline comparison at D = 300 is docs/VALIDATION.md §9 (scripts/validate_rank_r_sim.py,
scripts/validation_rank_r_table.py); this is its fast, self-contained check: r = r* = 2, the
pre-training task's fields drawn from the law (Q0, Q, M) independently of w* (no O(D^-1/2) w*-S*
correlation), orthonormal teacher, attention loss.
"""

from __future__ import annotations

import math
import warnings

import pytest

from hdlora import Params
from hdlora.params import A0
from hdlora.simulate import run as simulate_run
from hdlora.theory.sampling import frozen_fields
from hdlora.theory.solve_rank_r import pick_winner, solve_branches

pytestmark = pytest.mark.slow

LAW = {"Q0": 2.0, "Q": 1.2677, "M": 1.4111}  # the linear pre-training fixed point at the Fig. 1 setting


@pytest.mark.parametrize("act, strengths", [("linear", None), ("linear", (1.0, 0.5)), ("softmax", None)])
def test_rank_two_simulation_within_errors_of_the_theory(act, strengths):
    p = Params(alpha=0.1, alpha_ft=3.0, tokens=3, noise=0.5, lam=0.1, lam_ft=0.5, activation=act)
    p = p.replace(lora_rank=2, teacher_rank=2, teacher_strengths=strengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = simulate_run(p, 200, [0, 1, 2, 3], effective=LAW, teacher="orthonormal", loss="attention")
        f = frozen_fields(20000, 3, A0(LAW["Q0"], p.noise), LAW["Q"], LAW["M"], seed=0)
        res, _, _ = solve_branches(p, f["z_star"], f["z"], **LAW, seed=2, tol=1e-7, max_iter=400)
    name, status = pick_winner(res)
    assert status == "converged_stable", status
    th = res[name].to_dict()
    for k in ("finetune_test_error", "finetune_train_error", "overlap"):
        se = math.hypot(sim.se[k], (th.get("mc_se") or {}).get(k, 0.0) or 0.0)
        # measured: |z| <= 1.7 for all nine (D = 200, 4 seeds)
        assert abs(sim.mean[k] - th[k]) <= 3 * se, (k, sim.mean[k], sim.se[k], th[k])
