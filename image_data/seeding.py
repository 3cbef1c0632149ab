"""Random draws that are pure functions of a key, never of the global RNG (docs/DATA.md: why)."""
from __future__ import annotations

import hashlib

import numpy as np


def derived_rng(tag: str, *key: int) -> np.random.Generator:
    """A generator that is a pure function of (tag, *key): no global RNG, no collisions between keys."""
    text = ":".join([tag, *(str(int(k)) for k in key)])
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))
