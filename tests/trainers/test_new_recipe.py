"""A new recipe is one file plus a config: this module defines a minimal recipe, registers it,
and trains it two rounds through the real Run, with checkpoints and an exact resume."""
import os

import torch

from diffusion_opd.config import ConfigError, load_config, validate_config
from diffusion_opd.recipes import RecipeSpec, recipe_names, register
from diffusion_opd.rollout import Sampling
from diffusion_opd.trainers import checkpoint as ckpt
from diffusion_opd.trainers.metrics import read_metrics
from diffusion_opd.trainers.recipes import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ShrinkVelocity:
    """Pulls the student's velocity at the first step of its own rollout toward zero: drawn
    prompts, per-sample seeds and one optimizer step per round, all from the Run."""

    name = "shrink_velocity"

    def __init__(self, run):
        self.run = run
        self.images_per_round = SPEC.images_per_round(run.config, run.world)

    def round(self, round_idx: int) -> dict:
        run, c = self.run, self.run.config
        losses = []
        for t_idx, task in enumerate(c.tasks):
            rows = run.draw_prompts(task, round_idx)
            embeds = run.policy.encode_prompts([r["prompt"] for r in rows])
            seeds = run.seeds(round_idx, t_idx, len(rows))
            sampling = Sampling.from_config(c.sample)
            gen = [torch.Generator().manual_seed(s) for s in seeds]
            x = torch.stack([torch.randn(run.policy.latent_shape(sampling.resolution), generator=g) for g in gen])
            sigma = sampling.sigmas(run.policy)[0]
            v = run.policy.velocity(x, torch.full((len(rows),), float(sigma)), embeds, "student", 1.0)
            loss = v.square().mean()
            loss.backward()
            losses.append(loss.item())
        loss = sum(losses) / len(losses)
        return {"loss": loss, **run.optimizer_step(round_idx, loss)}

    def evaluate(self, round_idx: int) -> dict:
        return {}


SPEC = register(RecipeSpec("shrink_velocity", build=ShrinkVelocity, prompts_keys=("train.batch_size",),
                           task_needs=""))


def _config(out, *overrides):
    c = load_config(os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd",
                    [f"output_dir={out}", "train.num_rounds=2", "save_every=1", "eval.every=0",
                     "logging.progress=false", "train.batch_size=2", *overrides])
    c.recipe = "shrink_velocity"
    c.teachers = {}  # the recipe needs neither teachers nor rewards (task_needs="")
    for task in c.tasks.values():
        task.teacher = ""
    return c


def test_a_recipe_defined_in_a_test_trains_checkpoints_and_resumes_exactly(tmp_path):
    assert "shrink_velocity" in recipe_names()
    validate_config(_config(tmp_path / "x"))
    whole = train(_config(tmp_path / "whole"))
    assert [r["round"] for r in read_metrics(str(tmp_path / "whole"))] == [1, 2]
    assert [r for r, _ in ckpt.list_checkpoints(str(tmp_path / "whole"))] == [1, 2]

    train(_config(tmp_path / "split", "train.stop_after_round=1"))
    assert [r for r, _ in ckpt.list_checkpoints(str(tmp_path / "split"))] == [1]
    train(_config(tmp_path / "split", "resume_from=latest"))
    a = ckpt.read_student(ckpt.round_dir(str(tmp_path / "whole"), 2))
    b = ckpt.read_student(ckpt.round_dir(str(tmp_path / "split"), 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical after resume
    first = ckpt.read_student(ckpt.round_dir(str(tmp_path / "whole"), 1))
    assert any(not torch.equal(first[k], a[k]) for k in a)  # round 2 did train
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "whole"))]
    assert losses == [r["loss"] for r in read_metrics(str(tmp_path / "split"))] and whole.state.round == 2


def test_an_unregistered_recipe_is_one_line_naming_the_valid_ones(tmp_path):
    c = _config(tmp_path / "y")
    c.recipe = "nope"
    try:
        validate_config(c)
    except ConfigError as err:
        assert str(err).startswith("recipe: 'nope' is not one of opd, nft, grpo") and "shrink_velocity" in str(err)
    else:
        raise AssertionError("an unknown recipe was accepted")
