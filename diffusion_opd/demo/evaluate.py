"""Measurements of the demo: task rewards of any adapter, and the OPD gradient estimators' spread.

Everything here uses the library's own pieces (``rollout``, ``Policy.decode``, the reward
registry, ``losses.opd_kl`` / ``losses.opd_ppo_surrogate``) with fixed seeds, so the numbers are
deterministic under the seed.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..models.base import Policy
from ..rewards import load_reward
from ..rollout import rollout
from ..data import toy_world as world


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


def gradient_variance(policy: Policy, teacher_guidance: dict[str, float], *, trajectories_per_task: int, num_steps: int,
                      train_steps: int, noise_level: float, guidance_scale: float, reduction: str, seed: int,
                      resolution: int = 16) -> dict:
    """Per-trajectory gradients of the OPD objective with the two estimators, on the same trajectories.

    For each task's prompts, ``trajectories_per_task`` student SDE rollouts (CFG ``guidance_scale``)
    against the task's teacher adapter (named as the task, at ``teacher_guidance[task]``); on each one the
    gradient over the student's LoRA parameters of ``sum_j loss_j`` for the first ``train_steps``
    steps, once with ``opd_kl`` (closed form) and once with ``opd_ppo_surrogate`` (pathwise +
    score-function term). Returns the squared norms of the two means, the traces of the two
    covariances, their ratio, and the paired test of equal means: the per-trajectory difference
    is exactly the score-function term, whose mean ``d`` has ``E||d||^2 = tr Cov / N`` when the
    expectations agree, so ``z = ||d|| / sqrt(tr Cov / N)`` is about 1 (and >> 1 if they differ).
    """
    from ..losses import opd_kl, opd_ppo_surrogate
    from ..rollout import Sampling, rollout_steps
    from ..sampling import transition_mean_std

    params = policy.trainable_parameters()
    spec = Sampling(num_steps=num_steps, noise_level=noise_level, guidance_scale=guidance_scale, resolution=resolution)
    grads = {"kl": [], "ppo": []}
    for t_idx, (task, (_, prompts)) in enumerate(world.TASKS.items()):
        rows = [prompts[i % len(prompts)] for i in range(trajectories_per_task)]
        embeds = policy.encode_prompts(rows)
        per_sample = {k: torch.zeros(len(rows), sum(p.numel() for p in params)) for k in grads}
        seeds = eval_seeds(t_idx, len(rows), seed + 1)
        for step in rollout_steps(policy, embeds, seeds, spec, grad_steps=range(train_steps)):
            with torch.no_grad():
                v_t = policy.velocity(step.x, step.sigma, embeds, task, teacher_guidance[task])
            mean_t = transition_mean_std(v_t, step.x, step.sigma, step.sigma_next, noise_level)[0]
            r = step.result
            losses = {"kl": opd_kl(r.mean, mean_t, r.std, reduction),
                      "ppo": opd_ppo_surrogate(r.mean, mean_t, r.std, r.prev_sample, reduction)}
            for key, loss in losses.items():
                for i in range(len(rows)):  # per-trajectory gradients
                    g = torch.autograd.grad(loss[i], params, retain_graph=True)
                    per_sample[key][i] += torch.cat([x.reshape(-1) for x in g])
        for key in grads:
            grads[key].append(per_sample[key])
    g_kl, g_ppo = torch.cat(grads["kl"]).double(), torch.cat(grads["ppo"]).double()
    n = g_kl.shape[0]
    diff = g_ppo - g_kl
    trace_kl, trace_ppo = g_kl.var(0).sum().item(), g_ppo.var(0).sum().item()
    mean_diff = diff.mean(0).norm().item()
    return dict(trajectories=n, noise_level=noise_level, steps=train_steps,
                mean_norm2_kl=g_kl.mean(0).square().sum().item(), mean_norm2_ppo=g_ppo.mean(0).square().sum().item(),
                trace_kl=trace_kl, trace_ppo=trace_ppo, ratio=trace_ppo / trace_kl,
                mean_diff_norm=mean_diff, z=mean_diff / (diff.var(0).sum().item() / n) ** 0.5)

