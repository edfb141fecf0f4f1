"""Measurements of the demo: task rewards of any adapter, and the OPD gradient estimators' spread.

Everything here uses the library's own pieces (``rollout``, ``Policy.decode``, the reward
registry, ``losses.opd_kl`` / ``losses.opd_ppo_surrogate``) with fixed seeds, so the numbers are
deterministic under the seed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..models.base import STUDENT, Policy
from ..rewards import load_reward
from ..rollout import rollout
from . import world


def eval_seeds(task_index: int, n: int, seed: int) -> list[int]:
    """Fixed seeds of the held-out evaluation (never used in training: training seeds are hashes)."""
    return [10_000_000 * (task_index + 1) + 1000 * seed + i for i in range(n)]


@torch.no_grad()
def task_rewards(policy: Policy, adapter: str, *, samples_per_prompt: int, num_steps: int, guidance_scale: float,
                 seed: int, resolution: int = 16) -> dict[str, float]:
    """Mean reward of ``adapter`` on every task's prompts (ODE sampling, fixed seeds)."""
    out = {}
    for t_idx, (task, (reward, prompts)) in enumerate(world.TASKS.items()):
        rows = [p for p in prompts for _ in range(samples_per_prompt)]
        embeds = policy.encode_prompts(rows)
        traj = rollout(policy, embeds, eval_seeds(t_idx, len(rows), seed), num_steps=num_steps, noise_level=0.0,
                       guidance_scale=guidance_scale, resolution=resolution, adapter=adapter, keep_states=False)
        scores = load_reward(reward)(policy.decode(traj.latents), rows)[reward]
        out[task] = float(np.mean(scores))
    return out


@torch.no_grad()
def sample_grid(policy: Policy, adapters: Sequence[str], prompts: Sequence[str], *, num_steps: int,
                guidance_scale: float, seed: int, resolution: int = 16) -> list[list]:
    """One image per (adapter, prompt), same noise for every adapter: rows of PIL images."""
    embeds = policy.encode_prompts(list(prompts))
    seeds = [seed * 1000 + i for i in range(len(prompts))]
    return [policy.decode(rollout(policy, embeds, seeds, num_steps=num_steps, noise_level=0.0,
                                  guidance_scale=guidance_scale, resolution=resolution, adapter=a,
                                  keep_states=False).latents) for a in adapters]
