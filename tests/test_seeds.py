"""The one derivation of seeds from keys: every step, epoch, sample and rank draws from it, so
its values are those every stored run was trained with."""
from __future__ import annotations

import pytest

from cssbench.seeds import derive_seed


@pytest.mark.parametrize('keys, bits, seed', [
    ((0, 0), 31, 1484405855),                  # step 0 of seed 0: the model's initialisation
    ((0, 0), 32, 2968811710),                  # epoch 0 of that step: dropout
    ((0, 0), 64, 12750949206108985319),        # sample 0 in epoch 0: its augmentation
    ((7, 2, 5), 64, 13798707950439109124),
])
def test_derive_seed_gives_the_values_stored_runs_were_trained_with(keys, bits, seed):
    # Numpy's SeedSequence(keys) words, the first 'bits' of them: the derivation of cssbench
    # before these three uses shared it. Another value would make every stored run's
    # continuation differ from the uninterrupted run, and the step-0 cache's models too.
    assert derive_seed(*keys, bits=bits) == seed


def test_derive_seed_keeps_to_its_bits_and_tells_the_keys_order():
    seeds = {bits: [derive_seed(a, b, bits=bits) for a in range(20) for b in range(20)]
             for bits in (31, 32, 64)}
    for bits, values in seeds.items():
        assert all(0 <= v < 2 ** bits for v in values)
        assert len(set(values)) == len(values)          # (1, 3) and (3, 1) too
    assert max(seeds[64]) >= 2 ** 63 and max(seeds[31]) >= 2 ** 30   # all the bits are used
    assert [v >> 1 for v in seeds[32]] == seeds[31]     # one stream: fewer bits, its prefix
