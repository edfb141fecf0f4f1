"""What the stage-1 recipes (DiffusionNFT, Flow-GRPO, GRPO-Guard) share: group sampling,
rewards and group-relative advantages. The maths of the advantages is
:func:`diffusion_opd.advantages.group_advantages`; this module feeds it the gathered batch.

Per round and task, each process draws ``rl.groups_per_round`` prompts and samples every one
``rl.group_size`` times (a *group*; each image has its own seed). The decoded images are scored
by the task's reward (``tasks.<task>.reward``: one registered reward or a weighted sum), the
rewards of ALL processes are gathered, and each image's advantage is its reward relative to its
group (``rl.advantage_std``: divided by the whole task batch's std as both references' released
code does, the group's own as the Flow-GRPO paper writes, or nothing), clipped to
``+-rl.advantage_clip``.

Every stage-1 loss of an optimizer step is the MEAN over the samples it keeps (all of them, or
those with a non-zero advantage when ``rl.drop_zero_advantage``) and their trained steps, over
all processes (:func:`update_scale`): what the references get by re-batching the kept samples
and averaging, and the same whatever the number of processes or the micro-batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..advantages import group_advantages, nonzero_advantage_mask
from ..errors import ConfigError
from ..models.base import PromptEmbeds
from ..rewards.multi import task_scorer
from ..rollout import Sampling, Trajectory, sample
from .run import Run

__all__ = ["Groups", "sample_groups", "score_groups", "micro_batches", "updates", "update_scale", "global_loss",
           "evaluate_rewards"]


@dataclass
class Groups:
    """One task's samples of a round on this process (``group_size`` consecutive rows per prompt)."""

    task: str
    rows: list[dict]  # one prompt row per sample
    group_ids: torch.Tensor  # (N,) int64: the prompt's index over all processes (the group label)
    embeds: PromptEmbeds
    seeds: list[int]
    traj: Trajectory  # sampled in micro-batches of train.batch_size, concatenated
    rewards: Optional[torch.Tensor] = None  # (N,) float32 on the policy's device
    advantages: Optional[torch.Tensor] = None  # (N,) float32 on the policy's device
    keep: Optional[torch.Tensor] = None  # (N,) float32: 0 for samples the recipe drops

    def __len__(self) -> int:
        return len(self.rows)


def micro_batches(n: int, size: int) -> list[list[int]]:
    """``[[0..size-1], [size..2 size-1], ...]``: the sampling batches, reused when training so the
    student's forwards at the sampled states repeat the sampling forwards exactly."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def updates(groups: list[Groups], batch_size: int, count: int) -> list[list[tuple[Groups, list[int]]]]:
    """The round's micro-batches ``(groups, indices)`` split into ``count`` optimizer steps, the
    tasks interleaved so that every step sees every task."""
    per_task = [[(g, idx) for idx in micro_batches(len(g), batch_size)] for g in groups]
    ordered = [b for same_position in zip(*per_task) for b in same_position]
    size = len(ordered) // count
    return [ordered[u * size:(u + 1) * size] for u in range(count)]


def update_scale(run: Run, part: list[tuple[Groups, list[int]]], num_steps: int) -> tuple[float, float]:
    """``(scale, count)`` for one optimizer step over ``part``: backpropagating ``scale x`` this
    process's SUM of per-sample, per-step losses makes the step's gradient, after the
    processes' gradients are averaged (trainers/setup.py), the mean over the ``count`` kept
    samples of ALL processes and ``num_steps`` steps. ``scale = world / (count x num_steps)``;
    one all-reduce of the kept count."""
    acc = run.accelerator
    kept = torch.stack([g.keep[idx].sum() for g, idx in part]).sum().float()
    if run.world > 1:
        kept = acc.reduce(kept.to(acc.device), reduction="sum")
    count = max(float(kept), 1.0)  # nothing kept: every loss is 0 and so is the gradient
    return run.world / (count * num_steps), count


def global_loss(run: Run, local: torch.Tensor) -> float:
    """The logged loss of an update: the sum over processes of each one's scaled sum, divided by
    the number of processes (each scale carries ``world``, :func:`update_scale`); the same number
    on every process."""
    if run.world > 1:
        local = run.accelerator.reduce(local.detach().float().to(run.accelerator.device), reduction="sum")
    return float(local) / run.world


def sample_groups(run: Run, round_idx: int, spec: Sampling, *, adapter: str, keep_states: bool) -> list[Groups]:
    """Draw each task's prompts and sample ``rl.group_size`` images of each with ``adapter``."""
    c, policy = run.config, run.policy
    k = c.rl.group_size
    out = []
    for t_idx, task in enumerate(c.tasks):
        prompts = run.draw_prompts(task, round_idx)
        rows = [r for r in prompts for _ in range(k)]
        first = run.rank * len(prompts)  # group labels are unique over processes
        ids = torch.tensor([first + i for i in range(len(prompts)) for _ in range(k)], dtype=torch.int64)
        with run.timer("encode"):
            embeds = policy.encode_prompts([r["prompt"] for r in rows])
        seeds = run.seeds(round_idx, t_idx, len(rows))
        parts = []
        with run.timer("rollout"), run.accelerator.autocast():
            for idx in micro_batches(len(rows), c.train.batch_size):
                parts.append(sample(policy, embeds.select(idx), [seeds[i] for i in idx], spec, adapter=adapter,
                                    keep_states=keep_states))
        out.append(Groups(task, rows, ids, embeds, seeds, Trajectory.cat(parts)))
    return out


def score_groups(run: Run, groups: list[Groups]) -> dict:
    """Decode, score, gather, and set every group's ``rewards``, ``advantages`` and ``keep``.
    Returns the round's reward metrics (means over all processes)."""
    c, acc = run.config, run.accelerator
    device = c.rl.reward_device if c.rl.reward_device != "auto" else str(acc.device)
    metrics = {}
    for g in groups:
        with run.timer("reward"):
            images = run.policy.decode(g.traj.latents)
            scores = task_scorer(c.tasks[g.task].reward, device, c.sample.reward_frames, c.sample.frame_reduce)(images, [r["prompt"] for r in g.rows],
                                                             [r["metadata"] for r in g.rows])
        g.rewards = torch.as_tensor(scores["total"], dtype=torch.float32, device=acc.device)
        # Advantages need every member of a group and, for the global std, the whole batch.
        rewards, ids = acc.gather(g.rewards), acc.gather(g.group_ids.to(acc.device))
        adv = group_advantages(rewards.cpu(), ids.cpu(), std=c.rl.advantage_std, clip=c.rl.advantage_clip)
        n = len(g)
        g.advantages = adv[run.rank * n:(run.rank + 1) * n].to(acc.device)
        nonzero = nonzero_advantage_mask(g.advantages).float()
        g.keep = nonzero if c.rl.drop_zero_advantage else torch.ones_like(nonzero)
        metrics[f"reward/{g.task}"] = rewards.mean().item()
        metrics[f"reward_std/{g.task}"] = rewards.std(unbiased=False).item()
        metrics[f"zero_advantage_fraction/{g.task}"] = 1 - nonzero_advantage_mask(adv).float().mean().item()
    metrics["reward"] = sum(metrics[f"reward/{g.task}"] for g in groups) / len(groups)
    return metrics


def evaluate_rewards(run: Run) -> dict:
    """Mean task reward of the student's deterministic samples (ODE, ``eval.num_steps``) on the
    held-out prompts with fixed seeds; EMA weights when the EMA is on."""
    from contextlib import nullcontext

    c = run.config
    out = {}
    ctx = run.ema.swapped_in() if run.ema is not None else nullcontext()
    with ctx, run.accelerator.autocast():
        for task in c.tasks:
            out[f"eval/reward/{task}"] = run.eval_reward(task)
    run.timer.reset()
    return out


def check_rl(config) -> None:
    """The ``rl`` keys the stage-1 recipes (nft, grpo) share."""
    rl, t = config.rl, config.train
    for key in ("group_size", "groups_per_round", "updates_per_round", "inner_epochs"):
        if rl[key] < 1:
            raise ConfigError(f"rl.{key}: must be >= 1, got {rl[key]}")
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size: {rl.group_size}; group-relative advantages need >= 2 images per prompt")
    images = rl.groups_per_round * rl.group_size
    if images % t.batch_size:
        raise ConfigError(f"train.batch_size: {t.batch_size} does not divide the {images} images a task samples "
                          f"per round (rl.groups_per_round x rl.group_size)")
    if (images // t.batch_size) % rl.updates_per_round:
        raise ConfigError(f"rl.updates_per_round: {rl.updates_per_round} does not divide the {images // t.batch_size} "
                          "micro-batches of a task's round (rl.groups_per_round x rl.group_size / train.batch_size)")
    if rl.kl_beta < 0 or rl.clip_range < 0 or rl.advantage_clip <= 0 or rl.nft_beta <= 0:
        raise ConfigError("rl.kl_beta and rl.clip_range must be >= 0, rl.advantage_clip and rl.nft_beta > 0")


def group_size(config) -> int:
    return config.rl.group_size


def optimizer_steps_per_round(config) -> int:
    return config.rl.updates_per_round * config.rl.inner_epochs


def geometry(config, world_size: int) -> dict:
    """The stage-1 recipes' numbers printed at start."""
    s, t = config.sample, config.train
    return {
        "rewards": {n: spec.reward for n, spec in config.tasks.items()},
        "prompts_per_task_per_process": config.rl.groups_per_round, "images_per_prompt": config.rl.group_size,
        "trained_steps_per_image": f"{t.num_train_steps} of {s.num_steps}",
        "optimizer_steps": t.num_rounds * optimizer_steps_per_round(config),
    }
