"""Several rewards at once and their weighted sum.

    multi = MultiReward({"ocr": 1.0, "pickscore": 0.5}, device="cuda", ocr={"backend": "rapidocr"},
                        remote={"geneval": "http://127.0.0.1:18085"})
    out = multi(images, prompts, metadata)   # {"ocr": ..., "ocr/recognised": ..., "pickscore": ..., "total": ...}

Every reward's main score keeps its name; its extra keys are namespaced ``name/key`` (unless
they already start with the name). ``total`` = sum of weight x main score. A NaN score (e.g.
OCR on a prompt without quoted text) makes the total NaN (``nan_policy="propagate"``, default,
so it cannot pass unnoticed) or is left out of the sum (``nan_policy="ignore"``; a row where
every term is NaN stays NaN).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import check_reward_name, check_weight, load_reward


class MultiReward:
    """``MultiReward({name: weight}, device=..., remote={name: url}, nan_policy=..., **{name: options})``."""

    def __init__(
        self,
        weights: dict[str, float],
        device: str = "cpu",
        remote: Optional[dict[str, str]] = None,
        nan_policy: str = "propagate",
        frames: str = "all",
        frame_reduce: str = "mean",
        **per_reward_options: dict[str, Any],
    ):
        if not weights:
            raise ValueError("MultiReward needs at least one {reward: weight}")
        for name, weight in weights.items():
            check_reward_name(name)
            try:
                check_weight(name, weight)
            except ValueError as err:
                raise ValueError(f"MultiReward: {err}") from None
        remote = dict(remote or {})
        for name, opts in list(per_reward_options.items()) + [(n, {}) for n in remote]:
            if name not in weights:
                raise ValueError(f"MultiReward: options given for '{name}', which has no weight ({', '.join(weights)})")
            if not isinstance(opts, dict):
                raise ValueError(f"MultiReward: options of '{name}' must be a dict, got {type(opts).__name__}")
        if nan_policy not in ("propagate", "ignore"):
            raise ValueError(f"MultiReward: nan_policy must be 'propagate' or 'ignore', got '{nan_policy}'")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.frames, self.frame_reduce = frames, frame_reduce  # how image rewards score videos (rewards/video.py)
        self.nan_policy = nan_policy
        self.scorers = {}
        for name in weights:
            opts = dict(per_reward_options.get(name, {}))
            if name in remote:
                self.scorers[name] = load_reward(name, remote=remote[name], **opts)
            else:
                opts.setdefault("device", device)
                self.scorers[name] = load_reward(name, **opts)

    def __call__(self, images, prompts, metadata=None) -> dict[str, np.ndarray]:
        """Every reward's scores (namespaced extras) plus ``total``, one entry per image."""
        images, prompts = list(images), list(prompts)
        out: dict[str, np.ndarray] = {}
        from ..video import is_video
        from .video import score_frames

        videos = bool(images) and is_video(images[0])
        for name, scorer in self.scorers.items():
            if videos and not getattr(scorer, "video_only", False):
                scores = score_frames(scorer, images, prompts, metadata, self.frames, self.frame_reduce)
            else:
                scores = scorer(images, prompts, metadata)
            for key, value in scores.items():
                out[key if key == name or key.startswith(name) else f"{name}/{key}"] = value
        out["total"] = weighted_total(out, self.weights, self.nan_policy)
        return out


def weighted_total(scores: dict, weights: dict[str, float], nan_policy: str = "propagate") -> np.ndarray:
    """``sum_name weight x scores[name]`` per image (float32); NaN as ``nan_policy`` says (see
    the module docstring)."""
    terms = np.stack([weights[n] * np.asarray(scores[n]).astype(np.float64) for n in weights])
    if nan_policy == "ignore":
        total = np.where(np.isnan(terms).all(axis=0), np.nan, np.nansum(terms, axis=0))
    else:
        total = terms.sum(axis=0)
    return total.astype(np.float32)


def task_scorer(spec: str, device: str, frames: str = "all", frame_reduce: str = "mean") -> MultiReward:
    """The scorer of a task's reward spec (``"ocr"`` or ``"ocr:1.0,pickscore:0.5"``), whose
    ``"total"`` is the weighted sum; videos are scored on the frames ``frames`` selects, reduced
    by ``frame_reduce`` (rewards/video.py). One per process, spec, device and frame choice:
    reward models load once and are shared by training, evaluation and the demo."""
    from . import reward_weights

    key = (spec, device, frames, frame_reduce)
    if key not in _TASK_SCORERS:
        _TASK_SCORERS[key] = MultiReward(reward_weights(spec), device=device, frames=frames, frame_reduce=frame_reduce)
    return _TASK_SCORERS[key]


_TASK_SCORERS: dict[tuple, MultiReward] = {}
