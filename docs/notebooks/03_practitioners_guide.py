# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Practitioner's guide: choosing λ, λ' and β from the theory
#
# Three knobs decide how well the LoRA-adapted model does on the fine-tuning task:
#
# * **λ**, the ridge of pre-training (eq. 2): how much the pre-trained map Ŵ is shrunk;
# * **λ'**, the ridge of the rank-one LoRA update ŵ (eq. 3);
# * **β**, the recalibration Ŵ → √β Ŵ of the frozen map before fine-tuning (eq. 26).
#
# The state evolution predicts the errors of every choice without training anything, so the
# choice is an optimisation of a deterministic function: `hdlora.experiments.optimize.optimize`
# (the command line: `hdlora optimize`). It searches on log10 of each hyperparameter (a coarse
# grid, then bounded Brent or coordinate descent), warm-starts every solve from its nearest
# neighbour, and records every solve with its `converged` flag; a solve that did not converge is
# never chosen. Targets: `finetune_test_error` E' (minimised), `pretrain_test_error` E (λ only)
# and `overlap` o_w (maximised).
#
# **Sizes.** The stored outputs were computed at the sizes printed below; CI executes a copy with
# `HDLORA_NB_SMALL=1` (fewer Monte-Carlo samples, a coarser search, a smaller simulation).

# %%
import os
import warnings

SMALL = os.environ.get("HDLORA_NB_SMALL", "0") not in ("", "0")
N_MC = 1000 if SMALL else 10000            # Monte-Carlo samples per solve (linear sigma: fine-tuning only)
N_MC_SOFTMAX = 500 if SMALL else 3000      # softmax solves cost more
DIM, SEEDS = (30, 2) if SMALL else (80, 3)
print(f"small mode: {SMALL}; n_mc = {N_MC} (softmax {N_MC_SOFTMAX}), simulation D = {DIM}, {SEEDS} seeds")

# %% [markdown]
# ## The setting
#
# A pre-training set of N = αD² sequences, a fine-tuning set of N' = α'D sequences, noisy labels
# (Δ = 0.5), a target narrower than the student (κ0 = 0.5). We start with the linear activation
# σ(x) = x/T, where a solve takes a fraction of a second.

# %%
from hdlora import Params
from hdlora.experiments.optimize import DEFAULT_BOUNDS, optimize
from hdlora.theory import solve

p = Params(alpha=0.2, alpha_ft=2, tokens=2, kappa0=0.5, noise=0.5, lam=1.0, lam_ft=2.0, activation="linear")
print(p)
print("default search intervals:", DEFAULT_BOUNDS)
base = solve(p, n_mc=N_MC)
print(f"at the defaults lam = {p.lam}, lam' = {p.lam_ft}: E' = {base.finetune_test_error:.4f}")

# %% [markdown]
# ## λ alone
#
# The result says where the optimum is, the value there with its Monte-Carlo standard error
# (`value_se`; 0 where closed forms are used), whether the optimum's solve converged, whether
# every solve did, and whether the optimum lies at a bound of the search interval (then the true
# optimum may be outside it: widen `bounds`).

# %%
r_lam = optimize(p, "finetune_test_error", "lam", n_mc=N_MC)
print(f"optimum {r_lam.optimum}, E' = {r_lam.value:.4f} (se {r_lam.value_se:.1e})")
print(f"converged: {r_lam.converged}, all solves converged: {r_lam.all_converged}, at a bound: {r_lam.at_bound}, "
      f"{r_lam.n_solves} solves in {r_lam.wall_time:.1f} s")

# %% [markdown]
# Every solve is in `records` (point, value, converged, iterations, phase): the coarse grid shows
# the shape of the objective, the refinement where Brent went.

# %%
import matplotlib.pyplot as plt
import pandas as pd

rec = pd.DataFrame([{**r.point, "E'": r.value, "converged": r.converged, "phase": r.phase} for r in r_lam.records])
fig, ax = plt.subplots(figsize=(5.5, 3.5))
for phase, marker in (("grid", "o"), ("refine", "x")):
    d = rec[rec["phase"].str.startswith(phase)].sort_values("lam")
    ax.plot(d["lam"], d["E'"], marker, ls="-" if phase == "grid" else "", label=phase)
ax.axvline(r_lam.optimum["lam"], color="gray", ls=":", label="optimum")
ax.set(xscale="log", xlabel="λ", ylabel="E'", title=f"linear σ, λ' = {p.lam_ft}")
ax.legend()
plt.show()

# %% [markdown]
# ## λ and λ' together
#
# A product grid, then coordinate descent.

# %%
r_2d = optimize(p, "finetune_test_error", ("lam", "lam_ft"), n_mc=N_MC)
print(f"optimum {r_2d.optimum}, E' = {r_2d.value:.4f}; at a bound: {r_2d.at_bound}; "
      f"{r_2d.n_solves} solves ({r_2d.n_not_converged} not converged) in {r_2d.wall_time:.1f} s")
pts = pd.DataFrame([{**r.point, "E'": r.value} for r in r_2d.records if r.converged])
fig, ax = plt.subplots(figsize=(5, 4))
sc = ax.scatter(pts["lam"], pts["lam_ft"], c=pts["E'"], cmap="viridis", s=25)
ax.plot(r_2d.optimum["lam"], r_2d.optimum["lam_ft"], "r*", ms=14, label="optimum")
fig.colorbar(sc, label="E'")
ax.set(xscale="log", yscale="log", xlabel="λ", ylabel="λ'", title="every converged solve of the search")
ax.legend()
plt.show()

# %% [markdown]
# ## The recalibration β
#
# Recalibration rescales the frozen pre-trained map before fine-tuning. The theory gives
# β* = M/Q (eq. 26), the β that minimises the effective noise Δ_eff seen by fine-tuning
# (`beta_min` of the theory result); `optimize` over β minimises E' itself. β matters when
# pre-training is under-regularised: here λ = 0.005 (as in the paper's Fig. 6).

# %%
p_small_lam = p.replace(lam=0.005)
at_one = solve(p_small_lam, n_mc=N_MC)
at_star = solve(p_small_lam, n_mc=N_MC, optimal_beta=True)
r_beta = optimize(p_small_lam, "finetune_test_error", "beta", n_mc=N_MC)
print(f"lam = 0.005: beta* = M/Q = {at_one.beta_min:.3f}")
print(f"  E'(beta = 1)        = {at_one.finetune_test_error:.4f}")
print(f"  E'(beta = beta*)    = {at_star.finetune_test_error:.4f}")
print(f"  E' minimised over beta: beta = {r_beta.optimum['beta']:.3f}, E' = {r_beta.value:.4f} "
      f"(at a bound: {r_beta.at_bound['beta']})")
print(f"for comparison, the best lam at beta = 1 gave E' = {r_lam.value:.4f}")

# %% [markdown]
# ## The three at once, and another target
#
# `over` takes up to the three names. The overlap o_w = m/√(q q0) between the LoRA update and the
# teacher's is maximised instead of an error with `target="overlap"`: its optimum need not be
# the error's.

# %%
r_3d = optimize(p, "finetune_test_error", ("lam", "lam_ft", "beta"), n_mc=N_MC)
r_ov = optimize(p, "overlap", ("lam", "lam_ft"), n_mc=N_MC)
summary = pd.DataFrame([
    {"search": "defaults", "lam": p.lam, "lam_ft": p.lam_ft, "beta": p.beta, "E'": base.finetune_test_error,
     "overlap": base.overlap},
    {"search": "E' over lam", **r_lam.optimum, "E'": r_lam.value},
    {"search": "E' over lam, lam'", **r_2d.optimum, "E'": r_2d.value},
    {"search": "E' over lam, lam', beta", **r_3d.optimum, "E'": r_3d.value},
    {"search": "overlap over lam, lam'", **r_ov.optimum, "E'": r_ov.solution["finetune_test_error"],
     "overlap": r_ov.value},
]).set_index("search")
summary.round(4)

# %% [markdown]
# ### Check: each optimum re-solved from a cold start
#
# Every solve of a search is warm-started from its nearest converged neighbour, and the value a
# search reports is the one its warm-started solve reached. Re-solving the chosen point without
# `init` is a cheap check: where the two values differ, the warm start followed another fixed
# point of the state evolution than the default start reaches, and a search with more dimensions
# (coarser grid, coordinate descent) can then end above a simpler one although the simpler one's
# point lies inside its interval. Compare the searches, take the best cold value, and report
# such a case: it is a property of the solver, not of the model.

# %%
checks = []
for name, res in (("E' over lam", r_lam), ("E' over lam, lam'", r_2d), ("E' over lam, lam', beta", r_3d)):
    cold = solve(p.replace(**res.optimum), n_mc=N_MC)
    checks.append({"search": name, "E' reported by the search": res.value,
                   "E' re-solved cold": cold.finetune_test_error, "cold converged": cold.converged})
pd.DataFrame(checks).set_index("search").round(4)

# %% [markdown]
# ## Softmax attention
#
# The same call works for the softmax activation; each solve costs seconds, and the objective
# carries a Monte-Carlo error (`value_se`). The module documentation of
# `hdlora.experiments.optimize` explains the default tolerance: 0.01 on log10 is far below the
# Monte-Carlo uncertainty of the optimum's location, so refining further would optimise noise.
# A looser `tol` is enough for a first look.

# %%
ps = p.replace(activation="softmax")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r_soft = optimize(ps, "finetune_test_error", "lam", n_mc=N_MC_SOFTMAX, tol=0.05)
print(f"softmax: optimum {r_soft.optimum}, E' = {r_soft.value:.4f} +- {r_soft.value_se:.4f} (Monte-Carlo se), "
      f"{r_soft.n_solves} solves in {r_soft.wall_time:.1f} s")
for w in caught:
    print("warning:", w.message)
bad = [r.point for r in r_soft.records if not r.converged]
print("solves that did not converge (recorded, never chosen):", bad)

# %% [markdown]
# ## Checking the choice with a simulation
#
# The theory is a D → ∞ prediction; at a finite D a simulation checks it. Here the linear
# setting at the default λ and at the optimum of λ and λ', with the seed standard errors.

# %%
from hdlora.simulate import run

rows = []
for name, params in (("defaults", p), ("optimum (lam, lam')", p.replace(**r_2d.optimum))):
    th = solve(params, n_mc=N_MC)
    sim = run(params, dim=DIM, seeds=SEEDS)
    rows.append({"choice": name, "lam": params.lam, "lam'": params.lam_ft, "theory E'": th.finetune_test_error,
                 f"simulation E' (D = {DIM})": sim.mean["finetune_test_error"],
                 "se": sim.se["finetune_test_error"]})
pd.DataFrame(rows).set_index("choice").round(4)

# %% [markdown]
# ## Choosing the LoRA rank
#
# Beyond the paper, hdlora solves a rank-r LoRA update ŵ ∈ R^{D×r} on a rank-r* task (teacher
# columns of strengths s_k; `Params(lora_rank=r, teacher_rank=r_star, teacher_strengths=...)`,
# docs/theory/rank_r.md). `optimize` treats `lora_rank` as an integer axis: every rank of the
# interval is solved and, when λ' is searched too, λ' is tuned per rank. The result names the best
# rank and how flat the optimum is (`flat_ranks`: the ranks whose E' is within 1 % of the best).
# The command line: `hdlora optimize --over lora_rank,lam_ft --bounds lora_rank=1:4 --teacher-rank 2
# --teacher-strengths 1,0.5`. Here a rank-2 task with strengths 1 and 0.5, linear σ (fast).
# The picture for the softmax Fig. 1 setting, with simulations, is `hdlora figure rank` (README,
# "Choosing the LoRA rank").

# %%
pr = Params(alpha=0.1, alpha_ft=1.0, tokens=3, noise=0.5, lam=0.1, lam_ft=2.0, activation="linear",
            teacher_rank=2, teacher_strengths=(1.0, 0.5))
R_HI = 2 if SMALL else 3
N_MC_RANK = 300 if SMALL else 1000
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    r_rank = optimize(pr, "finetune_test_error", "lora_rank", bounds={"lora_rank": (1, R_HI)}, n_mc=N_MC_RANK)
print(f"best rank {r_rank.optimum['lora_rank']}: E' = {r_rank.value:.4f} "
      f"({r_rank.n_solves} solves, {r_rank.wall_time:.1f} s)")
print("ranks within 1 % of the best:", [(e["lora_rank"], round(e["value"], 4)) for e in r_rank.flat_ranks])
pd.DataFrame([{"r": e["lora_rank"], "E'": e["value"], "overlap": e["overlap"], "converged": e["converged"],
               "branch": e["winner"], "status": e["winner_status"]} for e in r_rank.per_rank]).set_index("r").round(4)

# %% [markdown]
# Each row is one rank-r state evolution; `status` says whether the winning branch converged and
# is replica stable (`converged_stable`), and a solve that did not converge is never chosen. To
# tune λ' per rank as well, search both: `optimize(pr, "finetune_test_error", "lora_rank,lam_ft")`
# (minutes at these sizes; each rank gets its own coarse grid and Brent search in λ').
