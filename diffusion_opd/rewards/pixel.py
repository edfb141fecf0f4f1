"""Weight-free rewards computed from the decoded pixels: ``brightness``, ``colorfulness`` and
``target_color``.

They need no checkpoint and cost microseconds, so every stage-1 recipe can run end to end in
CI (tiny SD3 pipeline, the toy demo), and a multi-task run can give each task its own cheap
reward. Pixels are RGB in [0, 1] (``p = uint8 / 255``); every score is a mean over pixels.

- ``brightness``: mean BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (PIL's "L"), in [0, 1].
- ``colorfulness``: Hasler & Suesstrunk (2003) ``M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2
  + mu_yb^2)`` with ``rg = R - G``, ``yb = (R + G) / 2 - B`` (population std), on the [0, 1]
  scale (the paper's values / 255): 0 for any grey image, about 0.34 for pure red.
- ``target_color``: ``1 - mean_pixels ||p - c|| / sqrt(3)`` in [0, 1], ``c`` the sRGB colour
  named by the prompt's first colour word (one of GenEval's ten colours, CSS values below), or
  the fixed ``color=`` option. 1 for an image entirely of that colour. A prompt naming no colour
  scores NaN (counted in ``stats["prompts_without_color"]``), as OCR does without quoted text.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

import numpy as np

from .base import Scorer
from .clip_common import to_pil
from ..data.coco import COLORS

# Same schema as the other rewards (repo_id, files, local, purpose); nothing to download.
_NOTHING = {"repo_id": None, "files": [], "local": None,
            "purpose": "nothing to download: computed from the decoded pixels"}
CHECKPOINTS = {"none": _NOTHING}

# sRGB of GenEval's colour words: the CSS named colours (brown: CSS "brown").
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 128, 0),
    "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 192, 203), "brown": (165, 42, 42),
    "black": (0, 0, 0), "white": (255, 255, 255),
}
_COLOR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE)


def pixels(image: Any) -> np.ndarray:
    """One image (PIL, HxWxC array, CxHxW tensor) -> float32 RGB array HxWx3 in [0, 1]."""
    return np.asarray(to_pil(image), dtype=np.float32) / 255.0


def prompt_color(prompt: str) -> Optional[str]:
    """The first of GenEval's colour words in ``prompt`` (whole words, any case), else None."""
    match = _COLOR_WORD.search(prompt)
    return match.group(1).lower() if match else None


def brightness(rgb: np.ndarray) -> float:
    """Mean BT.601 luma of an HxWx3 [0, 1] array."""
    return float((rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colourfulness of an HxWx3 [0, 1] array."""
    r, g, b = rgb[..., 0].astype(np.float64), rgb[..., 1].astype(np.float64), rgb[..., 2].astype(np.float64)
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def color_match(rgb: np.ndarray, color: str) -> float:
    """``1 - mean ||p - c|| / sqrt(3)`` for the named colour ``c``."""
    target = np.array(COLOR_RGB[color], dtype=np.float32) / 255.0
    return float(1.0 - np.linalg.norm(rgb - target, axis=-1).mean() / math.sqrt(3))


class BrightnessScorer(Scorer):
    """``brightness``: mean luma in [0, 1]."""

    name = "brightness"

    def _score(self, images, prompts, metadata):
        return {self.name: np.array([brightness(pixels(im)) for im in images], dtype=np.float32)}


class ColorfulnessScorer(Scorer):
    """``colorfulness``: Hasler-Suesstrunk M on the [0, 1] scale."""

    name = "colorfulness"

    def _score(self, images, prompts, metadata):
        return {self.name: np.array([colorfulness(pixels(im)) for im in images], dtype=np.float32)}


class TargetColorScorer(Scorer):
    """``target_color``: closeness to the colour the prompt names (or ``color=``); the extra key
    ``color`` (``target_color/color`` in a MultiReward) says which colour each image was scored
    against ("" when none)."""

    name = "target_color"

    def __init__(self, color: Optional[str] = None, **options: Any):
        super().__init__(**options)
        if color is not None and color not in COLOR_RGB:
            raise ValueError(f"target_color: unknown color '{color}'; valid: {', '.join(COLORS)}")
        self.color = color

    def _score(self, images, prompts, metadata):
        colors = [self.color or prompt_color(p) or "" for p in prompts]
        self.stats["prompts_without_color"] += sum(not c for c in colors)
        scores = [color_match(pixels(im), c) if c else float("nan") for im, c in zip(images, colors)]
        return {self.name: np.array(scores, dtype=np.float32), "color": np.array(colors, dtype=object)}
