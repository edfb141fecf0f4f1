"""Where every random draw of a run comes from: one seed rule, and which steps a round trains.

A sample's seed is a hash of the integers that say what the sample is (run seed, round, task,
its index over all processes), never of the batch or process it landed in; so training,
evaluation and resume agree on every image whatever the process layout.
"""
from __future__ import annotations

import hashlib
import random

__all__ = ["sample_seed", "train_step_indices"]


def sample_seed(*parts: int) -> int:
    """A 63-bit seed (a valid torch seed) from integers: nearby inputs share no noise."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def train_step_indices(train, num_steps: int, round_idx: int, seed: int) -> list[int]:
    """Which steps of the trajectory are trained this round (the same on every process):
    ``train.step_selection`` "first" (the first ``train.num_train_steps``) or "random" (a
    fresh sorted subset per round)."""
    if train.step_selection == "first":
        return list(range(train.num_train_steps))
    rng = random.Random(sample_seed(seed, round_idx, -1))
    return sorted(rng.sample(range(num_steps), train.num_train_steps))
