"""Rewards of the demo's toy world (diffusion_opd/data/toy_world.py): cheap, weight-free, dense.

Images are read as RGB in [0, 1] and box-averaged to the world's 8x8 grid. The foreground
weight of a pixel is ``w = clamp((max(r, g, b) - 0.3) / 0.4, 0, 1)`` (bright = object; the
world's backgrounds are dark). An image with less than two pixels of foreground scores 0.

* ``toy_colour`` (the GenEval stand-in: attribute binding). Target = the palette colour named in
  the prompt; score = foreground-weighted mean of ``1 - ||pixel - target|| / sqrt(3)``.
* ``toy_glyph`` (the OCR stand-in: text rendering). Target = the letter quoted in the prompt,
  centred; score = soft IoU ``sum(min(w, m)) / sum(max(w, m))`` with the letter's mask ``m``.
* ``toy_aesthetic`` (the aesthetic-score stand-in, prompt-independent): the mean of
  *cleanliness* ``1 - clamp(mean background brightness / 0.2, 0, 1)`` and *warmth*, the
  foreground-weighted ``1 - ||pixel - gold|| / sqrt(3)``.

All three lie in [0, 1]; a prompt without the needed word (colour or quoted letter) scores NaN
so that a wiring mistake cannot hide as a low score.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..data.toy_world import GLYPHS, GOLD, IMAGE_SIZE, PALETTE
from ..data.toy_world import tokenize as _tokenize
from .base import Scorer

# Same schema as the other rewards; nothing to download.
CHECKPOINTS = {"none": {"repo_id": None, "files": [], "local": None,
                        "purpose": "nothing to download: rules on the toy world's pixels"}}


def image_grid(image) -> np.ndarray:
    """A PIL image -> (8, 8, 3) float array in [0, 1] (box average down to the world's grid)."""
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(rgb, dtype=np.float64) / 255.0


def foreground(grid: np.ndarray) -> np.ndarray:
    """Soft object mask of an (8, 8, 3) grid in [0, 1]."""
    return np.clip((grid.max(axis=-1) - 0.3) / 0.4, 0.0, 1.0)


def colour_match(grid: np.ndarray, target, weight: np.ndarray) -> float:
    """Weighted mean of ``1 - ||pixel - target|| / sqrt(3)``."""
    score = 1.0 - np.linalg.norm(grid - np.asarray(target), axis=-1) / math.sqrt(3)
    return float((weight * score).sum() / weight.sum())


class _ToyScorer(Scorer):
    scores_frames = False  # the toy renderer's layout, not natural frames (rewards/video.py)

    def _score(self, images, prompts, metadata: Optional[list]):
        scores = []
        for image, prompt in zip(images, prompts):
            grid = image_grid(image)
            w = foreground(grid)
            scores.append(0.0 if w.sum() < 2 else self.score_grid(grid, w, _tokenize(prompt)))
        return {self.name: np.asarray(scores, dtype=np.float64)}

    def score_grid(self, grid: np.ndarray, w: np.ndarray, words: list[str]) -> float:
        raise NotImplementedError


class ToyColourScorer(_ToyScorer):
    name = "toy_colour"

    def score_grid(self, grid, w, words):
        named = [word for word in words if word in PALETTE]
        return colour_match(grid, PALETTE[named[0]], w) if named else math.nan


class ToyGlyphScorer(_ToyScorer):
    name = "toy_glyph"

    def score_grid(self, grid, w, words):
        letters = [word.strip('"').upper() for word in words if word.startswith('"')]
        if not letters or letters[0] not in GLYPHS:
            return math.nan
        mask = GLYPHS[letters[0]].numpy()
        return float(np.minimum(w, mask).sum() / np.maximum(w, mask).sum())


class ToyAestheticScorer(_ToyScorer):
    name = "toy_aesthetic"

    def score_grid(self, grid, w, words):
        background = 1.0 - w
        brightness = (background * grid.max(axis=-1)).sum() / max(background.sum(), 1e-6)
        clean = 1.0 - min(brightness / 0.2, 1.0)
        return 0.5 * clean + 0.5 * colour_match(grid, GOLD, w)
