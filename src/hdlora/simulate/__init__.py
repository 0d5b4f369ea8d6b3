"""Finite-dimension simulator: pre-training (eq. 2) + LoRA (eq. 3; rank one, or rank r beyond the paper) by L-BFGS.

``run(params, dim, seeds)`` averages :func:`run_seed` over seeds; see
:mod:`hdlora.simulate.run` for the keys.
"""

import sys
import types

__all__ = [
    "run",
    "run_seed",
    "SimulationResult",
    "KEYS",
    "ACTIVE_KEYS",
    "VECTOR_KEYS",
    "EFFECTIVE_NAN_KEYS",
    "OPTIMAL_BETA",
    "ConvergenceWarning",
    "resolve_device",
    "theory_beta_star",
]


def _load() -> None:
    """Import :mod:`.run` (torch) and bind its public names here."""
    import importlib

    mod = importlib.import_module(".run", __name__)
    for n in __all__:
        globals()[n] = getattr(mod, n)


def __getattr__(name: str):
    """Imported on first use (PEP 562), so that ``import hdlora.simulate.cli`` does not import torch."""
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``hdlora.simulate.run`` the function when the submodule of the same name is imported."""

    def __setattr__(self, name: str, value) -> None:
        if name == "run" and isinstance(value, types.ModuleType):
            value = value.run
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
