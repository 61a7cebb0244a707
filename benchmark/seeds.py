"""Seeds derived from integer keys: a run's seed with a step, an epoch, a sample or a rank."""
from __future__ import annotations

import numpy as np


def derive_seed(*keys: int, bits: int = 32) -> int:
    """A seed of ``bits`` bits that depends on every key and on their order: (0, 1) and
    (1, 0) give unrelated seeds, and no key's seed follows from another's."""
    words = -(-bits // 32)
    state = np.random.SeedSequence(list(keys)).generate_state(words, dtype=np.uint32)
    value = 0
    for word in state:
        value = value << 32 | int(word)
    return value >> (32 * words - bits)
