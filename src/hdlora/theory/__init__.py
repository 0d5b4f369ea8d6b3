"""The sharp asymptotic theory: state evolutions of pre-training (Result 4) and
fine-tuning (Result 5), errors (Result 3), effective noises, baselines,
Bayes-optimal benchmarks and stability.  ``solve(params)`` is the entry point.

The numerics are float64 NumPy and print nothing; outside :mod:`hdlora.theory.cli` they read
and write no files but the Numba cache of the prox kernel (next to ``_newton_numba.py``).

The names below are imported on first use (PEP 562), so that ``import
hdlora.theory.cli`` (the command line's parser) stays light.
"""

import sys
import types
from typing import Any

__all__ = ["solve", "TheoryResult", "BASELINES"]


def _load() -> None:
    import importlib

    mod = importlib.import_module(".solve", __name__)
    for n in __all__:
        globals()[n] = getattr(mod, n)


def __getattr__(name: str) -> Any:
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``hdlora.theory.solve`` the function when the submodule of the same name is imported."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "solve" and isinstance(value, types.ModuleType):
            value = value.solve
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
