"""DiffusionNFT (stage 1: the GenEval teacher; the multi-task and cascade baselines), read top to bottom.

One round:

1. Sample ``rl.group_size`` images per prompt with the OLD policy (a second LoRA adapter on the
   same backbone, never trained by gradients) and keep only the clean samples ``x0``; the
   sampler is ``rl.nft_sampler`` (``dpm2``, DiffusionNFT's deterministic DPM-Solver++(2M)).
2. Score them with the task's reward; group-relative advantages ``A`` (trainers/rl.py).
3. Train the student on the FORWARD process of the clean samples (any sampler works, no
   log-probabilities): each sample at its own random ``train.num_train_steps`` of the
   ``sample.num_steps`` noise levels (``rl.nft_step_sampling=per_sample``, as the reference; 9 of
   10), ``x_t = (1 - t) x0 + t eps`` and::

       v+ = b v_theta + (1 - b) v_old,     v- = (1 + b) v_old - b v_theta
       L  = r L+(v+) / b + (1 - r) L-(v-) / b,   r = clamp(A / (2 A_max) + 1/2, 0, 1)

   where each branch's loss is the squared error of ``x0_hat = x_t - t v`` to ``x0`` divided by
   its detached mean absolute error (:func:`diffusion_opd.rl_losses.nft_loss`), plus
   ``rl.kl_beta * ||v_theta - v_base||^2`` (optional KL to the base model). The loss of an
   optimizer step is the mean over its samples and their trained levels (trainers/rl.py
   :func:`~diffusion_opd.trainers.rl.update_scale`); ``rl.updates_per_round`` steps per round.
4. Old policy <- EMA of the student, decay ``min(rl.old_decay_rate * (step - rl.old_decay_delay),
   rl.old_decay_max)`` (0 before the delay), once per round.

Training forwards are conditional only (no CFG), as DiffusionNFT's CFG-free training.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.base import BASE, STUDENT
from ..recipes import RecipeSpec, register
from ..rl_losses import forward_process, nft_loss, velocity_kl
from ..rollout import Sampling
from ..sampling import randn
from ..seeds import sample_seed, train_step_indices
from .ema import ema_update_, old_policy_decay
from .rl import (Groups, check_rl, evaluate_rewards, geometry, global_loss, group_size, optimizer_steps_per_round,
                 sample_groups, score_groups, update_scale, updates)
from .run import Run
from .sharding import copy_full_, gather

OLD = "old"  # the sampling policy's adapter


class NFT:
    """The DiffusionNFT recipe on a :class:`~diffusion_opd.trainers.run.Run`."""

    name = "nft"

    def __init__(self, run: Run):
        c = run.config
        self.run, self.config, self.policy = run, c, run.policy
        self.sampling = Sampling.from_config(c.sample, solver=c.rl.nft_sampler)
        self.old_params = self.policy.add_student_copy(OLD)  # starts equal to the student
        self.steps_taken = 0  # optimizer steps so far (drives the old policy's decay)
        self.images_per_round = SPEC.images_per_round(c, run.world)

    def round(self, round_idx: int) -> dict:
        c, run = self.config, self.run
        groups = sample_groups(run, round_idx, self.sampling, adapter=OLD, keep_states=False)
        metrics = score_groups(run, groups)
        sigmas = self.sampling.sigmas(self.policy)
        losses = []
        for part in updates(groups, c.train.batch_size, c.rl.updates_per_round):
            scale, _ = update_scale(run, part, c.train.num_train_steps)
            run.expect_backwards(len(part) * c.train.num_train_steps)  # fsdp: reduce on the last
            local = sum(self.backward(g, idx, sigmas, round_idx, scale) for g, idx in part)
            loss = global_loss(run, local)  # the mean per kept sample and trained level
            metrics.update(run.optimizer_step(round_idx, loss))
            losses.append(loss)
            self.steps_taken += 1
        metrics["loss"] = sum(losses) / len(losses)
        # The sampling policy follows the student slowly (fully on-policy while the decay is 0).
        decay = old_policy_decay(self.steps_taken, c.rl.old_decay_rate, c.rl.old_decay_max, c.rl.old_decay_delay)
        ema_update_(self.old_params, run.params, decay)
        metrics["old_policy_decay"] = decay
        return metrics

    def levels(self, g: Groups, idx: list[int], round_idx: int) -> torch.Tensor:
        """(B, train.num_train_steps) indices of the noise levels each sample trains on."""
        c = self.config
        if c.rl.nft_step_sampling == "per_sample":
            return per_sample_levels([g.seeds[i] for i in idx], round_idx, c.sample.num_steps, c.train.num_train_steps)
        steps = train_step_indices(c.train, c.sample.num_steps, round_idx, c.seed)
        return torch.tensor(steps, dtype=torch.long).expand(len(idx), -1)

    def backward(self, g: Groups, idx: list[int], sigmas: torch.Tensor, round_idx: int,
                 scale: float) -> torch.Tensor:
        """Backpropagate ``scale * sum over samples and trained levels`` of the NFT loss on one
        micro-batch; returns that (detached) scaled sum for logging."""
        c, acc, policy = self.config, self.run.accelerator, self.policy
        embeds, x0, adv = g.embeds.select(idx), g.traj.latents[idx], g.advantages[idx]
        levels = self.levels(g, idx, round_idx)
        total = torch.zeros((), device=acc.device)
        for j in range(levels.shape[1]):
            t = sigmas[levels[:, j]].to(x0.device)  # (B,): each sample's own level
            # eps per sample from its own seed and the pass: the same on resume, on any process layout
            gens = [torch.Generator().manual_seed(sample_seed(g.seeds[i], round_idx, j)) for i in idx]
            x_t = forward_process(x0, randn(x0.shape, gens, x0.device), t)
            with acc.autocast():
                with torch.no_grad():
                    v_old = policy.velocity(x_t, t, embeds, OLD)
                    v_base = policy.velocity(x_t, t, embeds, BASE) if c.rl.kl_beta > 0 else None
                v = policy.velocity(x_t, t, embeds, STUDENT)
                losses = nft_loss(v, v_old, x_t, x0, t, adv, beta=c.rl.nft_beta, adv_clip_max=c.rl.advantage_clip)
                if v_base is not None:
                    losses = losses + c.rl.kl_beta * velocity_kl(v, v_base)
                losses = losses * g.keep[idx]
            with self.run.timer("backward"):
                self.run.backward(losses.sum() * scale)
            total = total + losses.detach().sum() * scale
        return total

    def evaluate(self, round_idx: int) -> dict:
        return evaluate_rewards(self.run)

    def rebind_parameters(self, remap) -> None:
        """After sharding (distributed.strategy=fsdp): the old adapter's new parameter objects."""
        self.old_params = [remap(p) for p in self.old_params]

    # -- what resume restores besides the student ------------------------------------------------
    def state_dict(self) -> dict:
        """Gathered (full) tensors under fsdp: every process calls it (trainers/run.py save)."""
        return {"old": [t.detach().cpu().clone() for t in gather(list(self.old_params))],
                "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        for p, saved in zip(self.old_params, state["old"]):
            copy_full_(p, saved)
        self.steps_taken = state["steps_taken"]


def per_sample_levels(seeds: list[int], round_idx: int, num_levels: int, count: int) -> torch.Tensor:
    """(B, count) distinct noise-level indices per sample: the first ``count`` of a random
    permutation of ``range(num_levels)`` drawn from the sample's own seed and the round
    (DiffusionNFT's per-sample timestep shuffle), so every level is trained, each with
    probability ``count / num_levels`` per sample, and the choice survives resume and any
    process layout."""
    if not 1 <= count <= num_levels:
        raise ValueError(f"per_sample_levels: count must be in [1, {num_levels}], got {count}")
    rows = [torch.randperm(num_levels, generator=torch.Generator().manual_seed(sample_seed(s, round_idx, -2)))[:count]
            for s in seeds]
    return torch.stack(rows)


def train(config) -> Run:
    """Run (or resume) the DiffusionNFT recipe described by ``config``; returns the finished run."""
    run = Run(config)
    return run.train(NFT(run))


def check(config) -> None:
    check_rl(config)
    if config.rl.nft_sampler == "dpm2" and config.sample.noise_level != 0:
        raise ConfigError(f"sample.noise_level: {config.sample.noise_level}, but rl.nft_sampler=dpm2 is deterministic; "
                          "set sample.noise_level=0 or rl.nft_sampler=euler")
    if config.rl.inner_epochs != 1:
        raise ConfigError("rl.inner_epochs: DiffusionNFT makes one pass per round; use rl.updates_per_round")


SPEC = register(RecipeSpec("nft", build=NFT, prompts_keys=("rl.groups_per_round",), task_needs="reward",
                           section="rl", check=check, images_per_prompt=group_size, geometry=geometry,
                           optimizer_steps_per_round=optimizer_steps_per_round,
                           description="DiffusionNFT (stage 1)"))
