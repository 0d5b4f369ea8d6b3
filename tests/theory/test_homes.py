"""One home per paper object: A0, the Delta_eff family, beta*, the default n_mc, the baseline names."""

import inspect
import math

import pytest

from hdlora import ParamError, Params
from hdlora.params import A0, DEFAULT_N_MC
from hdlora.theory import effective as eff
from hdlora.theory.solve import BASELINES, apply_baseline, canonical_baseline


def test_A0_is_Q0_plus_half_Delta_and_the_property_agrees():
    p = Params(kappa0=0.7, noise=1.3)
    assert p.A0 == A0(p.Q0, p.noise) == p.Q0 + p.noise / 2


@pytest.mark.parametrize("Q0,Q,M,noise,beta", [(2.0, 0.3, 0.5, 0.5, 0.7), (1.5, 3.0, 0.2, 2.0, 1.0)])
def test_delta_eff_family_is_one_set_of_formulas(Q0, Q, M, noise, beta):
    a0 = A0(Q0, noise)
    assert eff.delta_eff(Q0, Q, M, noise) == eff.delta_eff_of_A0(a0, Q, M) == noise / 2 + Q0 - 2 * M + Q
    assert (
        eff.delta_eff_beta(Q0, Q, M, noise, beta)
        == eff.delta_eff_beta_of_A0(a0, Q, M, beta)
        == noise / 2 + Q0 + beta * beta * Q - 2 * beta * M
    )
    assert eff.delta_eff_min(Q0, Q, M, noise) == eff.delta_eff_min_of_A0(a0, Q, M) == noise / 2 + Q0 - M * M / Q


def _default_n_mc(fn):
    return inspect.signature(fn).parameters["n_mc"].default


def test_every_theory_entry_point_defaults_to_the_one_n_mc():
    from hdlora.experiments import optimize
    from hdlora.simulate.run import theory_beta_star
    from hdlora.theory import applications, errors, finetune, pretrain
    from hdlora.theory.solve import solve

    fns = [
        solve,
        pretrain.solve_pretrain,
        finetune.solve_finetune_effective,
        finetune.solve_lora_only,
        finetune.frozen_baseline,
        applications.active_comparison,
        applications.active_comparison_effective,
        errors.pretrain_test_error,
        errors.finetune_test_error,
        errors.forgetting_error,
        errors.frozen_test_error,
        errors.lora_only_test_error,
        optimize.optimize,
        theory_beta_star,
    ]
    assert {f.__qualname__: _default_n_mc(f) for f in fns} == {f.__qualname__: DEFAULT_N_MC for f in fns}


def test_cli_defaults_to_the_one_n_mc():
    import argparse

    from hdlora.experiments import optimize_cli
    from hdlora.theory import cli as theory_cli

    for mod in (theory_cli, optimize_cli):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        assert p.get_default("n_mc") == DEFAULT_N_MC, mod.__name__


def test_baseline_has_one_spelling_and_accepts_the_other_on_input():
    assert BASELINES == ("frozen", "lora_only")
    assert canonical_baseline("lora-only") == canonical_baseline("lora_only") == "lora_only"
    assert canonical_baseline(None) is None
    with pytest.raises(ParamError, match="baseline"):
        canonical_baseline("lora only")
    assert math.isinf(apply_baseline(Params(), "lora-only").lam)
    assert math.isinf(apply_baseline(Params(), "frozen").lam_ft)


def test_theory_result_reports_the_canonical_spelling():
    from hdlora.theory import solve

    r = solve(Params(activation="linear", lam=0.1, lam_ft=0.5), n_mc=200, baseline="lora-only", warn=False)
    assert r.baseline == "lora_only" and r.Q == 0.0


def test_sweep_accepts_the_alias_and_stores_the_canonical_kind():
    from hdlora.experiments import tasks

    assert tasks.BASELINE_ALIASES["lora-only"] in tasks.BASELINES
