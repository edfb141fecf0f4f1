"""What every reward scorer is: ``scorer(images, prompts, metadata=None) -> {key: np.ndarray}``.

The returned dict always has the scorer's ``name`` as a key (one float per image); extra keys
are allowed (GenEval's ``correct`` / ``strict_correct``, OCR's ``recognised``...). Models load
lazily on first call, once per process, on the chosen device.

Checkpoints: every reward looks first in a local folder under the checkpoint root
(``reward_ckpts/`` by default, see reward_ckpts/README.md), then in the Hugging Face cache /
Hub under its documented id; when neither has it, ``MissingCheckpointError`` lists the places
it looked and the exact command that fetches the files.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ..errors import UserError

DEFAULT_CKPT_ROOT_ENV = "DIFFUSION_OPD_REWARD_CKPTS"


def ckpt_root(root: Optional[str] = None) -> Path:
    """The reward checkpoint root: explicit arg > $DIFFUSION_OPD_REWARD_CKPTS > ./reward_ckpts."""
    return Path(root or os.environ.get(DEFAULT_CKPT_ROOT_ENV, "reward_ckpts"))


def download_command(reward: str) -> str:
    """The command that fetches one reward's checkpoints (scripts/download_reward_ckpts.py)."""
    return f"python scripts/download_reward_ckpts.py --only {reward}"


class MissingCheckpointError(UserError, FileNotFoundError):
    """A reward checkpoint is not where we looked; the message says how to get it."""

    exit_code = 1

    def __init__(self, reward: str, looked_at: Sequence[str | Path], how_to_get: str, detail: str = ""):
        where = "\n  ".join(str(p) for p in looked_at)
        super().__init__(
            f"reward '{reward}': checkpoint not found. Looked at:\n  {where}\n"
            + (f"Last error: {detail}\n" if detail else "")
            + f"Get it with:\n  {how_to_get}\n"
            f"(or pass a local folder/file option; see reward_ckpts/README.md)"
        )


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is returned as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_file(
    reward: str,
    local: Iterable[str | Path],
    hub_repo: Optional[str] = None,
    hub_filenames: Sequence[str] = (),
    how_to_get: Optional[str] = None,
) -> Path:
    """The first existing ``local`` file, else a Hub file (from the HF cache, or downloaded when
    the Hub is reachable and HF_HUB_OFFLINE is unset), else ``MissingCheckpointError``."""
    looked: list[str] = []
    for path in local:
        if path and Path(path).is_file():
            return Path(path)
        if path:
            looked.append(str(path))
    detail = ""
    if hub_repo:
        from huggingface_hub import hf_hub_download

        for filename in hub_filenames:
            looked.append(f"Hugging Face Hub / cache: {hub_repo} :: {filename}")
            try:
                return Path(hf_hub_download(hub_repo, filename))
            except Exception as err:  # offline, missing file, no network: try the next one
                detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise MissingCheckpointError(reward, looked, how_to_get or download_command(reward), detail)


def resolve_dir(
    reward: str,
    local: Iterable[str | Path],
    hub_repo: Optional[str] = None,
    marker: str = "config.json",
    how_to_get: Optional[str] = None,
    allow_patterns: Optional[list[str]] = None,
) -> str:
    """The first ``local`` folder holding ``marker``, else a Hub snapshot (HF cache, or a download
    when the Hub is reachable), else ``MissingCheckpointError``. Returns a path string usable by
    ``from_pretrained``. ``allow_patterns`` limits a snapshot to the files needed (a processor
    needs a few JSON files, not the repo's multi-GB weights)."""
    looked: list[str] = []
    for path in local:
        if path and (Path(path) / marker).is_file():
            return str(path)
        if path:
            looked.append(f"{path}/{marker}")
    detail = ""
    if hub_repo:
        from huggingface_hub import snapshot_download

        looked.append(f"Hugging Face Hub / cache: {hub_repo}")
        try:
            return snapshot_download(hub_repo, allow_patterns=allow_patterns)
        except Exception as err:
            detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise MissingCheckpointError(reward, looked, how_to_get or download_command(reward), detail)


class Scorer:
    """Base class: subclasses set ``name`` and implement ``_load`` and ``_score``.

    ``stats`` counts notable events per process (e.g. OCR prompts without a quoted span,
    unparseable UnifiedReward replies) so that callers can log them instead of losing them.
    """

    name: str = "reward"
    scores_frames: bool = True  # an image reward that can score a video's frames (rewards/video.py)
    video_only: bool = False  # a reward of whole videos (lists of frames), e.g. temporal_consistency

    def __init__(self, device: str = "cpu", batch_size: int = 16, **options: Any):
        if batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.options = options
        self.stats: collections.Counter = collections.Counter()
        self._loaded = False

    def load(self) -> "Scorer":
        """Load the model(s) once; later calls are free."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def _load(self) -> None:  # pragma: no cover - overridden
        pass

    def check_inputs(self, prompts: list[str], metadata: Optional[list[dict]]) -> None:
        """Reject bad prompts/metadata before any model loads (subclasses extend this)."""

    def _score(self, images: list, prompts: list[str], metadata: Optional[list[dict]]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, images, prompts, metadata=None) -> dict[str, np.ndarray]:
        """Score ``images`` against ``prompts`` (and per-image ``metadata`` rows where the reward
        needs them); returns one array per key, one entry per image."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts")
        from ..video import is_video

        videos = bool(images) and is_video(images[0])
        if videos and not self.video_only:  # an image reward on videos: every frame, mean per video
            from .video import score_frames

            return score_frames(self, images, prompts, metadata)
        if self.video_only and images and not videos:
            raise ValueError(f"{self.name}: scores videos (lists of frames), got images")
        if metadata is not None and len(metadata) != len(images):
            raise ValueError(f"{self.name}: got {len(metadata)} metadata rows for {len(images)} images")
        self.check_inputs(prompts, None if metadata is None else list(metadata))
        self.load()
        out: dict[str, list] = {}
        for i in range(0, len(images), self.batch_size):
            sl = slice(i, i + self.batch_size)
            part = self._score(images[sl], prompts[sl], None if metadata is None else list(metadata[sl]))
            for k, v in part.items():
                out.setdefault(k, []).append(np.asarray(v))
        result = {k: np.concatenate(v) if v and v[0].ndim else np.asarray(v) for k, v in out.items()}
        if images and self.name not in result:
            raise RuntimeError(f"scorer {self.name} did not return its own key")
        if not images:
            result = {self.name: np.zeros(0, dtype=np.float32)}
        return result
