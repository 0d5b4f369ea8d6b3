"""Record the rank-one reference numbers of tests/simulate/test_rank_r.py (rank_one_reference.json).

Run once on commit dfcdafa (before the rank-r simulator): .venv/bin/python tests/simulate/data/make_rank_one_reference.py tests/simulate/data/rank_one_reference.json
The rank-r code must reproduce these numbers bit for bit at r = r* = 1.
"""

import json
import math
import sys
import warnings

import torch

from hdlora import Params
from hdlora.data import draw_teacher
from hdlora.simulate import run_seed

SMALL = dict(alpha=0.1, alpha_ft=3, tokens=3, kappa0=1, kappa=1, noise=0.5, lam=0.1, lam_ft=0.5)
CASES = {
    "softmax_e0": (dict(SMALL), {}),
    "linear_e1": (dict(SMALL, activation="linear", reuse=True, alpha=0.5), {}),
    "softmax_effective": (dict(SMALL), {"effective": {"Q0": 2.0, "Q": 0.8, "M": 0.9}}),
    "softmax_active": (dict(SMALL, active_pool=6.0), {}),
    "frozen": (dict(SMALL, lam_ft=math.inf), {}),
}


def clean(d):
    out = {}
    for k, v in d.items():
        if k in ("wall_time",) or isinstance(v, torch.Tensor):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            v = repr(v)
        if isinstance(v, dict):
            v = {kk: (repr(vv) if isinstance(vv, float) and not math.isfinite(vv) else vv) for kk, vv in v.items()}
        out[k] = v
    return out


def main(path):
    torch.set_num_threads(1)
    ref = {"D": 20, "seed": 1, "cases": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (p, kw) in CASES.items():
            ref["cases"][name] = {"params": p, "kwargs": kw, "result": clean(run_seed(Params(**p), 20, 1, **kw))}
    t = draw_teacher(20, 20, 3)
    ref["teacher"] = {"D": 20, "P0": 20, "seed": 3, "w_star": t.w_star.tolist(), "W_star_row0": t.W_star[0].tolist()}
    with open(path, "w") as f:
        json.dump(ref, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
