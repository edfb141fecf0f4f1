"""The toy world and its rewards: closed forms on hand-made images, the base data's properties."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_opd.data import toy_world as world
from diffusion_opd.rewards import load_reward


def _image(mask: torch.Tensor, rgb, background=0.0) -> Image.Image:
    pixels = mask[..., None] * torch.tensor(rgb) + (1 - mask[..., None]) * background
    return Image.fromarray((pixels.numpy() * 255).round().astype(np.uint8)).resize((16, 16), Image.NEAREST)


def test_rewards_closed_forms():
    square, t = world.SHAPES["square"], world.GLYPHS["T"]
    colour, glyph, aesthetic = (load_reward(n, cache=False) for n in ("toy_colour", "toy_glyph", "toy_aesthetic"))
    red_square = _image(square, (1.0, 0.0, 0.0))
    np.testing.assert_allclose(colour([red_square] * 2, ["a red square", "a cyan square"])["toy_colour"],
                               [1.0, 0.0], atol=1e-6)  # cyan is the opposite corner of the cube
    np.testing.assert_allclose(colour([red_square], ["a magenta square"])["toy_colour"], [1 - 1 / math.sqrt(3)],
                               atol=1e-6)
    assert math.isnan(colour([red_square], ["a square"])["toy_colour"][0])  # no colour word
    np.testing.assert_allclose(glyph([_image(t, (0, 1, 0)), red_square] * 1, ['a sign that says "T"'] * 2)["toy_glyph"],
                               [1.0, float((torch.minimum(square, t).sum() / torch.maximum(square, t).sum()))],
                               atol=1e-6)
    gold = _image(square, world.GOLD)
    noisy = _image(square, world.GOLD, background=0.1)  # background at half the tolerance of 0.2
    np.testing.assert_allclose(aesthetic([gold, noisy], ["x", "x"])["toy_aesthetic"], [1.0, 0.75], atol=0.01)
    blank = Image.new("RGB", (16, 16))
    assert aesthetic([blank], ["x"])["toy_aesthetic"][0] == 0.0  # nothing drawn scores 0


def test_base_data_is_deterministic_and_mediocre_by_design():
    a = world.sample_base_data(2000, torch.Generator().manual_seed(0))
    b = world.sample_base_data(2000, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    images, captions = a
    assert images.shape == (2000, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert 0.05 < sum(c == "" for c in captions) / 2000 < 0.15
    # captions name a wrong colour half the time, right by chance 1 in 7 (weak binding)
    scores = load_reward("toy_colour")(world_images(images), captions)["toy_colour"]
    named = ~np.isnan(scores)
    assert 0.35 < (scores[named] < 0.7).mean() < 0.65  # 0.5 x 6/7 = 0.43 wrong + noisy backgrounds
    vocab = set(world.vocabulary())
    assert all(w in vocab for _, prompts in world.TASKS.values() for p in prompts for w in world.tokenize(p))
    assert world.tokenize('a sign that says "T"')[-1] == '"t"'


def world_images(images):
    arrays = ((images + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


@pytest.mark.parametrize("task", list(world.TASKS))
def test_every_task_prompt_has_a_finite_reward(task):
    reward, prompts = world.TASKS[task]
    image = _image(world.SHAPES["square"], (1.0, 1.0, 1.0))
    scores = load_reward(reward)([image] * len(prompts), prompts)[reward]
    assert np.isfinite(scores).all() and len(set(prompts)) == len(prompts) >= 15


def test_base_pretraining_is_deterministic_and_learns(tmp_path):
    from safetensors.torch import load_file

    from diffusion_opd.demo.pretrain import pretrain_base

    kw = dict(steps=20, batch_size=32, dataset_size=256, progress=False)
    losses = pretrain_base(str(tmp_path / "a"), **kw)
    assert losses == pretrain_base(str(tmp_path / "b"), **kw)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])  # the flow-matching loss falls
