"""One training run, whatever the recipe: the machinery OPD, DiffusionNFT and Flow-GRPO share.

A recipe (``trainers/opd.py``, ``trainers/nft.py``, ``trainers/grpo.py``) owns the maths of a
round: what to sample, what to score, which loss to backpropagate. Everything else is here,
once: the checks before anything loads (trainers/preflight.py), ownership of ``output_dir``
(trainers/run_dir.py), processes (accelerate), the policy, the student's optimizer and EMA,
prompt samplers, seeds, verified checkpoints and resume, metrics, and the rounds loop with
periodic evaluation and saving, which stops cleanly on SIGTERM / SIGINT (trainers/stop.py).

    run = Run(config)              # validated config -> processes, policy, optimizer, samplers
    recipe = OPD(run)              # the recipe's own state (losses, old-policy adapter...)
    run.train(recipe)              # resume, then: recipe.round -> eval -> log -> save

A recipe implements ``round(round_idx) -> metrics`` (it calls :meth:`Run.optimizer_step`
itself, once or several times), ``evaluate(round_idx) -> metrics``, ``images_per_round`` and
optionally ``state_dict`` / ``load_state_dict`` for what it must carry across a resume.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Optional, Protocol

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..config import to_dict, validate_config
from ..data.sampler import PromptSampler
from ..evaluation.core import eval_seed, evaluate_rows, mean_score, sample_images
from ..models.base import STUDENT, Policy, PromptEmbeds
from ..recipes import recipe_spec
from ..rewards.multi import task_scorer
from ..rollout import Sampling
from ..seeds import sample_seed
from . import checkpoint as ckpt
from . import sharding
from .ema import EMA
from .metrics import MetricsLog, PhaseTimer, peak_memory_gb, read_metrics, synchronize
from .preflight import preflight
from .run_dir import claim_output_dir
from .setup import (all_reduce_gradients, broadcast_parameters, build_optimizer, build_policy_from_config,
                    make_accelerator, optimizer_settings, restore_settings)
from .stop import NonFiniteGuard, RunStopped, StopRequest
from .trackers import Trackers
from .visuals import CURVES_FILE, SampleGrids, plot_curves, quiet_progress_bars

__all__ = ["Recipe", "Run"]


class Recipe(Protocol):
    name: str
    images_per_round: int  # over all processes (for images/s)

    def round(self, round_idx: int) -> dict: ...

    def evaluate(self, round_idx: int) -> dict: ...


class Run:
    """State of one training run (built from a config; ``train(recipe)`` drives it).

    ``policy``: an already built policy; by default it is built from ``config.model`` /
    ``config.teachers``. ``timer``: what times the phases of a round (default: a
    :class:`PhaseTimer` as ``logging.phase_times`` says; the benchmark passes its own).
    ``embeddings``: fixed encoded prompts per task (``{task: PromptEmbeds}``) that every round
    trains on instead of drawing prompts; such a run reads no prompt files and writes nothing
    (no output folder, no checkpoint, no resume): the benchmark's random-weight rounds.
    """

    def __init__(self, config, *, policy: Optional[Policy] = None, timer: Optional[PhaseTimer] = None,
                 embeddings: Optional[dict[str, PromptEmbeds]] = None):
        self.config = config
        self.accelerator = acc = make_accelerator(config)
        self.rank, self.world = acc.process_index, acc.num_processes
        if not config.logging.progress:  # also the loading bars of diffusers / transformers / the Hub
            quiet_progress_bars()
        tag = f"[{config.recipe}]"
        self.embeddings = embeddings
        check_data = embeddings is None
        if check_data:  # every check a real run makes, before any model loads (--validate_only runs it too)
            checked = preflight(config, self.world, backbone=policy is None, output_dir=False)
            self.prompts, self.eval_prompts = checked.prompts, checked.eval_prompts
        else:  # fixed embeddings: no prompt files, nothing written
            validate_config(config, world_size=self.world)
            self.prompts, self.eval_prompts = {}, {}
        self.spec = recipe_spec(config.recipe)  # what the recipe declares (diffusion_opd/recipes.py)
        self.geometry = self.spec.derived_geometry(config, self.world)
        acc.print(f"{tag} " + f"\n{tag} ".join(f"{k}: {v}" for k, v in self.geometry.items()))
        # output_dir is this run's until close(): a live run elsewhere or another run's files refuse it
        self.lock = claim_output_dir(config, acc) if check_data else None
        try:  # a checkpoint or model that fails to load (a damaged teacher...) hands the folder back at once
            os.makedirs(config.output_dir, exist_ok=True)
            self.resume_path = ckpt.resume_path(config, acc) if check_data else None  # verified, before loading
            set_seed(config.seed)  # the student LoRA's initialisation
            self.policy = policy if policy is not None else build_policy_from_config(config, acc)
        except BaseException:
            if self.lock is not None:
                self.lock.abandon()
            raise
        sharding.place_text_encoders(self.policy, config, acc.device)  # distributed.text_encoders
        self.params = self.policy.trainable_parameters()
        broadcast_parameters(self.params, acc)
        self.build_optimizer()
        self.sync: Optional[sharding.ReduceOnce] = None  # distributed.strategy=fsdp, once sharded (shard())
        self.prompts_per_round = self.spec.prompts_per_round(config)
        self.samplers = {
            task: PromptSampler(len(rows), self.prompts_per_round, self.rank, self.world, seed=config.seed + 1000 * i)
            for i, (task, rows) in enumerate(self.prompts.items())
        }
        self.timer = timer if timer is not None else PhaseTimer(acc.device, enabled=config.logging.phase_times)
        self.seen_prompts: list[tuple[int, str, list[int]]] = []  # (round, task, indices) on this process
        self.state = ckpt.RunState()
        self.guard = NonFiniteGuard(config.train.nan_patience)
        self.log: Optional[MetricsLog] = None
        self.grids = None  # sample grids: main process only, when there are held-out prompts
        # sampling a grid is a collective under fsdp or non-replicated text encoders: every process
        # takes part, the main one writes
        if (acc.is_main_process or sharding.everyone_samples(config)) and self.eval_prompts and config.eval.sample_images:
            teachers = {t: (spec.teacher, config.teachers[spec.teacher].guidance_scale)
                        for t, spec in config.tasks.items() if spec.teacher}
            self.grids = SampleGrids(config.output_dir, {t: [r["prompt"] for r in rows] for t, rows in
                                                         self.eval_prompts.items()},
                                     teachers, config.eval.sample_images, config.seed,
                                     sampler=f"ODE, {config.eval.num_steps} steps", write=acc.is_main_process)
        self.saved_round = -1
        self.resume_changes: dict = {}  # hyper-parameters changed on resume: logged with the next round

    def build_optimizer(self) -> None:
        """The student's optimizer, LR schedule and EMA over ``self.params`` (again after sharding)."""
        c = self.config
        optimizer, self.scheduler = build_optimizer(self.params, c)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)  # fp16: loss scaling + skipped inf steps
        self.ema = EMA(self.params, c.train.ema_decay, c.train.ema_warmup) if c.train.ema_decay > 0 else None

    def shard(self, recipe: Optional[Recipe] = None) -> None:
        """``distributed.strategy=fsdp``: shard the policy's denoisers (trainers/sharding.py) once
        the recipe has added its adapters, before the first round and before resume; rebuilds the
        optimizer and EMA over the sharded student and lets the recipe re-point the parameters it
        holds (``recipe.rebind_parameters(remap)``). A no-op under ddp or when already sharded."""
        if not sharding.is_fsdp(self.config) or self.sync is not None:
            return
        if self.optimizer.state_dict()["state"]:
            raise RuntimeError("Run.shard: the optimizer has already stepped; shard before the first round")
        remap = sharding.shard_policy(self.policy, self.config)
        self.params = self.policy.trainable_parameters()
        self.build_optimizer()
        if hasattr(recipe, "rebind_parameters"):
            recipe.rebind_parameters(remap)
        self.sync = sharding.ReduceOnce(self.policy.denoiser_modules()[:1], self.accelerator.backward)
        local, full = sharding.local_bytes(self.policy.denoiser_modules()[0])
        self.accelerator.print(f"[fsdp] sharded over {self.world} processes: {local / 2**20:.1f} of "
                               f"{full / 2**20:.1f} MiB of the backbone and its adapters on each")

    # -- what recipes call ----------------------------------------------------------------------
    def expect_backwards(self, count: int) -> None:
        """Announce the backwards before the next optimizer step (fsdp reduces on the last one)."""
        if self.sync is not None:
            self.sync.expect(count)

    def backward(self, loss: torch.Tensor) -> None:
        """One backward into the student's gradients (no communication under ddp; under fsdp the
        reduce-scatter runs on the last announced backward only)."""
        if self.sync is not None:
            self.sync.backward(loss)
        else:
            self.accelerator.backward(loss)

    def draw_prompts(self, task: str, round_idx: int) -> list[dict]:
        """This process's prompt rows of ``task`` for the round (deterministic, resumable)."""
        indices = self.samplers[task].next_indices()
        self.seen_prompts.append((round_idx, task, indices))
        return [self.prompts[task][i] for i in indices]

    def seeds(self, round_idx: int, task_idx: int, count: int) -> list[int]:
        """One seed per sample this process draws: a function of (run seed, round, task, the
        sample's index over all processes), never of the batch it is in."""
        return [sample_seed(self.config.seed, round_idx, task_idx, self.rank * count + i) for i in range(count)]

    def optimizer_step(self, round_idx: int, loss: float) -> dict:
        """Average gradients over processes, clip, and take ONE optimizer step (skipped when the
        loss is non-finite); EMA after the step. Gradients are cleared."""
        c, acc = self.config, self.accelerator
        with self.timer("optimizer"):
            max_norm = c.train.max_grad_norm if c.train.max_grad_norm > 0 else float("inf")
            if self.sync is not None:  # fsdp: reduced (averaged) by the round's last backward
                self.sync.check()
                grad_norm = sharding.clip_grad_norm_(self.params, max_norm)
            else:
                all_reduce_gradients(self.params, acc)
                grad_norm = acc.clip_grad_norm_(self.params, max_norm)
            # fp16: the loss scaler itself skips steps with inf gradients (routine while it calibrates)
            norm = float(grad_norm) if acc.scaler is None else 0.0
            skipped = self.guard.should_skip(loss, round_idx, norm)
            if not skipped:
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update()
            self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "skipped_nonfinite": int(skipped)}

    def mean_over_processes(self, sums: dict[str, torch.Tensor], count: float) -> dict[str, float]:
        """ONE reduction for every logged number: ``sum over processes / (count * world)``."""
        keys = sorted(sums)
        if not keys:
            return {}
        values = self.accelerator.reduce(torch.stack([torch.as_tensor(sums[k]).float().to(self.accelerator.device)
                                                      for k in keys]), reduction="sum")
        return {k: v.item() / (count * self.world) for k, v in zip(keys, values)}

    def eval_rows(self, task: str) -> tuple[list[dict], list[int]]:
        """This process's share of ``task``'s held-out prompts and their indices in the set:
        rows ``rank, rank + world, ...``, the first ``eval.num_prompts`` of them."""
        indices = list(range(self.rank, len(self.eval_prompts[task]), self.world))[: self.config.eval.num_prompts]
        return [self.eval_prompts[task][i] for i in indices], indices

    def eval_batch(self, task: str) -> tuple[list[dict], PromptEmbeds, list[int]]:
        """:meth:`eval_rows` encoded, with the evaluation seeds (:func:`eval_seed` of each row's
        index): the same images at every evaluation, and the ones ``scripts/evaluation.py`` draws."""
        rows, indices = self.eval_rows(task)
        embeds = self.policy.encode_prompts([r["prompt"] for r in rows])
        return rows, embeds, [eval_seed(self.config.seed, i) for i in indices]

    def eval_reward(self, task: str) -> float:
        """Mean of ``task``'s reward spec (``total`` of :func:`task_scorer`) over all processes'
        ODE samples (``eval.num_steps`` steps) of the student: the evaluation core
        (:func:`evaluate_rows`), as ``scripts/evaluation.py`` computes it."""
        c, acc = self.config, self.accelerator
        spec = Sampling.from_config(c.sample, num_steps=c.eval.num_steps, noise_level=0.0)
        device = c.eval.reward_device if c.eval.reward_device != "auto" else str(acc.device)
        rows, indices = self.eval_rows(task)
        scorer = task_scorer(c.tasks[task].reward, device, c.sample.reward_frames, c.sample.frame_reduce)
        records = evaluate_rows(self.policy, rows, indices, spec, c.seed, scorer)
        if self.world > 1:
            from accelerate.utils import gather_object

            records = gather_object(records)
        return mean_score(records, "total")

    def draw_samples(self, round_idx: int) -> None:
        """The sample grids of this evaluation (student with the weights evaluation uses: the EMA
        when it is on; the teachers' rows sampled once), written under ``samples/`` and logged to
        the trackers."""
        if self.grids is None:
            return
        c = self.config
        spec = Sampling.from_config(c.sample, num_steps=c.eval.num_steps, noise_level=0.0)

        def images(prompts, seeds, adapter, guidance):  # the evaluation core's sampler: the images evaluation scores
            return sample_images(self.policy, prompts, seeds, spec.replace(guidance_scale=guidance), adapter=adapter)

        with self.ema.swapped_in() if self.ema is not None else nullcontext(), self.accelerator.autocast():
            written = self.grids.draw(round_idx, images, STUDENT, c.sample.guidance_scale,
                                      "student (EMA)" if self.ema is not None else "student")
        self.log.trackers.log_images(written, round_idx)

    def draw_curves(self) -> None:
        """``curves.png`` from metrics.jsonl (main process), also logged to the trackers."""
        out = self.config.output_dir
        if self.accelerator.is_main_process and os.path.isfile(os.path.join(out, "metrics.jsonl")):
            log = self.config.logging
            path = plot_curves(read_metrics(out), list(self.config.tasks), os.path.join(out, CURVES_FILE),
                               smoothing=log.curve_smoothing, log_scale=log.curve_log_scale)
            if path:
                self.log.trackers.log_images({"curves": path}, self.state.round)

    # -- the rounds loop ---------------------------------------------------------------------------
    def timed_round(self, recipe: Recipe, round_idx: int) -> dict:
        """``recipe.round`` plus what every round logs (lr, seconds, images/s, memory, phases)."""
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        metrics = recipe.round(round_idx)
        synchronize(self.accelerator.device)  # the round's one sync (phase syncs only with logging.phase_times)
        seconds = time.perf_counter() - start
        metrics.update({
            "round": round_idx, "lr": lr, "seconds_per_round": seconds,
            "images_per_second": recipe.images_per_round / seconds,
            "peak_memory_gb": peak_memory_gb(self.accelerator.device),
            **{f"seconds/{k}": v for k, v in self.timer.reset().items()},
        })
        return metrics

    def resume(self, recipe: Optional[Recipe] = None) -> None:
        """Restore the newest checkpoint (``resume_from``) into the run and the recipe, then open
        the metrics log (rows after the resumed round are dropped)."""
        c, acc = self.config, self.accelerator
        path = self.resume_path
        if path:
            wanted = optimizer_settings(self.optimizer, self.scheduler)  # this config's, before the checkpoint's
            self.state = ckpt.load(self, path, recipe_state=getattr(recipe, "load_state_dict", None))
            changed = restore_settings(self.optimizer, self.scheduler, wanted)
            if changed:  # applied, said once, and recorded in the next metrics row
                acc.print(f"[resume] warning: {path} was trained with " + ", ".join(
                    f"{k}={old:g}" for k, (old, _) in changed.items()) + "; this run continues with " + ", ".join(
                    f"{k}={new:g}" for k, (_, new) in changed.items()) + f" from round {self.state.round + 1}")
                self.resume_changes = {f"resume_changed/{k}": new for k, (_, new) in changed.items()}
            for task, s in self.samplers.items():
                s.load_state_dict(self.state.samplers[task])
            self.guard.streak = self.state.nan_streak
            acc.print(f"[{c.recipe}] resumed from {path} at round {self.state.round}")
        trackers = Trackers(acc, c, to_dict(c), self.state.wandb_id)
        self.log = MetricsLog(c.output_dir, acc.is_main_process, trackers)
        self.state.wandb_id = trackers.wandb_id
        self.log.truncate_after(self.state.round)

    def save(self, recipe: Optional[Recipe] = None) -> None:
        self.state.samplers = {t: s.state_dict() for t, s in self.samplers.items()}
        self.state.nan_streak = self.guard.streak
        extra = recipe.state_dict() if hasattr(recipe, "state_dict") else None
        path = ckpt.save(self, recipe_state=extra)
        if path:
            self.accelerator.print(f"[{self.config.recipe}] saved {path}")
        self.saved_round = self.state.round

    def close(self) -> None:
        """Close the metrics log and hand ``output_dir`` back (the lock)."""
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()

    def train(self, recipe: Recipe) -> "Run":
        """Resume if asked, then round after round: train, evaluate every ``eval.every`` rounds and
        at the last round, log, checkpoint every ``save_every`` rounds and at the end."""
        c, acc = self.config, self.accelerator
        self.shard(recipe)
        self.resume(recipe)
        if self.state.round == 0 and c.eval.every:
            self.draw_samples(0)
            self.log.log({"round": 0, **recipe.evaluate(0)})
        last = min(c.train.stop_after_round or c.train.num_rounds, c.train.num_rounds)
        bar = tqdm(range(self.state.round + 1, last + 1), desc=f"{c.recipe} rounds", initial=self.state.round,
                   total=c.train.num_rounds, disable=not (acc.is_main_process and c.logging.progress))
        try:
            with StopRequest() as stop:  # SIGTERM / SIGINT: finish the round, checkpoint, exit non-zero
                for round_idx in bar:
                    metrics = {**self.timed_round(recipe, round_idx), **self.resume_changes}
                    self.resume_changes = {}
                    self.state.round = round_idx
                    # every eval.every rounds, and always at the end: the run's final numbers and pictures
                    if c.eval.every and (round_idx % c.eval.every == 0 or round_idx == c.train.num_rounds):
                        metrics.update(recipe.evaluate(round_idx))
                        self.draw_samples(round_idx)
                    self.log.log(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", s_round=f"{metrics['seconds_per_round']:.2f}")
                    if round_idx % c.save_every == 0 or round_idx == last:
                        self.save(recipe)
                    signum = stop.agreed(acc)
                    if signum:
                        if self.saved_round != round_idx:
                            self.save(recipe)
                        raise RunStopped(f"stopped by signal {signum} after round {round_idx} of {c.train.num_rounds}; "
                                         f"checkpoint written under {ckpt.checkpoint_root(c.output_dir)}; continue "
                                         "with the same command plus resume_from=latest", signum)
            self.draw_curves()
        finally:
            bar.close()
            self.close()
        return self
