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
# # Reproducing a figure from the results database, and reading the table with pandas and xarray
#
# A figure of hdlora is one or more **sweeps** (a grid of parameter points and what to run at
# each: theory, simulation, baselines) that share one **SQLite results database**. Every
# finished task is a row of that database, keyed by its parameters, options and code version,
# so a rerun computes only what is missing, and the plots are drawn from the stored rows.
#
# This notebook remakes the paper's Fig. 5 (linear σ: E' against the effective noise Δ_eff on
# an effective pre-training), reads the database back as a pandas table and as an xarray
# dataset, draws its own plot from them, exports CSV / netCDF, and runs a small sweep of its own.
#
# The command line does the same: `hdlora figure 5 --quick --out results/notebook_fig5`, and
# `hdlora sweep FILE.toml --export out.csv|out.nc` for a sweep file.
#
# **Sizes.** The stored outputs use the `quick` mode of `hdlora figure` (simulations at D = 200,
# 2 seeds). CI executes a copy with `HDLORA_NB_SMALL=1`, which selects the `tiny` mode (D = 12,
# one seed, two points per line): the code paths are the same, the numbers are not.

# %%
import os
from pathlib import Path

SMALL = os.environ.get("HDLORA_NB_SMALL", "0") not in ("", "0")
MODE = "tiny" if SMALL else "quick"
WORKERS = 1 if SMALL else 2           # 1 runs the tasks in this process; more use a local process pool
OUT = Path("results") / "notebook_fig5"
print(f"small mode: {SMALL}; figure mode {MODE!r}, {WORKERS} worker(s), output in {OUT}/")

# %% [markdown]
# ## The figure's sweeps
#
# `build_figure` validates every parameter point of every sweep and runs nothing. Each sweep is
# also a TOML document, written next to the figure when it runs so that it can be rerun or
# extended by hand with `hdlora sweep`.

# %%
from hdlora.experiments.figures import build_figure, figure_frame, plot_figure, run_figure, toml_text

fig = build_figure(5, mode=MODE, out=OUT)
print(fig.title)
print(fig.settings)
for spec in fig.sweeps:
    print(f"- {spec.name}: axes {dict(spec.axes)}, runs {[r.kind.split(':')[-1] for r in spec.runs]}")
doc = dict(fig.docs[0])
doc["sweep"] = {k: v for k, v in doc["sweep"].items() if k != "database"}   # (an absolute path: left out here)
print()
print(toml_text(doc))

# %% [markdown]
# ## Running it: every task is stored as it finishes
#
# The second call finds everything in the database and computes nothing (`n_computed = 0`):
# an interrupted figure resumes where it stopped.

# %%
import time

t0 = time.perf_counter()
reports = run_figure(fig, workers=WORKERS, progress=False)
print(f"first run: {time.perf_counter() - t0:.1f} s")
for rep in reports:
    print(f"  computed {rep.n_computed} of {rep.n_tasks} tasks, failed {rep.n_failed}, "
          f"not converged {rep.n_not_converged}")
again = run_figure(fig, workers=WORKERS, progress=False)
print("second run computed:", [rep.n_computed for rep in again])

# %% [markdown]
# ## The figure, drawn from the stored rows
#
# `plot_figure` writes PNG, PDF and the plotted data as CSV next to the database.

# %%
from IPython.display import Image

paths = plot_figure(fig)
print({k: str(v) for k, v in paths.items()})
Image(filename=str(paths["png"]), width=900)

# %% [markdown]
# ## The table with pandas
#
# `figure_frame` returns every stored row of the figure as one tidy DataFrame: a `sweep` and a
# `label` column, the parameters of the grid point, the options, the status, then every scalar
# result (nested results flattened with dots). Theory rows carry `converged`, `residual` and
# `iterations`; simulation rows carry seed means and `<key>_se` standard errors.

# %%
df = figure_frame(fig)
print(df.shape, "columns include:", [c for c in df.columns if c in ("converged", "residual", "iterations",
                                                                     "finetune_test_error_se", "n_seeds")])
theory = df[(df["sweep"] == "fig5-theory") & (df["status"] == "ok")]
theory[["alpha_ft", "kappa0", "delta_eff", "finetune_test_error", "overlap", "converged", "iterations"]].round(4)

# %%
sims = df[(df["sweep"] == "fig5-simulate") & (df["status"] == "ok")]
sims[["alpha_ft", "kappa0", "dim", "n_seeds", "delta_eff_law", "finetune_test_error",
      "finetune_test_error_se"]].round(4)

# %% [markdown]
# ## The same sweep as an xarray Dataset
#
# `sweep_dataset` lays one sweep on its grid: dimensions `label` × the sweep's axes, one float
# variable per numeric result (NaN where a task is missing or failed), a `status` variable, and
# the fixed parameters as attributes.

# %%
from hdlora.experiments.sweep import sweep_dataset

ds_th = sweep_dataset(fig.sweep("fig5-theory"))
ds_sim = sweep_dataset(fig.sweep("fig5-simulate"))
ds_th

# %% [markdown]
# Selecting is by coordinate value. Our own plot of the left panel: theory lines (points whose
# state evolution did not converge are left out of the line) and simulation markers with the
# standard deviation over seeds as error bars, as in the paper.

# %%
# plot_figure above switched matplotlib to its file backend (Agg): back to inline plots
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np

th = ds_th.isel(label=0).sel(noise=0.0)
sm = ds_sim.isel(label=0).sel(noise=0.0)
fig_ax, ax = plt.subplots(figsize=(5.5, 3.8))
for a, color in zip(th["alpha_ft"].values, ["C0", "C1", "C2"]):
    t = th.sel(alpha_ft=a)
    ok = t["converged"] == 1
    ax.plot(t["delta_eff"].where(ok), t["finetune_test_error"].where(ok), "-", color=color, label=f"theory α' = {a:g}")
    s = sm.sel(alpha_ft=a)
    std = s["finetune_test_error_se"] * np.sqrt(s["n_seeds"])
    ax.errorbar(s["delta_eff_law"], s["finetune_test_error"], yerr=std, fmt="o", mfc="none", color=color, capsize=2)
ax.set(xlabel="Δ_eff = Δ/2 + 2 κ0   (M = 1, Q0 = Q)", ylabel="E'", title="Fig. 5, Δ = 0 (dots: simulations)")
ax.legend()
plt.show()

# %% [markdown]
# ## Export: CSV (pandas) and netCDF (xarray)
#
# `export` writes the tidy table (`.csv`) or the dataset (`.nc`, through h5netcdf), as
# `hdlora sweep FILE --export` does. Both read back with the usual tools.

# %%
import pandas as pd
import xarray as xr

from hdlora.experiments.sweep import export

csv = export(fig.sweep("fig5-theory"), OUT / "fig5_theory.csv")
nc = export(fig.sweep("fig5-theory"), OUT / "fig5_theory.nc")
back_df = pd.read_csv(csv)
with xr.open_dataset(nc, engine="h5netcdf") as back_ds:
    same = bool(np.allclose(back_ds["finetune_test_error"].values, ds_th["finetune_test_error"].values,
                            equal_nan=True))
print(f"{csv}: {back_df.shape[0]} rows; {nc}: E' identical to the in-memory dataset: {same}")

# %% [markdown]
# ## A sweep of your own
#
# A sweep document (here a TOML string; usually a file, see `sweeps/` in the repository) names
# the fixed parameters, the axes and what to run. Theory points along the `continuation` axis
# are warm-started from their neighbour. `run_sweep` stores each result in the database named
# by the document; `sweep_frame` reads them back.

# %%
try:
    import tomllib                      # Python >= 3.11
except ModuleNotFoundError:
    import tomli as tomllib

from hdlora.experiments.sweep import parse_sweep, run_sweep, sweep_frame

num = 4 if SMALL else 10
text = f"""
[sweep]
name = "lam-scan"
database = "lam_scan.sqlite"
continuation = "lam"

[params]
alpha = 0.2
alpha_ft = 2.0
tokens = 2
activation = "linear"
lam_ft = 0.5

[axes]
lam = {{start = 0.001, stop = 10.0, num = {num}, log = true}}
noise = [0.0, 1.0]

[run]
baselines = ["frozen"]

[run.theory]
n_mc = 2000
"""
spec = parse_sweep(tomllib.loads(text), source="notebook", base_dir=OUT)
report = run_sweep(spec, workers=1, progress=False)
print(f"{report.n_computed} tasks computed in {report.wall_s:.1f} s; database {spec.database}")
scan = sweep_frame(spec)
wide = scan.pivot_table(index="lam", columns=["label", "noise"], values="finetune_test_error")
wide.round(4)

# %%
fig_ax, ax = plt.subplots(figsize=(5.5, 3.5))
for (label, noise), col in wide.items():
    ax.plot(wide.index, col, "-" if label == "theory" else "--", label=f"{label}, Δ = {noise:g}")
ax.set(xscale="log", xlabel="λ", ylabel="E'", title="linear σ, T = 2, α = 0.2, α' = 2, λ' = 0.5")
ax.legend()
plt.show()
