"""The one seeding entry point: derive independent, reproducible streams from a user seed.

Nothing reseeds the global RNG behind the caller's back; model initialisation
runs inside ``torch.random.fork_rng`` so it neither reads nor disturbs the
global state.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys`` (e.g. expert index), independent of the others."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator; draw on the CPU and move to the device so every device sees the same numbers."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


@contextlib.contextmanager
def seeded(seed: int, *keys: int):
    """Run a block (typically ``create_model``) with the global CPU RNG seeded, then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *keys))
        yield
