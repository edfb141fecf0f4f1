"""On-policy rollouts: run a policy's adapter from noise with the flow-matching SDE / ODE step.

Three pieces, used by every recipe (OPD, DiffusionNFT, Flow-GRPO):

* :class:`Sampling`: how to sample (steps, eta, CFG, resolution, shift), frozen, built once
  from the config's ``sample`` section.
* :func:`rollout_steps`: a generator over the trajectory. At the indices in ``grad_steps`` it
  YIELDS a :class:`Step` whose ``result.mean`` still carries the student's graph; the caller
  computes its loss (teacher query, reward-weighted likelihood...) and calls backward in its
  own loop body, then the rollout continues from the detached next state. Every other forward
  runs under ``torch.no_grad``. Everything sampled lands in the ``Trajectory`` passed as ``out``.
* :func:`replay_steps`: the same :class:`Step` objects from a stored trajectory (student
  forward with grad on the saved states), for recipes that train after sampling.

Seeding is per sample: sample ``i`` draws its initial noise and every step's noise from its own
CPU generator seeded with ``seeds[i]`` (then moved to the device), so a prompt's trajectory does
not depend on the device, on the other prompts in its batch, or on which steps train.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .models.base import STUDENT, Policy, PromptEmbeds
from .sampling import StepResult, dpm2_step, gaussian_log_prob, randn, sde_step, transition_mean_std

SOLVERS = ("euler", "dpm2")

__all__ = ["Sampling", "Step", "Trajectory", "rollout_steps", "replay_steps", "sample", "timed"]


@dataclass(frozen=True)
class Sampling:
    """How trajectories are sampled. ``shift=None``: the policy's scheduler shift."""

    num_steps: int
    noise_level: float  # eta of the SDE step; 0 is the deterministic Euler ODE
    guidance_scale: float  # CFG of the sampling adapter
    resolution: int  # image side in pixels
    shift: Optional[float] = None
    # euler: the Euler(-Maruyama) step of sampling.sde_step (ODE at noise level 0), the kernel every
    # loss is defined on; dpm2: deterministic DPM-Solver++(2M) (sampling.dpm2_step), DiffusionNFT's
    # sampler of its clean samples (no kernel, no log-probabilities: ODE, nothing trained in the rollout)
    solver: str = "euler"

    @classmethod
    def from_config(cls, sample, **changes) -> "Sampling":
        """From a config's ``sample`` section (``shift`` 0 means the scheduler's own)."""
        spec = cls(num_steps=sample.num_steps, noise_level=sample.noise_level, guidance_scale=sample.guidance_scale,
                   resolution=sample.resolution, shift=sample.shift or None)
        return spec.replace(**changes) if changes else spec

    def replace(self, **changes) -> "Sampling":
        return Sampling(**{**self.__dict__, **changes})

    def sigmas(self, policy: Policy) -> torch.Tensor:
        """The ``num_steps + 1`` float32 sigmas (CPU), last one 0: ``policy.sigmas`` (SD3: static
        shift, ``None`` = the scheduler's; FLUX: ``None`` = the resolution-dependent shift)."""
        return policy.sigmas(self.num_steps, self.resolution, self.shift).float()


@dataclass
class Step:
    """Transition ``j``: from state ``x`` (detached) at ``sigma`` to ``sigma_next``.

    ``result.mean`` carries the student's graph when the step was asked for with grad;
    ``result.prev_sample`` is the next state the trajectory actually took.
    """

    index: int
    x: torch.Tensor
    sigma: float
    sigma_next: float
    result: StepResult

    @property
    def dt(self) -> float:
        return self.sigma_next - self.sigma


@dataclass
class Trajectory:
    """One batch of sampled trajectories (tensors detached, float32, on the policy's device
    except ``sigmas``, a CPU tensor).

    ``states[j]`` is x_{t_j} (the state before step j; empty if ``keep_states=False``),
    ``latents`` the final x_0; ``sigmas`` has N+1 entries (last one 0); ``means[j]`` / ``stds[j]``
    define step j's Gaussian kernel; ``log_probs[j]`` is the per-sample log density of the
    sampled next state (None for the ODE).
    """

    latents: Optional[torch.Tensor] = None
    sigmas: Optional[torch.Tensor] = None
    states: list[torch.Tensor] = field(default_factory=list)
    means: list[torch.Tensor] = field(default_factory=list)
    stds: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[Optional[torch.Tensor]] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        """Number of transitions N."""
        return len(self.sigmas) - 1

    def next_state(self, j: int) -> torch.Tensor:
        """x_{t_{j+1}}: the state step ``j`` led to (needs ``keep_states``)."""
        return self.states[j + 1] if j + 1 < len(self.states) else self.latents

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        """Trajectories of the same schedule, sampled in several batches, as one batch."""
        def join(tensors):
            return None if tensors[0] is None else torch.cat(tensors)

        first = parts[0]
        return Trajectory(latents=torch.cat([p.latents for p in parts]), sigmas=first.sigmas,
                          states=[join([p.states[j] for p in parts]) for j in range(len(first.states))],
                          means=[join([p.means[j] for p in parts]) for j in range(len(first.means))],
                          stds=[first.stds[j] if first.stds[j].shape[0] == 1 else join([p.stds[j] for p in parts])
                                for j in range(len(first.stds))],
                          log_probs=[join([p.log_probs[j] for p in parts]) for j in range(len(first.log_probs))])

    def select(self, index: Sequence[int]) -> "Trajectory":
        """The rows ``index`` of every per-sample tensor (a minibatch of the trajectories)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.latents.device)

        def rows(t):
            return None if t is None else (t[idx] if t.ndim and t.shape[0] == self.latents.shape[0] else t)

        return Trajectory(latents=self.latents[idx], sigmas=self.sigmas, states=[rows(s) for s in self.states],
                          means=[rows(m) for m in self.means], stds=[rows(s) for s in self.stds],
                          log_probs=[rows(lp) for lp in self.log_probs])


def _check(spec: Sampling, embeds: PromptEmbeds, seeds: Sequence[int]) -> None:
    if len(seeds) != len(embeds):
        raise ValueError(f"{len(seeds)} seeds for {len(embeds)} prompts: pass one seed per sample")
    if spec.noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {spec.noise_level}")
    if spec.solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {spec.solver!r}")
    if spec.solver == "dpm2" and spec.noise_level != 0:
        raise ValueError(f"the dpm2 solver is deterministic: noise_level must be 0, got {spec.noise_level}")


def rollout_steps(policy: Policy, embeds: PromptEmbeds, seeds: Sequence[int], spec: Sampling, *,
                  grad_steps: Sequence[int] = (), adapter: str = STUDENT, keep_states: bool = False,
                  out: Optional[Trajectory] = None) -> Iterator[Step]:
    """Sample ``len(seeds)`` trajectories; yield the steps in ``grad_steps`` with the student's graph.

    The caller's loop body runs between the grad forward of step ``j`` and the forward of
    step ``j + 1`` (fused training: nothing is stored or replayed). ``out`` (optional) receives
    the sigmas, means, stds, log-probs, states (if ``keep_states``) and final latents.
    """
    _check(spec, embeds, seeds)
    grad = sorted(set(int(j) for j in grad_steps))
    if any(j < 0 or j >= spec.num_steps for j in grad):
        raise ValueError(f"train_steps must lie in [0, {spec.num_steps}), got {list(grad_steps)}")
    if grad and adapter != STUDENT:
        raise ValueError(f"training steps need the student as the sampling adapter, got {adapter!r}")
    if grad and spec.solver != "euler":
        raise ValueError(f"training steps need the Euler kernel, got solver {spec.solver!r}")
    traj = out if out is not None else Trajectory()
    traj.sigmas = sigmas = spec.sigmas(policy)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    x = randn((len(seeds), *policy.latent_shape(spec.resolution)), generators, policy.device)
    prev_x0 = None  # dpm2: the previous step's data prediction
    values = sigmas.tolist()  # Python floats once (a CPU tensor; no per-step scalar reads)
    for j in range(spec.num_steps):
        sigma, sigma_next = values[j], values[j + 1]
        # Noise is drawn at every SDE step whether or not it trains, so trajectories are
        # identical across grad_steps choices.
        noise = randn(x.shape, generators, policy.device) if spec.noise_level > 0 else None
        with torch.set_grad_enabled(j in grad):
            v = policy.velocity(x, sigma, embeds, adapter=adapter, guidance_scale=spec.guidance_scale)
            if spec.solver == "dpm2":
                x0 = x.float() - sigma * v.float()
                nxt = dpm2_step(x, x0, sigma, sigma_next, prev_x0, values[j - 1] if j else None)
                result = StepResult(prev_sample=nxt.to(x.dtype), mean=nxt, std=nxt.new_zeros([1] * nxt.ndim), log_prob=None)
                prev_x0 = x0
            else:
                result = sde_step(v, x, sigma, sigma_next, spec.noise_level, noise=noise)
        if j in grad:
            yield Step(j, x, sigma, sigma_next, result)
        if keep_states:
            traj.states.append(x)
        traj.means.append(result.mean.detach())
        traj.stds.append(result.std.detach())
        traj.log_probs.append(None if result.log_prob is None else result.log_prob.detach())
        x = result.prev_sample.detach()
    traj.latents = x


def replay_steps(policy: Policy, traj: Trajectory, embeds: PromptEmbeds, spec: Sampling,
                 steps: Sequence[int], detach_uncond: bool = False) -> Iterator[Step]:
    """Yield steps ``steps`` of a stored trajectory with a fresh student forward (grad mode as
    the caller's): ``result.mean`` / ``std`` are the student's kernel at the saved state,
    ``result.prev_sample`` the next state the trajectory took and ``result.log_prob`` its exact
    log density under that kernel (None for the ODE). ``detach_uncond``: CFG's gradient flows
    through the conditional branch only (:func:`~diffusion_opd.models.base.cfg_combine`)."""
    if not traj.states:
        raise ValueError("replay needs the states: sample with keep_states=True")
    values = traj.sigmas.tolist()  # a CPU tensor: Python floats once
    for j in steps:
        x, sigma, sigma_next = traj.states[j], values[j], values[j + 1]
        v = policy.velocity(x, sigma, embeds, STUDENT, spec.guidance_scale, detach_uncond=detach_uncond)
        mean, std = transition_mean_std(v, x, sigma, sigma_next, spec.noise_level)
        taken = traj.next_state(j)
        log_prob = gaussian_log_prob(taken, mean, std) if spec.noise_level > 0 else None
        yield Step(j, x, sigma, sigma_next, StepResult(prev_sample=taken, mean=mean, std=std, log_prob=log_prob))


def sample(policy: Policy, embeds: PromptEmbeds, seeds: Sequence[int], spec: Sampling, *, adapter: str = STUDENT,
           keep_states: bool = False) -> Trajectory:
    """The whole trajectory without grad (evaluation, RL sampling, the two-pass first pass)."""
    traj = Trajectory()
    with torch.no_grad():
        for _ in rollout_steps(policy, embeds, seeds, spec, adapter=adapter, keep_states=keep_states, out=traj):
            pass  # no grad steps: nothing is yielded
    return traj


def timed(steps: Iterator[Step], timer, phase: str) -> Iterator[Step]:
    """Charge the work done inside ``steps`` (a rollout / replay generator) to ``phase`` of
    ``timer``; the caller's loop body between two steps is not charged to it."""
    it = iter(steps)
    while True:
        with timer(phase):
            step = next(it, None)
        if step is None:
            return
        yield step
