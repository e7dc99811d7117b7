"""Seeds derived from a tuple of integers, stable across processes, machines and Python runs.

Python's `hash()` is salted per process and `seed + epoch` collides (seed 1 epoch 0 == seed 0 epoch 1),
so shuffles and noise derive their generator seeds from a cryptographic hash of all their inputs.
"""

from __future__ import annotations

import hashlib

import torch


def stable_seed(*parts: int) -> int:
    """Return a 63-bit seed that depends on every integer in `parts` (order matters)."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def seeded_generator(*parts: int) -> torch.Generator:
    """Return a CPU torch.Generator seeded with stable_seed(*parts)."""
    generator = torch.Generator()
    generator.manual_seed(stable_seed(*parts))
    return generator
