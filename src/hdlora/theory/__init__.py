"""The sharp asymptotic theory: state evolutions of pre-training (Result 4) and
fine-tuning (Result 5), errors (Result 3), effective noises, baselines,
Bayes-optimal benchmarks and stability.  ``solve(params)`` is the entry point.
"""
from .solve import BASELINES, TheoryResult, solve

__all__ = ["solve", "TheoryResult", "BASELINES"]
