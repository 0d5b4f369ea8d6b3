"""hdlora: theory and simulation of LoRA fine-tuning in a solvable attention model.

Implements arXiv 2606.05899 ("High-Dimensional Theory of LoRA Fine-Tuning in a
Solvable Attention Model"): the finite-D simulator (:mod:`hdlora.simulate`),
the state evolutions (:mod:`hdlora.theory`) and the experiments
(:mod:`hdlora.experiments`).
"""

from ._version import __version__, code_version
from .params import ParamError, Params

__all__ = ["Params", "ParamError", "__version__", "code_version"]
