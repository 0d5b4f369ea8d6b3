"""Old vs new simulator results at small D (the numbers in docs/benchmarks/token_storage_old_vs_new.json).

Prints one JSON object: E', E'', E, o_w, q, m, iterations and objective of run_seed for seeds 0..3 in
the effective mode (alpha' = 10, T = 3, softmax, Delta = 2, kappa0 = 0.5) at D = 150 and 300, and
(float64 / default only) the Fig. 1 full pipeline at D = 150.

Usage (one process per variant, compare the outputs):
    PYTHONPATH=<checkout of the old commit>/src python benchmarks/compare_token_storage.py > old.json
    python benchmarks/compare_token_storage.py [float64|float32|regenerate] > new.json
"""

import json
import sys
import warnings

import torch

torch.set_num_threads(1)
warnings.simplefilter("ignore")
# the thread count is set before hdlora is imported
from hdlora import Params  # noqa: E402
from hdlora.simulate import run_seed  # noqa: E402

storage = sys.argv[1] if len(sys.argv) > 1 else None
keys = (
    "finetune_test_error",
    "forgetting_error",
    "pretrain_test_error",
    "overlap",
    "q",
    "m",
    "finetune_iterations",
    "finetune_objective",
)
out = {}
EFF = dict(tokens=3, lam_ft=0.5, activation="softmax", alpha=0.1, lam=0.1, alpha_ft=10.0, noise=2.0, kappa0=0.5)
FIG1 = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
for D in (150, 300):
    for s in range(4):
        kw = {} if storage is None else {"token_storage": storage}
        r = run_seed(Params(**EFF), D, s, effective={"Q0": 0.5, "Q": 0.5, "M": 1.0 * 0.5**0.5 * 0.9}, **kw)
        out[f"eff D={D} seed={s}"] = {k: r[k] for k in keys}
for s in range(4):
    if storage not in (None, "float64"):
        break
    r = run_seed(Params(**FIG1), 150, s)
    out[f"full D=150 seed={s}"] = {k: r[k] for k in keys}
print(json.dumps(out))
