"""The one compiled Newton prox kernel (hdlora.theory.newton, _newton_numba): identities only."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize

from hdlora.activations import get as get_activation
from hdlora.theory import finetune as F
from hdlora.theory import newton
from hdlora.theory import prox as P
from hdlora.theory.sampling import frozen_fields

ACTS = ["softmax", "linear"]


def _pretrain_batch(n, T, seed):
    rng = np.random.default_rng(seed)
    L = T * (T + 1) // 2
    zs, zt, d = rng.standard_normal((n, L)), rng.standard_normal((n, L)), 0.5 * rng.standard_normal((n, L))
    return zs, zt, d


def _pretrain_rows(zs, zt, T, act):
    y_t = P._sigma_t(P._full_t(zs.T.copy(), T), act)
    return np.concatenate([zt, y_t.reshape(T * T, -1).T], axis=1)


def _finetune_batch(n, T, seed):
    rng = np.random.default_rng(seed)
    Zq = rng.standard_normal((n, T, T))
    Zq = Zq + np.swapaxes(Zq, 1, 2)
    Ya = rng.standard_normal((n, T, T))
    Ya = Ya + np.swapaxes(Ya, 1, 2)
    return rng.standard_normal((n, T)), Zq, Ya, rng.standard_normal((n, T))


def _eval(kind, x, rows, T, act, order=2, n_aux=1):
    n, k = x.shape
    g, H, aux = np.empty((n, k)), np.empty((n, k, k)), np.empty((n, n_aux))
    loss = newton.kernel().evaluate_batch(
        kind,
        np.ascontiguousarray(x),
        np.ascontiguousarray(rows),
        np.array([float(T), 1.0 if act == "softmax" else 0.0]),
        order,
        g,
        H,
        aux,
    )
    return loss, g, H, aux


# ---------------------------------------------------------------- derivatives: finite differences, NumPy reference
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(
    "kind,T", [(newton.PRETRAIN, 2), (newton.PRETRAIN, 3), (newton.FINETUNE, 3), (newton.FINETUNE, 4)]
)
def test_kernel_derivatives_match_finite_differences(kind, T, act):
    if kind == newton.PRETRAIN:
        zs, zt, x = _pretrain_batch(5, T, 1)
        rows = _pretrain_rows(zs, zt, T, act)
    else:
        x, Zq, Ya, _ = _finetune_batch(5, T, 1)
        rows = F._kernel_rows(F._t(Zq), F._t(get_activation(act, "numpy")(Ya)))
    _, g, H, _ = _eval(kind, x, rows, T, act)
    e = 1e-6
    for i in range(x.shape[1]):
        dx = np.zeros(x.shape[1])
        dx[i] = e
        lp, gp, _, _ = _eval(kind, x + dx, rows, T, act)
        lm, gm, _, _ = _eval(kind, x - dx, rows, T, act)
        np.testing.assert_allclose(g[:, i], (lp - lm) / (2 * e), atol=1e-7)
        np.testing.assert_allclose(H[:, :, i], (gp - gm) / (2 * e), atol=1e-7)
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), atol=1e-14)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("T", [2, 3])  # k = 3, 6
def test_pretrain_kernel_equals_numpy_reference(T, act):
    zs, zt, d = _pretrain_batch(200, T, 2)
    loss, g, H, _ = _eval(newton.PRETRAIN, d, _pretrain_rows(zs, zt, T, act), T, act)
    y_t = P._sigma_t(P._full_t(zs.T.copy(), T), act)
    l_ref, g_ref, H_ref = P._loss_t((zt + d).T.copy(), y_t, T, act)
    np.testing.assert_allclose(loss, l_ref, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g, g_ref.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(H, np.moveaxis(H_ref, -1, 0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("T", [3, 5])
def test_finetune_kernel_equals_numpy_reference(T, act):
    chi, Zq, Ya, ct = _finetune_batch(200, T, 3)
    Y = get_activation(act, "numpy")(Ya)
    loss, g, H, aux = _eval(newton.FINETUNE, chi, F._kernel_rows(F._t(Zq), F._t(Y)), T, act)
    v = 0.7
    psi, gpsi, hpsi, dq = F.finetune_potential_derivatives(chi, Zq, Y, ct, v, act)
    prior = ((chi - ct) ** 2).sum(axis=1) / (2 * v)
    np.testing.assert_allclose(-loss - prior, psi, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(-g - (chi - ct) / v, gpsi, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(-H - np.eye(T) / v, hpsi, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(aux[:, 0], dq, rtol=1e-12, atol=1e-14)


def test_kernel_loops_run_without_reference_counting():
    """The per-sample loops and every non-inlined function they call are compiled with _nrt=False (no atomic
    incref/decref per call and row view: 182 -> 110 ns a loss evaluation, VALIDATION section 8); the allocating
    entry points keep it (they allocate the loops' work arrays)."""
    from hdlora.theory import _newton_numba as K

    leaf = ("_newton_loop", "_newton_on_stack", "_evaluate_loop", "loss_derivatives", "_loop_loss")
    leaf += ("_finetune_rank_r_loss",)
    leaf += ("_separable_quartic_loss",)
    leaf += (
        "_softmax_rows",
        "_sigma_residual",
        "_dloss_dX",
        "_free",
        "_rotate_columns",
        "jacobi_eigh",
        "_to_hyperplane",
    )
    for name in leaf:
        assert getattr(K, name).targetoptions.get("_nrt") is False, name
    for name in ("newton_prox", "evaluate_batch", "pretrain_post", "_token_scratch"):
        assert getattr(K, name).targetoptions.get("_nrt", True) is not False, name


def test_jacobi_eigh_matches_lapack():
    rng = np.random.default_rng(4)
    K = newton.kernel()
    for k in (2, 3, 6, 9):
        for _ in range(20):
            A = rng.standard_normal((k, k))
            A = A + A.T
            lam, U, B = np.empty(k), np.empty((k, k)), np.empty((k, k))
            K.jacobi_eigh(A, lam, U, B)
            np.testing.assert_allclose(np.sort(lam), np.linalg.eigvalsh(A), atol=1e-12 * np.abs(A).max())
            np.testing.assert_allclose(U @ np.diag(lam) @ U.T, A, atol=1e-11 * np.abs(A).max())
            np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-12)


# ---------------------------------------------------------------- the Newton solver
def _heap_loop(kind, x0, a, w, data, T, softmax, rule, n_aux=0, ref=None, merge=1e-2):
    """The kernel's Newton loop on heap work arrays (the path of every k outside STACK_K), called directly with the
    arguments :func:`newton.minimise` gives the kernel: its 10 outputs and the largest iteration count."""
    from hdlora.theory import _newton_numba as K

    n, k = x0.shape
    opts = np.append(rule.as_array(), [0.0 if ref is None else merge, float(rule.shift_invariant)])
    ref = np.zeros((1, 1)) if ref is None else ref
    outs = (
        np.empty((n, k)), np.empty(n), np.empty(n), np.empty((n, k)), np.empty((n, k, k)), np.empty((n, max(n_aux, 1))),
        np.empty(n), np.empty(n, dtype=np.bool_), np.empty(n, dtype=np.int64), np.zeros(n, dtype=np.bool_),
    )  # fmt: skip
    problem = (kind, x0, a, w, data, np.array([float(T), 1.0 if softmax else 0.0]), opts, n_aux, ref)
    na = max(n_aux, 1)
    scratch = (np.zeros(na), np.zeros(na), *(np.empty((max(T, 1), max(T, 1))) for _ in range(4)))
    vecs = tuple(np.empty(k) for _ in range(8))
    mats = tuple(np.empty((k, k)) for _ in range(6))
    it = K._newton_loop(problem, outs, vecs, mats, scratch)
    return outs, it


def _same_bits(out: newton.NewtonOutput, heap, n_aux):
    outs, it = heap
    x, f, loss, g, H, aux, res, conv, _its, merged = outs
    for u, v in ((out.x, x), (out.f, f), (out.loss, loss), (out.grad, g), (out.hess, H), (out.aux, aux[:, :n_aux])):
        assert u.tobytes() == v.tobytes()
    for u, v in ((out.residual, res), (out.converged, conv), (out.merged, merged)):
        assert u.tobytes() == v.tobytes()
    assert out.iterations == it


@pytest.mark.parametrize("rule", ["pretrain", "finetune"])
@pytest.mark.parametrize(
    "kind, T, k",
    [
        (newton.FINETUNE, 2, 2),
        (newton.FINETUNE, 3, 3),
        (newton.PRETRAIN, 2, 3),
        (newton.PRETRAIN, 3, 6),
        (newton.FINETUNE_RANK_R, 3, 6),
        (newton.SEPARABLE_QUARTIC, 0, 3),
    ],
)
def test_newton_loop_on_the_stack_equals_the_heap_loop_bit_for_bit(kind, T, k, rule):
    """For the k of STACK_K the kernel runs its Newton loop on stack arrays: every output the same bits as the loop on
    heap arrays, for the softmax potentials, the linear activation, the rank-r channel and the test potential, with
    either rule, with and without merging (a global search) and the shift-invariant pre-training channel."""
    from hdlora.theory import _newton_numba as K

    assert k in K.STACK_K
    rng = np.random.default_rng(10 * kind + k)
    n = 120
    if kind == newton.SEPARABLE_QUARTIC:
        data = rng.uniform(0.2, 2.0, (n, k))
    elif kind == newton.PRETRAIN:
        data = np.concatenate([3.0 * rng.standard_normal((n, k)), rng.dirichlet(np.ones(T), (n, T)).reshape(n, -1)], 1)
    else:
        zq = rng.standard_normal((n, T, T))
        zq = (zq + np.swapaxes(zq, 1, 2)) * rng.choice([0.3, 3.0], size=(n, 1, 1))
        data = np.concatenate([zq.reshape(n, -1), rng.dirichlet(np.ones(T), (n, T)).reshape(n, -1)], 1)
    n_aux = 1 if kind in (newton.FINETUNE, newton.FINETUNE_RANK_R) else 0
    x0, a = rng.standard_normal((n, k)), rng.standard_normal((n, k))
    w = rng.uniform(0.3, 3.0, k)
    n_merged = n_converged = 0
    for softmax in (True, False):
        for shift in (False, True) if kind == newton.PRETRAIN and softmax and rule == "pretrain" else (False,):
            r = (
                newton.NewtonRule.pretrain(1e-12, 60, 1.0, shift_invariant=shift)
                if rule == "pretrain"
                else newton.NewtonRule.finetune(1e-12, 60, 1.0)
            )
            first = newton.minimise(kind, x0, a, w, data, T, softmax, r, n_aux=n_aux)
            _same_bits(first, _heap_loop(kind, x0, a, w, data, T, softmax, r, n_aux), n_aux)
            x1 = x0 + 0.5 * rng.standard_normal((n, k))
            merged = newton.minimise(kind, x1, a, w, data, T, softmax, r, n_aux=n_aux, ref=first.x, merge_radius=0.3)
            _same_bits(merged, _heap_loop(kind, x1, a, w, data, T, softmax, r, n_aux, first.x, 0.3), n_aux)
            n_merged += int(merged.merged.sum())
            n_converged += int(merged.converged.sum())
    assert n_merged > 0 and n_converged > 0  # the searches took both ways out of the loop


def test_newton_prox_runs_the_stack_loop_for_each_k_of_stack_k():
    """newton_prox's dispatch (in its source: the compiled specialisations of a cached kernel cannot be listed) runs
    _newton_on_stack at k = K for each K of STACK_K and no other, each under the guard k == K."""
    import ast
    import inspect

    from hdlora.theory import _newton_numba as K

    tree = ast.parse(inspect.getsource(K.newton_prox.py_func))
    guarded = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            (call,) = [c for c in ast.walk(node.body[0]) if isinstance(c, ast.Call)] or [None]
            if call is not None and getattr(call.func, "id", None) == "_newton_on_stack":
                assert isinstance(node.test.ops[0], ast.Eq) and node.test.left.id == "k"
                guarded[node.test.comparators[0].value] = call.args[0].value
    assert guarded == {K_: K_ for K_ in K.STACK_K}


def _quartic_global(c, a, w):
    """Global minimiser of c (x^2 - 1)^2 + (x - a)^2 / (2 w), per coordinate (real roots of the cubic)."""
    out = np.empty_like(a)
    for idx in np.ndindex(a.shape):
        ci, ai = c[idx], a[idx]
        wi = w[idx[-1]]
        roots = np.roots([4 * ci, 0.0, -4 * ci + 1 / wi, -ai / wi])
        roots = roots[np.abs(roots.imag) < 1e-9].real
        f = ci * (roots**2 - 1) ** 2 + (roots - ai) ** 2 / (2 * wi)
        out[idx] = roots[np.argmin(f)]
    return out


@pytest.mark.parametrize("k", [1, 4, 7])
@pytest.mark.parametrize("rule", ["pretrain", "finetune"])
def test_generic_k_separable_prox_reaches_the_known_global_maximum(k, rule):
    rng = np.random.default_rng(k)
    n = 300
    c = rng.uniform(0.2, 2.0, (n, k))
    a = 2.0 * rng.standard_normal((n, k))
    w = rng.uniform(0.2, 3.0, k)
    xg = _quartic_global(c, a, w)
    # started at the global minimiser's sign (the basin is then the global one: f is separable)
    x0 = np.sign(xg) * 1.5
    r = (
        newton.NewtonRule.pretrain(1e-12, 100, 1.0)
        if rule == "pretrain"
        else newton.NewtonRule.finetune(1e-12, 100, 1.0)
    )
    out = newton.minimise(newton.SEPARABLE_QUARTIC, x0, a, w, c, 0, False, r)
    assert out.converged.all()
    np.testing.assert_allclose(out.x, xg, atol=1e-8)
    gf = out.grad + (out.x - a) / w  # stationarity of f (stop 'step': one step before x)
    assert np.abs(gf).max() < 1e-6
    f_ref = (c * (xg**2 - 1) ** 2 + (xg - a) ** 2 / (2 * w)).sum(axis=1)
    f_x = (c * (out.x**2 - 1) ** 2 + (out.x - a) ** 2 / (2 * w)).sum(axis=1)
    assert np.all(f_x <= f_ref + 1e-12 * (1 + np.abs(f_ref)))


@pytest.mark.parametrize("rule", ["pretrain", "finetune"])
def test_merge_stops_only_the_starts_heading_to_the_reference(rule):
    """A start on its way to ``ref`` stops there (merged, not converged, fewer steps); a start in
    another basin is not touched and reaches its own minimiser."""
    rng = np.random.default_rng(5)
    n, k = 400, 3
    c = rng.uniform(2.0, 4.0, (n, k))
    a = 0.1 * rng.standard_normal((n, k))
    w = rng.uniform(0.5, 1.0, k)  # 1/w < 4c: two wells per coordinate, near +1 and -1
    r = (
        newton.NewtonRule.pretrain(1e-12, 100, 1.0)
        if rule == "pretrain"
        else newton.NewtonRule.finetune(1e-12, 100, 1.0)
    )
    plus = newton.minimise(newton.SEPARABLE_QUARTIC, np.full((n, k), 1.3), a, w, c, 0, False, r)
    assert plus.converged.all() and not plus.merged.any()
    same = newton.minimise(newton.SEPARABLE_QUARTIC, np.full((n, k), 2.5), a, w, c, 0, False, r, ref=plus.x)
    alone = newton.minimise(newton.SEPARABLE_QUARTIC, np.full((n, k), 2.5), a, w, c, 0, False, r)
    assert same.merged.all() and not same.converged.any()
    assert np.abs(same.x - plus.x).max() <= 1e-2 * (1 + np.abs(plus.x).max() * np.sqrt(k))
    assert same.iterations < alone.iterations
    other = newton.minimise(newton.SEPARABLE_QUARTIC, np.full((n, k), -1.3), a, w, c, 0, False, r, ref=plus.x)
    ref_free = newton.minimise(newton.SEPARABLE_QUARTIC, np.full((n, k), -1.3), a, w, c, 0, False, r)
    assert not other.merged.any() and other.converged.all()
    np.testing.assert_array_equal(other.x, ref_free.x)
    with pytest.raises(ValueError, match="ref"):
        newton.minimise(newton.SEPARABLE_QUARTIC, np.ones((n, k)), a, w, c, 0, False, r, ref=np.ones((2, k)))


def test_finetune_global_search_keeps_the_same_maxima_with_merging(monkeypatch):
    """Merging the global search's starts changes its cost, not the maxima it keeps."""
    T, v, act = 3, 0.6, "softmax"
    _, Zq, Ya, ct = _finetune_batch(3000, T, 9)
    Y = get_activation(act, "numpy")(Ya)
    merged = F.prox_psi(ct, Zq, Y, v, act, Y_arg=Ya)
    monkeypatch.setattr(F, "MERGE_RADIUS", 0.0)
    full = F.prox_psi(ct, Zq, Y, v, act, Y_arg=Ya)
    assert full.n_start_changed > 0  # the search finds other maxima at this point
    np.testing.assert_array_equal(merged.x, full.x)
    np.testing.assert_array_equal(merged.value, full.value)
    assert merged.n_start_changed == full.n_start_changed


@pytest.mark.parametrize("T", [2, 3])
def test_pretrain_prox_is_stationary_and_not_below_a_quasi_newton_polish(T):
    fl = frozen_fields(60, T, 2.25, 0.8, 0.7, seed=7)
    zs, zt, V = fl["z_star"], fl["z"], 0.8
    r = P.prox(zs, zt, V)
    assert r.all_converged
    _, g, _ = P.pretrain_potential_derivatives(r.x, zs, zt, V)
    assert np.abs(V * 2 * g).max() < 1e-8
    for i in range(zs.shape[0]):
        for x0 in (zt[i], zs[i]):  # the starts of prox(): z~ and z*
            res = minimize(
                lambda x: -P.pretrain_potential(x[None], zs[i : i + 1], zt[i : i + 1], V)[0],
                x0,
                method="BFGS",
                options={"gtol": 1e-10},
            )
            assert -res.fun <= r.value[i] + 1e-10 * (1 + abs(r.value[i]))


def test_finetune_prox_is_stationary_and_not_below_a_quasi_newton_polish():
    T, v, act = 3, 0.8, "softmax"
    _, Zq, Ya, ct = _finetune_batch(60, T, 8)
    Y = get_activation(act, "numpy")(Ya)
    pr = F.prox_psi(ct, Zq, Y, v, act, Y_arg=Ya)
    assert pr.n_failed == 0 and pr.n_not_max == 0
    _, g, _, _ = F.finetune_potential_derivatives(pr.x, Zq, Y, ct, v, act)
    assert np.abs(g * v).max() < 1e-7
    for i in range(ct.shape[0]):

        def mpsi(c):
            return -F.finetune_potential_derivatives(
                c[None], Zq[i : i + 1], Y[i : i + 1], ct[i : i + 1], v, act, order=0
            )[0]

        res = minimize(mpsi, ct[i], method="BFGS", options={"gtol": 1e-10})
        assert -res.fun <= pr.value[i] + 1e-9 * (1 + abs(pr.value[i]))


# ---------------------------------------------------------------- lazy import
def _fresh_process_json(code: str):
    """Run ``code`` in a fresh Python process; the JSON of its last line of output."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warmup_compiles_every_kernel_entry_point_the_solvers_call():
    """After warmup() no solve compiles anything more (benchmarks exclude compilation by calling it first): in a fresh
    process, the kernel's entry points have the same compiled signatures before and after softmax (T = 2, 3, reuse),
    linear and rank-r solves (evaluate_batch, which no solver calls, is left to its first use)."""
    code = (
        "import json\n"
        "from hdlora import Params\n"
        "from hdlora.theory import newton, solve\n"
        "newton.warmup()\n"
        "K = newton.kernel()\n"
        "names = ('newton_prox', 'pretrain_post', 'evaluate_batch')\n"
        "sigs = lambda: {n: sorted(map(str, getattr(K, n).signatures)) for n in names}\n"
        "before = sigs()\n"
        "base = dict(alpha=0.2, alpha_ft=3, kappa0=0.5, kappa=1, noise=0.5, lam=0.3, lam_ft=0.5)\n"
        "for extra in ({'tokens': 3}, {'tokens': 2, 'reuse': True}, {'tokens': 2, 'activation': 'linear', 'reuse': True},\n"
        "              {'tokens': 3, 'activation': 'linear'}, {'tokens': 2, 'lora_rank': 2, 'teacher_rank': 1}):\n"
        "    solve(Params(**base, **extra), n_mc=400, max_iter=3, warn=False)\n"
        "print(json.dumps([before, sigs()]))\n"
    )
    before, after = _fresh_process_json(code)
    assert before["newton_prox"] and before["pretrain_post"]  # compiled (or loaded) by warmup
    assert after == before


def test_linear_solve_and_theory_import_do_not_import_numba():
    # (the linear fine-tuning prox is the NumPy secular solve: a compiled one was measured 2x faster per
    # call, 4 ms vs 8 ms at 3e4 samples, but importing numba and loading its cache costs ~0.8 s a process)
    code = (
        "import sys, json\n"
        "import hdlora.theory\n"
        "from hdlora import Params\n"
        "from hdlora.theory import solve\n"
        "r = solve(Params(alpha=0.1, alpha_ft=3, tokens=3, noise=0.5, lam=0.1, lam_ft=0.5, activation='linear'),"
        " n_mc=2000, warn=False)\n"
        "print(json.dumps({'numba': 'numba' in sys.modules, 'kernel': 'hdlora.theory._newton_numba' in sys.modules,"
        " 'ok': r.finetune_test_error > 0}))\n"
    )
    assert _fresh_process_json(code) == {"numba": False, "kernel": False, "ok": True}
