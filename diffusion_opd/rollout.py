"""On-policy rollouts: run a policy's adapter from noise with the flow-matching SDE / ODE step.

Seeding is per sample: sample ``i`` draws its initial noise and every step's noise from its own
CPU generator seeded with ``seeds[i]`` (then moved to the device), so a prompt's trajectory does
not depend on the device, on the other prompts in its batch, or on which steps train.

Fused training hook: at the step indices in ``train_steps`` the student forward runs with grad
and ``on_step(j, x_j, sigma_j, sigma_next, step)`` is called while ``step.mean`` still carries
the graph (the caller computes the loss against the teacher and calls backward); the rollout
then continues from the detached next state. Every other forward runs under ``torch.no_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .models.base import STUDENT, Policy, PromptEmbeds
from .sampling import StepResult, randn, sde_step

__all__ = ["Trajectory", "rollout"]

OnStep = Callable[[int, torch.Tensor, float, float, StepResult], None]


@dataclass
class Trajectory:
    """One batch of sampled trajectories (tensors detached, float32, on the policy's device
    except ``sigmas``, a CPU tensor).

    ``states[j]`` is x_{t_j} (the state before step j; empty if ``keep_states=False``),
    ``latents`` the final x_0; ``sigmas`` has N+1 entries (last one 0); ``means[j]`` / ``stds[j]``
    define step j's Gaussian kernel; ``log_probs[j]`` is the per-sample log density of the
    sampled next state (None for the ODE).
    """

    latents: torch.Tensor
    sigmas: torch.Tensor
    states: list[torch.Tensor] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)
    stds: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[Optional[torch.Tensor]] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        """Number of transitions N."""
        return len(self.sigmas) - 1


def rollout(
    policy: Policy,
    embeds: PromptEmbeds,
    seeds: Sequence[int],
    *,
    num_steps: int,
    noise_level: float,
    guidance_scale: float,
    shift: Optional[float] = None,
    resolution: int,
    adapter: str = STUDENT,
    train_steps: Sequence[int] = (),
    on_step: Optional[OnStep] = None,
    keep_states: bool = True,
) -> Trajectory:
    """Sample ``len(seeds)`` trajectories of ``num_steps`` steps from pure noise.

    Args:
        policy: the model (its ``velocity`` is called once per step, CFG batched inside).
        embeds: one row per sample (``policy.encode_prompts``).
        seeds: one int per sample; sample i's randomness comes only from ``seeds[i]``.
        num_steps, shift: the schedule, ``policy.sigmas(num_steps, resolution, shift)`` (SD3: static
            shift, ``None`` = the scheduler's; FLUX: ``None`` = the resolution-dependent shift).
        noise_level: eta of the SDE step; 0 is the deterministic Euler ODE.
        guidance_scale: CFG scale of the sampling adapter.
        resolution: image side in pixels (latent shape from ``policy.latent_shape``).
        adapter: whose velocity drives the rollout ("student", a teacher or "base").
        train_steps: step indices whose student forward keeps its graph for ``on_step``.
        on_step: the fused training callback (None: the whole rollout runs without grad).
        keep_states: store every x_{t_j} (needed for off-line training on the states).
    """
    n = len(seeds)
    if n != len(embeds):
        raise ValueError(f"{n} seeds for {len(embeds)} prompts: pass one seed per sample")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    train = sorted(set(int(j) for j in train_steps)) if on_step is not None else []
    if any(j < 0 or j >= num_steps for j in train):
        raise ValueError(f"train_steps must lie in [0, {num_steps}), got {list(train_steps)}")
    if train and adapter != STUDENT:
        raise ValueError(f"training steps need the student as the sampling adapter, got {adapter!r}")

    sigmas = policy.sigmas(num_steps, resolution, shift).float()
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = randn((n, *policy.latent_shape(resolution)), generators, policy.device)
    traj = Trajectory(latents=x, sigmas=sigmas)
    for j in range(num_steps):
        sigma, sigma_next = sigmas[j].item(), sigmas[j + 1].item()
        # Noise is drawn at every SDE step whether or not it trains, so trajectories are
        # identical across train_steps choices.
        noise = randn(x.shape, generators, policy.device) if noise_level > 0 else None
        grad = j in train
        with torch.set_grad_enabled(grad):
            v = policy.velocity(x, sigma, embeds, adapter=adapter, guidance_scale=guidance_scale)
            step = sde_step(v, x, sigma, sigma_next, noise_level, noise=noise)
            if grad:
                on_step(j, x, sigma, sigma_next, step)
        if keep_states:
            traj.states.append(x)
        traj.means.append(step.mean.detach())
        traj.stds.append(step.std.detach())
        traj.log_probs.append(None if step.log_prob is None else step.log_prob.detach())
        x = step.prev_sample.detach()
    traj.latents = x
    return traj
