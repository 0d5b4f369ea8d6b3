"""Finite-dimension simulator: pre-training (eq. 2) + rank-one LoRA (eq. 3) by L-BFGS.

``run(params, dim, seeds)`` averages :func:`run_seed` over seeds; see
:mod:`hdlora.simulate.run` for the keys.
"""
from .run import EFFECTIVE_NAN_KEYS, KEYS, ConvergenceWarning, SimulationResult, resolve_device, run, run_seed

__all__ = ["run", "run_seed", "SimulationResult", "KEYS", "EFFECTIVE_NAN_KEYS", "ConvergenceWarning",
           "resolve_device"]
