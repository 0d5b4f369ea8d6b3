"""Finite-dimension simulator: pre-training (eq. 2) + rank-one LoRA (eq. 3) by L-BFGS.

``run(params, dim, seeds)`` averages :func:`run_seed` over seeds; see
:mod:`hdlora.simulate.run` for the keys.
"""
from .run import (ACTIVE_KEYS, EFFECTIVE_NAN_KEYS, KEYS, OPTIMAL_BETA, ConvergenceWarning, SimulationResult,
                  resolve_device, run, run_seed, theory_beta_star)

__all__ = ["run", "run_seed", "SimulationResult", "KEYS", "ACTIVE_KEYS", "EFFECTIVE_NAN_KEYS", "OPTIMAL_BETA",
           "ConvergenceWarning", "resolve_device", "theory_beta_star"]
