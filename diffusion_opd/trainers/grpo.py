"""Flow-GRPO and GRPO-Guard (stage 1: the OCR and aesthetic teachers; the multi-task baseline),
read top to bottom.

One round:

1. Sample ``rl.group_size`` images per prompt with the student's SDE (``sample.noise_level`` >
   0), keeping every state ``x_j``, the kernel means ``mu_old`` and the per-step std ``s``.
2. Score them with the task's reward; group-relative advantages ``A`` (trainers/rl.py); with
   ``rl.drop_zero_advantage`` samples of all-equal groups are dropped: the loss of an update is
   the mean over the KEPT samples (as the reference re-batches them), so the step size does not
   shrink as groups saturate.
3. ``rl.inner_epochs`` passes of ``rl.updates_per_round`` optimizer steps over the samples: at
   every trained step ``j`` (``train.num_train_steps`` of them, the timestep fraction) the
   student's kernel at the stored state gives ``log pi_theta(x_{j+1})`` (per-element average,
   as Flow-GRPO) and the PPO loss::

       rho  = exp(log pi_theta - log pi_old)                      (Flow-GRPO)
       rho  = exp((log pi_theta - log pi_old + ||mu_theta - mu_old||^2 / (2 s^2)) s)
              and the step's loss weighted by 1 / (-dt)           (GRPO-Guard, rl.guard)
       loss = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + rl.kl_beta KL(pi_theta || pi_base)

   With CFG the student's velocity is ``v_u + g (v_c - v_u)`` with the gradient stopped at
   ``v_u`` (``rl.cfg_grad=detach_uncond``, Flow-GRPO's code).

   The first optimizer step of a round replays exactly the sampling forwards (same micro-batches),
   so its ratio is exactly 1: the samples are on-policy.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..losses import opd_kl
from ..models.base import BASE
from ..recipes import RecipeSpec, register
from ..rl_losses import clipped_surrogate, guard_ratio, guard_step_weight, importance_ratio
from ..rollout import Sampling, Step, replay_steps
from ..sampling import gaussian_log_prob, transition_mean_std
from ..seeds import train_step_indices
from .rl import (Groups, check_rl, evaluate_rewards, geometry, global_loss, group_size, optimizer_steps_per_round,
                 sample_groups, score_groups, update_scale, updates)
from .run import Run


class GRPO:
    """The Flow-GRPO / GRPO-Guard recipe on a :class:`~diffusion_opd.trainers.run.Run`."""

    name = "grpo"

    def __init__(self, run: Run):
        c = run.config
        self.run, self.config, self.policy = run, c, run.policy
        self.sampling = Sampling.from_config(c.sample)
        self.images_per_round = SPEC.images_per_round(c, run.world)

    def round(self, round_idx: int) -> dict:
        c, run = self.config, self.run
        groups = sample_groups(run, round_idx, self.sampling, adapter="student", keep_states=True)
        metrics = score_groups(run, groups)
        steps = train_step_indices(c.train, c.sample.num_steps, round_idx, c.seed)
        losses, first, later = [], [], []
        for epoch in range(c.rl.inner_epochs):
            for part in updates(groups, c.train.batch_size, c.rl.updates_per_round):
                scale, _ = update_scale(run, part, len(steps))
                run.expect_backwards(len(part) * len(steps))  # fsdp: reduce on the last
                sums = [self.backward(g, idx, steps, scale) for g, idx in part]
                loss = global_loss(run, sum(s["loss"] for s in sums))  # the mean per kept sample and step
                metrics.update(run.optimizer_step(round_idx, loss))
                losses.append(loss)
                (later if first else first).extend(sums)
        metrics["loss"] = sum(losses) / len(losses)
        for name, sums in (("first_update", first), ("later_updates", later)):
            if sums:  # the first update is on-policy: its ratio is exactly 1
                n = sum(s["count"] for s in sums)
                metrics[f"ratio_mean/{name}"] = sum(s["ratio_sum"] for s in sums).item() / n
                metrics[f"ratio_max_deviation/{name}"] = max(s["ratio_dev_max"] for s in sums).item()
                metrics[f"clip_fraction/{name}"] = sum(s["clipped"] for s in sums).item() / n
        return metrics

    def step_ratio(self, step: Step, old_mean: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The importance ratio of the sampled next state and the step's loss weight."""
        res = step.result
        log_prob = gaussian_log_prob(res.prev_sample, res.mean, res.std, reduction="mean")
        old_log_prob = gaussian_log_prob(res.prev_sample, old_mean, res.std, reduction="mean")
        if self.config.rl.guard:
            return guard_ratio(log_prob, old_log_prob, res.mean, old_mean, res.std.reshape(-1)[:1]), \
                guard_step_weight(step.dt)
        return importance_ratio(log_prob, old_log_prob), 1.0

    def backward(self, g: Groups, idx: list[int], steps: list[int], scale: float) -> dict:
        """Backpropagate ``scale * sum over samples and trained steps`` of the clipped surrogate
        (+ KL) on one sampling micro-batch; returns the detached sums for logging."""
        c, acc, policy = self.config, self.run.accelerator, self.policy
        traj, embeds, adv, keep = g.traj.select(idx), g.embeds.select(idx), g.advantages[idx], g.keep[idx]
        zero = torch.zeros((), device=acc.device)
        out = {"loss": zero, "ratio_sum": zero, "ratio_dev_max": zero, "clipped": zero, "count": 0}
        with acc.autocast():
            detach = c.rl.cfg_grad == "detach_uncond"
            for step in replay_steps(policy, traj, embeds, self.sampling, steps, detach_uncond=detach):
                ratio, weight = self.step_ratio(step, traj.means[step.index])
                losses = clipped_surrogate(ratio, adv, c.rl.clip_range) * weight
                if c.rl.kl_beta > 0:
                    with torch.no_grad():
                        v_base = policy.velocity(step.x, step.sigma, embeds, BASE, self.sampling.guidance_scale)
                    mean_base = transition_mean_std(v_base, step.x, step.sigma, step.sigma_next,
                                                    self.sampling.noise_level)[0]
                    # Flow-GRPO's KL: the closed-form Gaussian-step KL over std_dev_t^2 (released denominator)
                    losses = losses + c.rl.kl_beta * opd_kl(step.result.mean, mean_base, step.result.std, "mean",
                                                            released_code_dt=step.dt)
                losses = losses * keep
                with self.run.timer("backward"):
                    self.run.backward(losses.sum() * scale)
                r = ratio.detach()
                out["loss"] = out["loss"] + losses.detach().sum() * scale
                out["ratio_sum"] = out["ratio_sum"] + r.sum()
                out["ratio_dev_max"] = torch.maximum(out["ratio_dev_max"], (r - 1).abs().max())
                out["clipped"] = out["clipped"] + ((r - 1).abs() > c.rl.clip_range).float().sum()
                out["count"] += r.numel()
        return out

    def evaluate(self, round_idx: int) -> dict:
        return evaluate_rewards(self.run)


def train(config) -> Run:
    """Run (or resume) the Flow-GRPO / GRPO-Guard recipe described by ``config``."""
    run = Run(config)
    return run.train(GRPO(run))


def check(config) -> None:
    check_rl(config)
    if config.sample.noise_level <= 0:
        raise ConfigError("sample.noise_level: GRPO needs SDE rollouts (log-probabilities); use e.g. 0.7")


SPEC = register(RecipeSpec("grpo", build=GRPO, prompts_keys=("rl.groups_per_round",), task_needs="reward",
                           section="rl", check=check, images_per_prompt=group_size, geometry=geometry,
                           optimizer_steps_per_round=optimizer_steps_per_round,
                           description="Flow-GRPO / GRPO-Guard (stage 1)"))
