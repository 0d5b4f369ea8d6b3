"""The continuation in m (hdlora.theory.branches): every fixed point of the rank-one fine-tuning map."""

from __future__ import annotations

import numpy as np
import pytest

from hdlora import ParamError, Params
from hdlora.theory.branches import finetune_m_scan
from hdlora.theory.engine import CONVERGED, REPLICA_UNSTABLE
from hdlora.theory.finetune import solve_finetune
from hdlora.theory.sampling import frozen_fields

T, N, Q0, M, Q = 3, 4000, 1.0, 0.8, 2.0
P = Params(tokens=T, noise=0.5, alpha_ft=3.0, lam_ft=0.5, activation="linear")


@pytest.fixture(scope="module")
def fields():
    f = frozen_fields(N, T, Q0 + P.noise / 2, Q, M, seed=1)
    return f["z_star"], f["z"]


def test_fix_m_solves_the_q_v_part_and_g_vanishes_at_the_fixed_point(fields):
    zs, z = fields
    ref = solve_finetune(P, zs, z, Q0=Q0, Q=Q, M=M, seed=2, tol=1e-11)
    r = solve_finetune(P, zs, z, Q0=Q0, Q=Q, M=M, seed=2, tol=1e-11, fix_m=ref.m)
    assert r.converged and r.m == ref.m
    assert r.q == pytest.approx(ref.q, rel=1e-9) and r.v == pytest.approx(ref.v, rel=1e-9)
    assert abs(r.mhat * r.v - r.m) < 1e-9  # g(m*) = 0
    off = solve_finetune(P, zs, z, Q0=Q0, Q=Q, M=M, seed=2, tol=1e-11, fix_m=0.5 * ref.m)
    assert off.converged and off.mhat * off.v - off.m > 0.05  # g > 0 below the informed root


def test_scan_finds_every_root_attracting_or_not(fields):
    zs, z = fields
    ref = solve_finetune(P, zs, z, Q0=Q0, Q=Q, M=M, seed=2, tol=1e-10)
    s = finetune_m_scan(P, zs, z, np.linspace(-1.1, 1.1, 12), Q0=Q0, Q=Q, M=M, seed=2, tol=1e-10, root_tol=1e-9)
    ms = sorted(b.m for b in s.branches)
    assert len(ms) == 3  # the informed root, its mirror m < 0, and the uninformed root near m = 0
    assert ms[0] < -0.9 and abs(ms[1]) < 0.1 and ms[2] > 0.9
    by_m = {round(b.m, 1): b for b in s.branches}
    inf = max(s.branches, key=lambda b: b.m)
    # the root is solve_finetune's fixed point (which attracts the iteration)
    assert inf.m == pytest.approx(ref.m, abs=1e-8) and inf.q == pytest.approx(ref.q, abs=1e-8)
    assert inf.objective == pytest.approx(ref.objective, rel=1e-8)
    assert inf.status == CONVERGED and inf.replicon < 1
    # the uninformed root: replica-unstable, a clearly higher objective (measured 9.61 vs 6.74)
    uni = min(s.branches, key=lambda b: abs(b.m))
    assert uni.status == REPLICA_UNSTABLE and uni.objective > inf.objective + 1.0
    assert all(abs(b.g) < 1e-8 for b in s.branches) and len(by_m) == 3
    assert {b.m for b in s.stable} == {ms[0], ms[2]}


def test_bad_grid_refused(fields):
    zs, z = fields
    with pytest.raises(ParamError, match="m_values"):
        finetune_m_scan(P, zs, z, [0.5, 0.2], Q0=Q0, Q=Q, M=M)
    with pytest.raises(ParamError, match="fix_m"):
        solve_finetune(P, zs, z, Q0=Q0, Q=Q, M=M, fix_m=float("nan"))
