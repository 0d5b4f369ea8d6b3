"""Benchmark of the spectral input channel (theory/spectral.py): time per J call and accuracy.

Prints one JSON object.  Run: .venv/bin/python benchmarks/bench_spectral.py
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from hdlora.theory import spectral as sp


def _time(fn, repeat: int = 5, number: int = 20) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def main() -> None:
    grid = [(k, eta, eps) for k in (0.5, 1.0, 2.0) for eta in (1e-3, 0.05, 0.3, 1.0) for eps in (0.0, 0.3, 1.5)]
    j_times = [_time(lambda k=k, eta=eta, eps=eps: sp.J(eta, eps, k)) for k, eta, eps in grid]
    moment_err = 0.0
    fd_err = 0.0
    h = 1e-5
    for k, eta, eps in grid:
        m = [sp.expectation(f, eta, k).value for f in (np.ones_like, lambda x: x, lambda x: x * x)]
        moment_err = max(moment_err, abs(m[0] - 1), abs(m[1] - math.sqrt(k)), abs(m[2] - 1 - k - eta**2))
        r = sp.J(eta, eps, k)
        fd1 = (sp.J(eta + h, eps, k).J - sp.J(eta - h, eps, k).J) / (2 * h)
        fd2 = (sp.J(eta, eps + h, k).J - sp.J(eta, eps - h, k).J) / (2 * h)
        fd_err = max(fd_err, abs(r.J1 - fd1), abs(r.J2 - fd2))
    out = {
        "J_ms_median": 1e3 * float(np.median(j_times)),
        "J_ms_max": 1e3 * float(np.max(j_times)),
        "J_points": len(grid),
        "replicon_ms": 1e3 * _time(lambda: sp.replicon_integral(0.3, 0.5, 1.0), repeat=3, number=3),
        "cubic_integral_ms": 1e3 * _time(lambda: sp.cubic_integral(0.3, 1.0)),
        "max_moment_error": moment_err,
        "max_J1_J2_minus_central_fd_h1e-5": fd_err,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
