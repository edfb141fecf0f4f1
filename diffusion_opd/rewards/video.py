"""Rewards on videos (a decoded video is a list of frames, see :mod:`diffusion_opd.video`).

* Any image reward of the registry scores a video frame by frame: the frames a key selects
  (``sample.reward_frames``: "all", "first", "middle", "last", "count:k", "stride:k") are
  scored as images with the video's prompt and metadata, and each score key is reduced over them
  (``sample.frame_reduce``: "mean", the default, or "min": a video is as good as its worst frame).
* ``temporal_consistency`` (weight-free): ``1 - mean |frame[t+1] - frame[t]|`` over consecutive
  frames and pixels (RGB in [0, 1]): 1 for a still video, lower the more it flickers. It scores
  videos only.

A reward that cannot score frames (``scores_frames = False``: the toy world's rewards read the
toy renderer's layout, not natural frames) is refused for a video config in one line before any
weight loads (:func:`check_video_rewards`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..video import frame_indices, is_video
from .base import Scorer

__all__ = ["FRAME_REDUCE", "score_frames", "TemporalConsistencyScorer", "check_video_rewards"]

FRAME_REDUCE = ("mean", "min")
CHECKPOINTS = {"none": {"repo_id": None, "files": [], "local": None,
                        "purpose": "nothing to download: computed from the decoded frames"}}


def score_frames(scorer: Scorer, videos: Sequence, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None,
                 frames: str = "all", reduce: str = "mean") -> dict[str, np.ndarray]:
    """``scorer`` (an image reward) on the frames ``frames`` selects of each video, every numeric
    key reduced per video by ``reduce`` ("mean" | "min"), text keys kept as the per-frame list;
    one entry per video."""
    if reduce not in FRAME_REDUCE:
        raise ValueError(f"frame_reduce must be one of {list(FRAME_REDUCE)}, got {reduce!r}")
    if not getattr(scorer, "scores_frames", True):
        raise ValueError(f"reward '{scorer.name}' cannot score video frames")
    flat, flat_prompts, flat_meta, counts = [], [], [], []
    for i, video in enumerate(videos):
        chosen = frame_indices(len(video), frames)
        flat += [video[j] for j in chosen]
        flat_prompts += [prompts[i]] * len(chosen)
        flat_meta += [None if metadata is None else metadata[i]] * len(chosen)
        counts.append(len(chosen))
    out = scorer(flat, flat_prompts, None if metadata is None else flat_meta)
    bounds = list(zip(np.cumsum([0] + counts)[:-1], np.cumsum(counts)))
    op = np.mean if reduce == "mean" else np.min
    result = {}
    for key, values in out.items():
        values = np.asarray(values)
        if values.dtype.kind in "biuf":
            result[key] = np.asarray([op(values[a:b].astype(np.float64)) for a, b in bounds], dtype=np.float32)
        else:  # text outputs (OCR's recognised words): the per-frame values of each video
            result[key] = np.empty(len(bounds), dtype=object)
            result[key][:] = [list(values[a:b]) for a, b in bounds]
    return result


class TemporalConsistencyScorer(Scorer):
    """``temporal_consistency``: 1 - mean absolute change between consecutive frames (see module doc)."""

    name = "temporal_consistency"
    video_only = True

    def _score(self, images, prompts, metadata):
        from .pixel import pixels

        scores = []
        for video in images:
            frames = np.stack([pixels(f) for f in video])
            scores.append(1.0 - float(np.abs(np.diff(frames, axis=0)).mean()) if len(frames) > 1 else 1.0)
        return {self.name: np.asarray(scores, dtype=np.float32)}


def check_video_rewards(spec: str, video: bool) -> None:
    """ValueError (one line) for a reward of ``spec`` that cannot score what the run makes: an
    image-only reward that cannot score frames in a video run, a video-only reward in an image run."""
    from . import reward_class, reward_weights

    for name in reward_weights(spec):
        cls = reward_class(name)
        if video and not getattr(cls, "scores_frames", True):
            raise ValueError(f"reward '{name}' scores only images of its own kind and cannot score video frames; "
                             "use an image reward that reads natural images (e.g. brightness, ocr, pickscore)")
        if not video and getattr(cls, "video_only", False):
            raise ValueError(f"reward '{name}' scores videos (frame to frame) but the model makes images "
                             "(sample.num_frames 0)")
