"""Named random streams for the theory: one generator per (seed, purpose), never seed offsets.

The theory used to derive its Monte-Carlo samples from seed offsets (``seed + 1`` for the
fine-tuning fields, ``seed + 2`` for the rank-one normals, ``seed + 7919`` / ``seed + 104729``
for the test samples, ...), so ``solve(seed=s)`` drew its fine-tuning fields from the normals
``solve(seed=s + 1)`` used for pre-training and "independent" seeds shared random numbers.
Here a purpose is a fixed spawn key of :class:`numpy.random.SeedSequence`:
``SeedSequence(seed, spawn_key=(KEY[purpose],))`` hashes (seed, key) together, so two streams
coincide only if both the seed and the purpose do (the same construction as the simulator's
torch streams in :func:`hdlora.data.generator`).

Every Monte-Carlo draw of the theory goes through a stream (``purpose=`` of
:func:`hdlora.theory.sampling.standard_normals` / ``frozen_fields``): ``solve(seed=s)`` draws its
pre-training samples from (s, 'pretrain'), its fine-tuning fields from (s, 'finetune_fields'), the
rank-one normals of eq. 62 from (s, 'finetune') and its test samples from (s, 'test') and
(s, 'test_rank_one'); replicas at different seeds share no draws.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PURPOSES", "seed_sequence", "stream"]

#: purpose -> spawn key.  Fixed forever: changing a key changes every draw of that purpose.
PURPOSES: dict[str, int] = {
    "pretrain": 1,  # pre-training state evolution samples (g, zeta of eq. 47)
    "finetune_fields": 2,  # fine-tuning side fields (z*, z) from the law Q or R (eqs. 13, 17)
    "finetune": 3,  # fine-tuning rank-one normals (chi*, zeta of eq. 62)
    "test": 4,  # test-error fields (eqs. 55, 73)
    "test_rank_one": 5,  # rank-one normals of the test errors
    "bayes": 6,  # Bayes-optimal state evolution samples (App. B)
    "bayes_rank_one": 7,  # Bayes-optimal fine-tuning rank-one normals
    "active": 8,  # active-learning pool fields
    "effective": 9,  # effective pre-training fields
    "figures": 10,  # figure-level draws (e.g. the effective solve of the figures)
    "branch_starts": 11,  # random parts of the rank-r branch starts
}


def _check(seed: int, purpose: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream purpose {purpose!r}; known: {sorted(PURPOSES)}")


def seed_sequence(seed: int, purpose: str) -> np.random.SeedSequence:
    """The SeedSequence of (seed, purpose); pass it where a seed is expected (e.g. ``qmc.Sobol(seed=...)``
    takes a Generator: use :func:`stream`)."""
    _check(seed, purpose)
    return np.random.SeedSequence(int(seed), spawn_key=(PURPOSES[purpose],))


def stream(seed: int, purpose: str) -> np.random.Generator:
    """A PCG64 generator determined by (seed, purpose) only."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose)))
