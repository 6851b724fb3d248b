"""One generator per random draw, seeded from the case seed and the names of what is drawn for.

Adding or reordering candidates, signals or units then never changes another one's numbers.
"""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, *labels: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32("\0".join(labels).encode())]))
