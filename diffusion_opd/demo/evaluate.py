"""Measurements of the demo: task rewards of any adapter, and the OPD gradient estimators' spread.

Rewards and sample grids come from the evaluation core (``evaluation/core.py``), the one the
trainer and ``scripts/evaluation.py`` use; the gradient spread uses the library's rollout and
``losses.opd_kl`` / ``losses.opd_ppo_surrogate``. Fixed seeds: the numbers are deterministic
under the seed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data import toy_world as world
from ..evaluation.core import EVAL, eval_seed, evaluate_rows, mean_score, sample_images
from ..models.base import Policy
from ..rewards.multi import task_scorer
from ..rollout import Sampling
from ..seeds import sample_seed


def task_rewards(policy: Policy, adapter: str, *, samples_per_prompt: int, num_steps: int, guidance_scale: float,
                 seed: int, resolution: int = 16) -> dict[str, float]:
    """Mean reward of ``adapter`` on every task's prompts: the evaluation core (ODE sampling, the
    one seed rule, each task's reward as the trainer scores it), ``samples_per_prompt`` rows per
    prompt."""
    out = {}
    sampling = Sampling(num_steps=num_steps, noise_level=0.0, guidance_scale=guidance_scale, resolution=resolution)
    for task, (reward, prompts) in world.TASKS.items():
        rows = [{"prompt": p, "metadata": {}} for p in prompts for _ in range(samples_per_prompt)]
        records = evaluate_rows(policy, rows, range(len(rows)), sampling, seed, task_scorer(reward, "cpu"),
                                adapter=adapter)
        out[task] = mean_score(records, "total")
    return out


def sample_grid(policy: Policy, adapters: Sequence[str], prompts: Sequence[str], *, num_steps: int,
                guidance_scale: float, seed: int, resolution: int = 16) -> list[list]:
    """One image per (adapter, prompt), the evaluation seeds of rows 0.. (the same noise for every
    adapter): rows of PIL images."""
    sampling = Sampling(num_steps=num_steps, noise_level=0.0, guidance_scale=guidance_scale, resolution=resolution)
    seeds = [eval_seed(seed, i) for i in range(len(prompts))]
    return [sample_images(policy, prompts, seeds, sampling, adapter=a) for a in adapters]


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
    from ..rollout import rollout_steps
    from ..sampling import transition_mean_std

    params = policy.trainable_parameters()
    spec = Sampling(num_steps=num_steps, noise_level=noise_level, guidance_scale=guidance_scale, resolution=resolution)
    grads = {"kl": [], "ppo": []}
    for t_idx, (task, (_, prompts)) in enumerate(world.TASKS.items()):
        rows = [prompts[i % len(prompts)] for i in range(trajectories_per_task)]
        embeds = policy.encode_prompts(rows)
        per_sample = {k: torch.zeros(len(rows), sum(p.numel() for p in params)) for k in grads}
        seeds = [sample_seed(seed, EVAL, t_idx, i) for i in range(len(rows))]  # not the reward evaluation's
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

