"""The one evaluation: sample a policy on prompt rows with the one seed rule, score the images,
return per-sample rows. The trainer's periodic evaluation, ``scripts/evaluation.py`` and the
demo all call :func:`evaluate_rows`, so the same checkpoint, prompts and seed give the same
images and the same numbers wherever they are measured.

The seed rule: row ``index`` of a prompt set is sampled from :func:`eval_seed` ``(seed, index)``,
a function of the run's seed and the row's index in the prompt set only, never of the batch,
the process or the task it is evaluated in. Means are :func:`mean_score` of the rows (finite
values only), the same function the CLI's summary uses.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..files import json_safe
from ..models.base import STUDENT, Policy
from ..rollout import Sampling, sample
from ..seeds import sample_seed
from .summary import score_stats

__all__ = ["EVAL", "Scorer", "eval_seed", "evaluate_rows", "mean_score", "sample_images"]

EVAL = -1  # the "round" of every evaluation seed: training seeds use rounds >= 1
Scorer = Callable[..., dict]  # (images, prompts, metadata) -> {key: one value per image}


def eval_seed(seed: int, index: int) -> int:
    """The noise seed of prompt row ``index`` in every evaluation of a run with ``seed``."""
    return sample_seed(seed, EVAL, index)


@torch.no_grad()
def sample_images(policy: Policy, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling,
                  adapter: str = STUDENT, finite: Optional[list] = None) -> list:
    """Decoded images (PIL) of ``adapter`` for ``prompts``, one per seed. ``finite`` (a list)
    receives, per image, whether its latents were finite."""
    embeds = policy.encode_prompts(list(prompts))
    latents = sample(policy, embeds, list(seeds), sampling, adapter=adapter).latents
    if finite is not None:
        finite.extend(torch.isfinite(latents.flatten(1)).all(1).tolist())
    return policy.decode(latents)


def evaluate_rows(policy: Policy, rows: Sequence[dict], indices: Sequence[int], sampling: Sampling, seed: int,
                  scorer: Optional[Scorer], *, adapter: str = STUDENT, batch_size: Optional[int] = None,
                  on_batch: Optional[Callable[[list[dict], list], None]] = None) -> list[dict]:
    """Sample row ``indices[k]`` of the prompt set as ``rows[k]`` (dicts with ``prompt`` and
    ``metadata``) with seed :func:`eval_seed` ``(seed, indices[k])``, ``batch_size`` rows at a
    time (default: all at once), and score each batch with ``scorer``.

    Returns one row per sample: ``index``, ``prompt``, ``metadata``, ``seed``, ``scores``
    (numeric outputs of the scorer, NaN kept as float), ``outputs`` (its other outputs, e.g.
    OCR's recognised text) and ``nonfinite``: a sample whose latents diverged is a failure, its
    scores None (never the score of the image its NaNs decode to), left out of every mean. ``on_batch(records, images)`` sees each batch as it is done (the
    CLI saves images and advances its progress bar there)."""
    if len(rows) != len(indices):
        raise ValueError(f"evaluate_rows: {len(rows)} rows for {len(indices)} indices")
    size = batch_size or max(1, len(rows))
    out: list[dict] = []
    for start in range(0, len(rows), size):
        part, idx = list(rows[start:start + size]), list(indices[start:start + size])
        prompts, metadata = [r["prompt"] for r in part], [r.get("metadata", {}) for r in part]
        seeds = [eval_seed(seed, i) for i in idx]
        finite: list = []
        images = sample_images(policy, prompts, seeds, sampling, adapter, finite)
        scored = scorer(images, prompts, metadata) if scorer is not None else {}
        records = []
        for k, (index, row, s) in enumerate(zip(idx, part, seeds)):
            numeric, extra = {}, {}
            for key, values in scored.items():
                value = values[k]
                if np.asarray(values).dtype.kind in "biuf":
                    numeric[key] = value.item() if hasattr(value, "item") else value  # NaN kept (written as null)
                else:
                    extra[key] = json_safe(value)
            if not finite[k]:
                numeric = {key: None for key in numeric}
            records.append({"index": index, "prompt": row["prompt"], "metadata": row.get("metadata", {}), "seed": s,
                            "scores": numeric, "outputs": extra, "nonfinite": not finite[k]})
        if on_batch is not None:
            on_batch(records, images)
        out.extend(records)
    return out


def mean_score(records: Sequence[dict], key: str) -> float:
    """Mean of ``scores[key]`` over the rows with a finite value (NaN if none): the summary's
    ``mean`` (:func:`~diffusion_opd.evaluation.summary.score_stats`), so every caller agrees."""
    return score_stats(r["scores"].get(key) for r in records)["mean"]
