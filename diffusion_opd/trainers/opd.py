"""Multi-task on-policy distillation (the paper's two-stage recipe, stage 2), read top to bottom.

One round: for every task, draw its prompts, roll the student out from noise, query the task's
frozen teacher at every state the student visits, and backpropagate the per-step loss
(``opd_l2`` for ODE rollouts, ``opd_kl`` for SDE rollouts); then ONE optimizer step for all
tasks. The objective is the mean over tasks, images and trained steps of the per-step loss.

Fused mode (default) runs the student's grad-enabled forward inside the rollout itself and
continues from the detached next state, so nothing is replayed; ``two_pass`` rolls out under
no_grad first and replays the trained steps (the release's structure). Same gradient.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
import os
import random
import time
from typing import Callable, Optional

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import derived_geometry, task_prompts, to_dict, validate_config
from ..data.sampler import PromptSampler
from ..losses import opd_kl, opd_l2, opd_ppo_surrogate
from ..models.base import STUDENT, Policy, PromptEmbeds
from ..rollout import rollout
from ..sampling import StepResult, sd3_sigmas, sde_step, transition_mean_std
from . import checkpoint as ckpt
from .ema import EMA
from .loop import (NonFiniteGuard, RunState, all_reduce_gradients, broadcast_parameters, build_optimizer,
                   build_policy_from_config, load_checkpoint, make_accelerator, save_checkpoint)
from .metrics import MetricsLog, PhaseTimer, peak_memory_gb, synchronize

StepLoss = Callable[[StepResult, torch.Tensor, float], torch.Tensor]


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, task, global sample index): a sample's noise
    depends on what it is, never on which batch or process it landed in."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def make_step_loss(train, noise_level: float) -> StepLoss:
    """Per-sample loss of one step from the student's StepResult and the teacher's mean."""
    kind = train.loss if train.loss != "auto" else ("l2" if noise_level == 0 else "kl")
    red = train.loss_reduction

    def loss(step: StepResult, mean_teacher: torch.Tensor, dt: float) -> torch.Tensor:
        if kind == "l2":
            return opd_l2(step.mean, mean_teacher, red)
        if kind == "ppo":
            return opd_ppo_surrogate(step.mean, mean_teacher, step.std, step.prev_sample, red)
        released_dt = dt if train.kl_denominator == "released" else None
        return opd_kl(step.mean, mean_teacher, step.std, red, released_code_dt=released_dt)

    return loss


def train_step_indices(train, num_steps: int, round_idx: int, seed: int) -> list[int]:
    """Which steps of the trajectory are trained this round (the same on every process)."""
    if train.step_selection == "first":
        return list(range(train.num_train_steps))
    rng = random.Random(sample_seed(seed, round_idx, -1))
    return sorted(rng.sample(range(num_steps), train.num_train_steps))


def teacher_mean(policy: Policy, x, sigma, sigma_next, embeds, teacher: str, guidance: float, noise_level: float):
    """The teacher's one-step transition mean at the student's state (frozen: no graph)."""
    with torch.no_grad():
        v = policy.velocity(x, sigma, embeds, teacher, guidance)
    return transition_mean_std(v, x, sigma, sigma_next, noise_level)[0]


def distill_batch(policy: Policy, embeds: PromptEmbeds, seeds: list[int], *, teacher: str, teacher_guidance: float,
                  sample, steps: list[int], step_loss: StepLoss, scale: float, mode: str,
                  backward: Callable[[torch.Tensor], None], timer: PhaseTimer,
                  shift: Optional[float]) -> dict[int, torch.Tensor]:
    """Roll the student out on one micro-batch and backpropagate ``scale * sum of per-sample
    step losses`` for every step in ``steps``. Returns the per-step sums (detached) for logging."""
    per_step: dict[int, torch.Tensor] = {}

    def on_step(j, x, sigma, sigma_next, step: StepResult):
        with timer("teacher"):
            mean_t = teacher_mean(policy, x, sigma, sigma_next, embeds, teacher, teacher_guidance, sample.noise_level)
        losses = step_loss(step, mean_t, float(sigma_next) - float(sigma))
        per_step[j] = losses.detach().sum()
        with timer("backward"):
            backward(losses.sum() * scale)

    common = dict(num_steps=sample.num_steps, noise_level=sample.noise_level, guidance_scale=sample.guidance_scale,
                  resolution=sample.resolution, shift=shift)
    if mode == "fused":
        with timer("rollout"):
            rollout(policy, embeds, seeds, train_steps=steps, on_step=on_step, keep_states=False, **common)
        return per_step
    with timer("rollout"), torch.no_grad():
        traj = rollout(policy, embeds, seeds, keep_states=True, **common)
    for j in steps:
        x, sigma, sigma_next = traj.states[j], float(traj.sigmas[j]), float(traj.sigmas[j + 1])
        with timer("student_forward"):
            v = policy.velocity(x, sigma, embeds, STUDENT, sample.guidance_scale)
            step = sde_step(v, x, sigma, sigma_next, sample.noise_level, noise=torch.zeros_like(x))
        on_step(j, x, sigma, sigma_next, step)
    return per_step


def heldout_distance(policy: Policy, embeds: PromptEmbeds, seeds: list[int], *, teacher: str, teacher_guidance: float,
                     sample, steps: list[int], step_loss: StepLoss, shift) -> torch.Tensor:
    """Mean per-step loss (KL or L2) between student and teacher on the student's own rollouts,
    without gradients: the held-out distillation metric. The student's means come from the
    rollout itself; only the teacher is queried again."""
    with torch.no_grad():
        traj = rollout(policy, embeds, seeds, num_steps=sample.num_steps, noise_level=sample.noise_level,
                       guidance_scale=sample.guidance_scale, resolution=sample.resolution, shift=shift,
                       keep_states=True)
        total = torch.zeros((), device=traj.latents.device)
        for j in steps:
            x, sigma, sigma_next = traj.states[j], float(traj.sigmas[j]), float(traj.sigmas[j + 1])
            x_next = traj.states[j + 1] if j + 1 < len(traj.states) else traj.latents
            student = StepResult(prev_sample=x_next, mean=traj.means[j], std=traj.stds[j], log_prob=None)
            mean_t = teacher_mean(policy, x, sigma, sigma_next, embeds, teacher, teacher_guidance, sample.noise_level)
            total = total + step_loss(student, mean_t, sigma_next - sigma).sum()
    return total / (len(seeds) * len(steps))


class OPDRun:
    """State of one training run; ``train(config)`` below drives it round by round."""

    def __init__(self, config):
        self.config = config
        self.accelerator = make_accelerator(config)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.prompts = validate_config(config, world_size=self.world)  # before any model loads
        self.eval_prompts = {t: task_prompts(config, t, "eval") for t in config.tasks} if config.eval.every else {}
        self.geometry = derived_geometry(config, self.world)
        acc.print("[opd] " + "\n[opd] ".join(f"{k}: {v}" for k, v in self.geometry.items()))
        os.makedirs(config.output_dir, exist_ok=True)

        set_seed(config.seed)  # the student LoRA's initialisation
        self.policy = build_policy_from_config(config, acc)
        self.shift = config.sample.shift or None
        self.params = self.policy.trainable_parameters()
        broadcast_parameters(self.params, acc)
        optimizer, self.scheduler = build_optimizer(self.params, config.train)
        self.optimizer = acc.prepare_optimizer(optimizer)  # fp16: loss scaling + skipped inf steps
        self.ema = EMA(self.params, config.train.ema_decay, config.train.ema_warmup) if config.train.ema_decay > 0 else None
        self.step_loss = make_step_loss(config.train, config.sample.noise_level)
        self.per_task = config.train.batch_size * config.train.grad_accum
        self.samplers = {
            task: PromptSampler(len(rows), self.per_task, self.rank, self.world, seed=config.seed + 1000 * i)
            for i, (task, rows) in enumerate(self.prompts.items())
        }
        self.timer = PhaseTimer(acc.device, enabled=config.logging.phase_times)
        self.seen_prompts: list[tuple[int, str, list[int]]] = []  # (round, task, indices) on this process
        self.state = RunState()
        resume = ckpt.resolve_resume(config.resume_from, config.output_dir)
        if resume:
            self.state = load_checkpoint(resume, acc, self.policy, self.optimizer, self.scheduler, self.ema)
            for task, s in self.samplers.items():
                s.load_state_dict(self.state.samplers[task])
            acc.print(f"[opd] resumed from {resume} at round {self.state.round}")
        self.guard = NonFiniteGuard(config.train.nan_patience, self.state.nan_streak)
        self.log = MetricsLog(config.output_dir, acc.is_main_process, config.logging.wandb_mode,
                              config.logging.wandb_project, config.run_name, to_dict(config), self.state.wandb_id)
        self.state.wandb_id = self.log.wandb_id
        self.log.truncate_after(self.state.round)

    # -- one round ---------------------------------------------------------------------------
    def backward_round(self, round_idx: int) -> dict:
        """Roll out every task, backpropagate its loss into the student's .grad (no step).
        Returns the per-task / per-step losses averaged over all processes."""
        c, acc = self.config, self.accelerator
        steps = train_step_indices(c.train, c.sample.num_steps, round_idx, c.seed)
        scale = 1.0 / (len(c.tasks) * self.per_task * len(steps))
        bs = c.train.batch_size
        sums: dict[str, torch.Tensor] = {}
        for t_idx, (task, spec) in enumerate(c.tasks.items()):
            indices = self.samplers[task].next_indices()
            self.seen_prompts.append((round_idx, task, indices))
            rows = [self.prompts[task][i] for i in indices]
            with self.timer("encode"):
                embeds = self.policy.encode_prompts([r["prompt"] for r in rows])
            seeds = [sample_seed(c.seed, round_idx, t_idx, self.rank * self.per_task + i) for i in range(self.per_task)]
            teacher = c.teachers[spec.teacher]
            for m in range(c.train.grad_accum):
                idx = list(range(m * bs, (m + 1) * bs))
                with acc.autocast():
                    per_step = distill_batch(
                        self.policy, embeds.select(idx), [seeds[i] for i in idx], teacher=spec.teacher,
                        teacher_guidance=teacher.guidance_scale, sample=c.sample, steps=steps,
                        step_loss=self.step_loss, scale=scale, mode=c.train.mode, backward=acc.backward,
                        timer=self.timer, shift=self.shift)
                for j, v in per_step.items():
                    sums[f"{task}/step_{j}"] = sums.get(f"{task}/step_{j}", 0) + v
        # One reduction for every logged number (and one for the gradients): nothing else is sent.
        keys = sorted(sums)
        values = acc.reduce(torch.stack([sums[k].float() for k in keys]), reduction="sum")
        metrics = {f"loss/{k}": v.item() / (self.per_task * self.world) for k, v in zip(keys, values)}
        for task in c.tasks:
            metrics[f"loss/{task}"] = sum(metrics[f"loss/{task}/step_{j}"] for j in steps) / len(steps)
        metrics["loss"] = sum(metrics[f"loss/{t}"] for t in c.tasks) / len(c.tasks)
        return metrics

    def update(self, round_idx: int, loss: float) -> dict:
        """Average gradients over processes, clip, and take the round's ONE optimizer step."""
        c, acc = self.config, self.accelerator
        with self.timer("optimizer"):
            all_reduce_gradients(self.params, acc)
            max_norm = c.train.max_grad_norm if c.train.max_grad_norm > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(self.params, max_norm)
            skipped = self.guard.should_skip(loss, round_idx)
            if not skipped:
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
            self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "skipped_nonfinite": int(skipped)}

    def run_round(self, round_idx: int) -> dict:
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        metrics = self.backward_round(round_idx)
        metrics.update(self.update(round_idx, metrics["loss"]))
        synchronize(self.accelerator.device)  # the round's one sync (phase syncs only with logging.phase_times)
        seconds = time.perf_counter() - start
        images = self.per_task * len(self.config.tasks) * self.world
        metrics.update({
            "round": round_idx, "lr": lr, "seconds_per_round": seconds, "images_per_second": images / seconds,
            "peak_memory_gb": peak_memory_gb(self.accelerator.device),
            **{f"seconds/{k}": v for k, v in self.timer.reset().items()},
        })
        return metrics

    # -- held-out evaluation -------------------------------------------------------------------
    def evaluate(self, round_idx: int) -> dict:
        """Student-vs-teacher distance on held-out prompts (fixed seeds) and, if configured, the
        task rewards of decoded images. Uses the EMA weights when the EMA is on."""
        c, acc = self.config, self.accelerator
        steps = list(range(c.train.num_train_steps))
        out = {}
        ctx = self.ema.swapped_in() if self.ema is not None else nullcontext()
        with ctx, acc.autocast():
            for t_idx, (task, spec) in enumerate(c.tasks.items()):
                rows = self.eval_prompts[task][self.rank::self.world][: c.eval.num_prompts]
                embeds = self.policy.encode_prompts([r["prompt"] for r in rows])
                seeds = [sample_seed(c.seed, -1, t_idx, self.rank + i * self.world) for i in range(len(rows))]
                dist = heldout_distance(self.policy, embeds, seeds, teacher=spec.teacher,
                                        teacher_guidance=c.teachers[spec.teacher].guidance_scale, sample=c.sample,
                                        steps=steps, step_loss=self.step_loss, shift=self.shift)
                out[f"eval/distance/{task}"] = acc.reduce(dist.reshape(1), reduction="mean").item()
                if c.eval.rewards and spec.reward:
                    out[f"eval/reward/{task}"] = self._reward(spec.reward, embeds, seeds, rows)
        self.timer.reset()
        return out

    def _reward(self, reward_name, embeds, seeds, rows) -> float:
        from ..rewards import load_reward

        c, acc = self.config, self.accelerator
        with torch.no_grad():
            traj = rollout(self.policy, embeds, seeds, num_steps=c.eval.num_steps, noise_level=0.0,
                           guidance_scale=c.sample.guidance_scale, resolution=c.sample.resolution, shift=self.shift,
                           keep_states=False)
            images = self.policy.decode(traj.latents)
        device = c.eval.reward_device if c.eval.reward_device != "auto" else str(acc.device)
        scores = load_reward(reward_name, device=device)(images, [r["prompt"] for r in rows],
                                                        [r["metadata"] for r in rows])[reward_name]
        local = torch.tensor([float(torch.tensor(scores).nanmean()) * len(rows), len(rows)], device=acc.device)
        total = acc.reduce(local, reduction="sum")
        return (total[0] / total[1]).item()

    def save(self) -> None:
        self.state.samplers = {t: s.state_dict() for t, s in self.samplers.items()}
        self.state.nan_streak = self.guard.streak
        path = save_checkpoint(self.accelerator, self.config, self.policy, self.optimizer, self.scheduler, self.ema,
                               self.state)
        if path:
            self.accelerator.print(f"[opd] saved {path}")


def train(config) -> OPDRun:
    """Run (or resume) the OPD recipe described by ``config``; returns the finished run."""
    run = OPDRun(config)
    c, acc = config, run.accelerator
    if run.state.round == 0 and c.eval.every:
        run.log.log({"round": 0, **run.evaluate(0)})
    last = c.train.stop_after_round or c.train.num_rounds
    bar = tqdm(range(run.state.round + 1, min(last, c.train.num_rounds) + 1), desc="OPD rounds",
               disable=not (acc.is_main_process and c.logging.progress), initial=run.state.round,
               total=c.train.num_rounds)
    for round_idx in bar:
        metrics = run.run_round(round_idx)
        run.state.round = round_idx
        if c.eval.every and round_idx % c.eval.every == 0:
            metrics.update(run.evaluate(round_idx))
        run.log.log(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", s_round=f"{metrics['seconds_per_round']:.2f}")
        if round_idx % c.save_every == 0 or round_idx == c.train.num_rounds or round_idx == last:
            run.save()
    run.log.close()
    return run
