"""Named random streams (hdlora.theory.streams): different (seed, purpose) never share draws."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hdlora.theory.streams import PURPOSES, seed_sequence, stream


def test_same_seed_and_purpose_reproduce():
    a = stream(3, "finetune").standard_normal(50)
    b = stream(3, "finetune").standard_normal(50)
    assert np.array_equal(a, b)


def test_no_two_seed_purpose_pairs_share_draws():
    # in particular (s, a) vs (s + 1, b): the seed-offset scheme made solve(seed=s)'s fine-tuning draws
    # equal to solve(seed=s + 1)'s pre-training draws
    keys = list(itertools.product(range(8), PURPOSES))
    draws = {k: stream(*k).standard_normal(16) for k in keys}
    for k1, k2 in itertools.combinations(keys, 2):
        assert not np.any(np.isin(draws[k1], draws[k2])), (k1, k2)
    for s in range(7):
        for a, b in itertools.product(PURPOSES, PURPOSES):
            assert not np.allclose(draws[(s, a)], draws[(s + 1, b)])


def test_purposes_have_distinct_keys_and_stream_is_the_sequence():
    assert len(set(PURPOSES.values())) == len(PURPOSES)
    g = np.random.default_rng(seed_sequence(2, "bayes"))
    assert np.array_equal(g.random(5), stream(2, "bayes").random(5))


@pytest.mark.parametrize(
    "seed, purpose, msg", [(-1, "test", "seed"), (1.5, "test", "seed"), (True, "test", "seed"), (0, "nope", "purpose")]
)
def test_bad_input_refused(seed, purpose, msg):
    with pytest.raises(ValueError, match=msg):
        stream(seed, purpose)
