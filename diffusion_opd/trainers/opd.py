"""Multi-task on-policy distillation (the paper's stage 2), read top to bottom.

One round: for every task, draw its prompts, roll the student out from noise, query the task's
frozen teacher at every state the student visits, and backpropagate the per-step loss
(``opd_l2`` for ODE rollouts, ``opd_kl`` for SDE rollouts); then ONE optimizer step for all
tasks. The objective is the mean over tasks, images and trained steps of the per-step loss.

Fused mode (default) takes the student's grad-enabled steps from the rollout generator itself
and the rollout continues from the detached next state, so nothing is replayed; ``two_pass``
samples under no_grad first and replays the trained steps (the release's structure). Same
gradient, same loop body.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, Iterator, Sequence, Union

import torch

from ..glue import compiled
from ..losses import opd_kl, opd_l2, opd_ppo_surrogate
from ..models.base import Policy, PromptEmbeds
from ..recipes import RecipeSpec, register
from ..rollout import Sampling, Step, replay_steps, rollout_steps, sample, timed
from ..sampling import StepResult, transition_mean_std
from ..seeds import train_step_indices
from .run import Run
from .setup import compile_enabled

StepLoss = Callable[[StepResult, torch.Tensor, float], torch.Tensor]


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
        # std > 0 on every SDE step (config validation refuses the KL with ODE rollouts): no host check
        return opd_kl(step.mean, mean_teacher, step.std, red, released_code_dt=released_dt, check_std=False)

    return loss


def teacher_mean(policy: Policy, step: Step, embeds: PromptEmbeds, teacher: Union[str, Sequence[str]],
                 guidance: Union[float, Sequence[float]], noise_level: float) -> torch.Tensor:
    """The teacher's one-step transition mean at the student's state (frozen: no graph).

    ``teacher`` / ``guidance`` may be given per row (lockstep tasks): rows of different teachers
    then run in one mixed-adapter forward (``Policy.velocity_mixed``)."""
    with torch.no_grad():
        if isinstance(teacher, str):
            v = policy.velocity(step.x, step.sigma, embeds, teacher, guidance)
        elif len(set(zip(teacher, guidance))) == 1:
            v = policy.velocity(step.x, step.sigma, embeds, teacher[0], guidance[0])
        else:
            v = policy.velocity_mixed(step.x, step.sigma, embeds, teacher, guidance)
    return transition_mean_std(v, step.x, step.sigma, step.sigma_next, noise_level)[0]


class OPD:
    """The OPD recipe on a :class:`~diffusion_opd.trainers.run.Run`."""

    name = "opd"

    def __init__(self, run: Run):
        c = run.config
        self.run, self.config, self.policy = run, c, run.policy
        self.sampling = Sampling.from_config(c.sample)
        self.step_loss = make_step_loss(c.train, c.sample.noise_level)
        # task -> (teacher adapter, teacher CFG); the benchmark may point every task at one adapter
        self.task_teachers = {task: (spec.teacher, c.teachers[spec.teacher].guidance_scale)
                              for task, spec in c.tasks.items()}
        self.images_per_round = SPEC.images_per_round(c, run.world)
        # perf.compile: the latent-sized maths between forwards compiled too (diffusion_opd/glue.py)
        self.glue = (partial(compiled, c.perf.compile_backend, c.perf.compile_dynamic)
                     if compile_enabled(c, run.accelerator.device) else nullcontext)

    # -- one round ---------------------------------------------------------------------------
    def round(self, round_idx: int) -> dict:
        """The round's backward for every task, then ONE optimizer step."""
        metrics = self.backward(round_idx, self.draw(round_idx))
        metrics.update(self.run.optimizer_step(round_idx, metrics["loss"]))
        return metrics

    def draw(self, round_idx: int) -> dict[str, tuple[PromptEmbeds, list[int]]]:
        """Each task's prompts (encoded) and per-sample seeds for this round on this process (the
        run's fixed ``embeddings`` instead of drawn prompts when it was given some)."""
        batches = {}
        for t_idx, task in enumerate(self.config.tasks):
            if self.run.embeddings is not None:
                embeds = self.run.embeddings[task]
            else:
                rows = self.run.draw_prompts(task, round_idx)
                with self.run.timer("encode"):
                    embeds = self.policy.encode_prompts([r["prompt"] for r in rows])
            batches[task] = (embeds, self.run.seeds(round_idx, t_idx, len(embeds)))
        return batches

    def student_steps(self, embeds: PromptEmbeds, seeds: list[int], steps: list[int]) -> Iterator[Step]:
        """The student's trained steps on its own rollouts, with grad: fused (from the rollout
        itself) or two_pass (sample without grad, then replay the steps)."""
        timer = self.run.timer
        if self.config.train.mode == "fused":
            return timed(rollout_steps(self.policy, embeds, seeds, self.sampling, grad_steps=steps), timer, "rollout")
        with timer("rollout"):
            traj = sample(self.policy, embeds, seeds, self.sampling, keep_states=True)
        return timed(replay_steps(self.policy, traj, embeds, self.sampling, steps), timer, "student_forward")

    def micro_batches(self, batches: dict[str, tuple[PromptEmbeds, list[int]]]) -> Iterator[list[tuple]]:
        """The rows that run together, as ``[(task, embeds, seeds), ...]``: one task's micro-batch
        at a time, or with ``perf.lockstep_tasks`` micro-batch m of EVERY task at once (one student
        forward, one backward and one mixed-teacher forward per step for all tasks). Prompts,
        seeds and loss weights are the same either way, so the gradient is too."""
        c, bs = self.config, self.config.train.batch_size
        micro = {task: [(task, embeds.select(range(m * bs, (m + 1) * bs)), seeds[m * bs:(m + 1) * bs])
                        for m in range(c.train.grad_accum)] for task, (embeds, seeds) in batches.items()}
        if c.perf.lockstep_tasks:
            yield from (list(parts) for parts in zip(*micro.values()))
        else:
            yield from ([part] for parts in micro.values() for part in parts)

    def backward(self, round_idx: int, batches: dict[str, tuple[PromptEmbeds, list[int]]]) -> dict:
        """Backpropagate every task's distillation loss into the student's .grad (no step).
        Returns the per-task / per-step losses averaged over all processes."""
        c, acc, timer = self.config, self.run.accelerator, self.run.timer
        steps = train_step_indices(c.train, c.sample.num_steps, round_idx, c.seed)
        per_task = self.run.prompts_per_round
        scale = 1.0 / (len(batches) * per_task * len(steps))
        sums: dict[str, torch.Tensor] = {}
        micro = list(self.micro_batches(batches))
        self.run.expect_backwards(len(micro) * len(steps))  # fsdp: the gradients are reduced on the last
        for parts in micro:
            embeds = PromptEmbeds.concat([e for _, e, _ in parts]) if len(parts) > 1 else parts[0][1]
            seeds = [s for _, _, task_seeds in parts for s in task_seeds]
            spans, start = {}, 0  # each task's rows of the batch
            for task, e, _ in parts:
                spans[task], start = slice(start, start + len(e)), start + len(e)
            teachers = [self.task_teachers[task][0] for task, e, _ in parts for _ in range(len(e))]
            guidance = [self.task_teachers[task][1] for task, e, _ in parts for _ in range(len(e))]
            with acc.autocast(), self.glue():
                for step in self.student_steps(embeds, seeds, steps):
                    with timer("teacher"):
                        mean_t = teacher_mean(self.policy, step, embeds, teachers, guidance, c.sample.noise_level)
                    losses = self.step_loss(step.result, mean_t, step.dt)
                    for task, span in spans.items():
                        key = f"{task}/step_{step.index}"
                        sums[key] = sums.get(key, 0) + losses.detach()[span].sum()
                    with timer("backward"):
                        self.run.backward(losses.sum() * scale)
        metrics = {f"loss/{k}": v for k, v in self.run.mean_over_processes(sums, per_task).items()}
        for task in batches:
            metrics[f"loss/{task}"] = sum(metrics[f"loss/{task}/step_{j}"] for j in steps) / len(steps)
        metrics["loss"] = sum(metrics[f"loss/{t}"] for t in batches) / len(batches)
        return metrics

    # -- held-out evaluation -------------------------------------------------------------------
    def heldout_distance(self, embeds: PromptEmbeds, seeds: list[int], teacher: str, guidance: float,
                         steps: list[int]) -> torch.Tensor:
        """Mean per-step loss (KL or L2) between student and teacher on the student's own
        rollouts, without gradients: the held-out distillation metric. The student's means come
        from the rollout itself; only the teacher is queried again."""
        with torch.no_grad():
            traj = sample(self.policy, embeds, seeds, self.sampling, keep_states=True)
            total = torch.zeros((), device=traj.latents.device)
            for j in steps:
                step = Step(j, traj.states[j], float(traj.sigmas[j]), float(traj.sigmas[j + 1]),
                            StepResult(prev_sample=traj.next_state(j), mean=traj.means[j], std=traj.stds[j],
                                       log_prob=None))
                mean_t = teacher_mean(self.policy, step, embeds, teacher, guidance, self.sampling.noise_level)
                total = total + self.step_loss(step.result, mean_t, step.dt).sum()
        return total / (len(seeds) * len(steps))

    def evaluate(self, round_idx: int) -> dict:
        """Student-vs-teacher distance on held-out prompts (fixed seeds) and, if configured, the
        task rewards of decoded images. Uses the EMA weights when the EMA is on."""
        c, run = self.config, self.run
        steps = list(range(c.train.num_train_steps))
        out = {}
        ctx = run.ema.swapped_in() if run.ema is not None else nullcontext()
        with ctx, run.accelerator.autocast():
            for task, spec in c.tasks.items():
                rows, embeds, seeds = run.eval_batch(task)
                dist = self.heldout_distance(embeds, seeds, *self.task_teachers[task], steps)
                out[f"eval/distance/{task}"] = run.accelerator.reduce(dist.reshape(1), reduction="mean").item()
                if c.eval.rewards and spec.reward:
                    out[f"eval/reward/{task}"] = run.eval_reward(task)
        run.timer.reset()
        return out


def train(config) -> Run:
    """Run (or resume) the OPD recipe described by ``config``; returns the finished run."""
    run = Run(config)
    return run.train(OPD(run))


def geometry(config, world_size: int) -> dict:
    """OPD's numbers printed at start: images, forwards per round, the loss."""
    s, t = config.sample, config.train
    per_task = t.batch_size * t.grad_accum
    n_tasks = len(config.tasks)

    def rows(g):  # a CFG scale > 1 doubles the rows; a guidance embedding (model.guidance=embedded) never does
        return 2 if g > 1 and config.model.guidance != "embedded" else 1

    cfg_mult = rows(s.guidance_scale)
    teacher_cfg = {n: rows(config.teachers[config.tasks[n].teacher].guidance_scale) for n in config.tasks}
    loss = t.loss if t.loss != "auto" else ("l2" if s.noise_level == 0 else "kl")
    return {
        "images_per_task_per_process": per_task,
        "trained_steps_per_image": f"{t.num_train_steps} of {s.num_steps}",
        "student_forwards_per_round_per_process": per_task * n_tasks * s.num_steps * cfg_mult
        + (per_task * n_tasks * t.num_train_steps * cfg_mult if t.mode == "two_pass" else 0),
        "teacher_forwards_per_round_per_process": sum(per_task * t.num_train_steps * teacher_cfg[n] for n in config.tasks),
        "optimizer_steps": t.num_rounds,
        "total_images": per_task * n_tasks * world_size * t.num_rounds,
        "loss": loss,
        "mode": t.mode,
    }


SPEC = register(RecipeSpec("opd", build=OPD, prompts_keys=("train.batch_size", "train.grad_accum"),
                           task_needs="teacher", geometry=geometry,
                           description="multi-task on-policy distillation from per-task teachers (stage 2)"))
