"""Evaluation arithmetic: per-dataset summaries and the paper's min-max "Average".

Result rows are dicts ``{"prompt": str, "metadata": dict, "scores": {key: float}}``, one per
image. Score keys are the reward scorers' own keys (``geneval``, ``correct``,
``strict_correct``, ``ocr``, ``pickscore``...).

GenEval: the OFFICIAL overall score is the mean over the six tags of each tag's accuracy
(fraction of ``correct`` images of that tag). The peers' scripts print the mean over images
instead, which weights tags by their image counts (e.g. 400 position vs 320 counting images in
the public metadata); it is reported too, under a name that says it is not the official one.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from ..files import write_json

GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PER_IMAGE_KEY = "geneval/per_image_mean_NOT_official"
STRICT_PER_IMAGE_KEY = "geneval/strict_per_image_mean_NOT_official"


def _as_float(value) -> float:
    """A score as float; None and non-numbers become NaN (counted, never averaged)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def score_stats(values: Iterable) -> dict[str, float]:
    """NaN-aware ``mean``, population ``std`` (ddof 0), ``count`` of finite values and ``nan_count``."""
    arr = np.array([_as_float(v) for v in values], dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std()) if finite.size else math.nan,
        "count": int(finite.size),
        "nan_count": int(arr.size - finite.size),
    }


def _score_keys(rows: Sequence[Mapping]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for key in row.get("scores", {}):
            if key not in keys:
                keys.append(key)
    return keys


def _geneval_metrics(rows: Sequence[Mapping]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-tag and overall accuracies of ``correct`` and ``strict_correct``."""
    for i, row in enumerate(rows):
        if "correct" not in row.get("scores", {}):
            raise ValueError(f"geneval row {i} has no 'correct' score (keys: {sorted(row.get('scores', {}))})")
        if row.get("metadata", {}).get("tag") not in GENEVAL_TAGS:
            raise ValueError(f"geneval row {i}: metadata tag {row.get('metadata', {}).get('tag')!r} "
                             f"is not one of {', '.join(GENEVAL_TAGS)}")
    has_strict = all("strict_correct" in r["scores"] for r in rows)
    metrics: dict[str, float] = {}
    tag_acc, tag_strict = [], []
    present = [t for t in GENEVAL_TAGS if any(r["metadata"]["tag"] == t for r in rows)]
    for tag in present:
        of_tag = [r for r in rows if r["metadata"]["tag"] == tag]
        stats = score_stats(r["scores"]["correct"] for r in of_tag)
        metrics[f"geneval/tag/{tag}"] = stats["mean"]
        metrics[f"geneval/tag/{tag}/count"] = stats["count"]
        metrics[f"geneval/tag/{tag}/nan_count"] = stats["nan_count"]
        tag_acc.append(stats["mean"])
        if has_strict:
            strict = score_stats(r["scores"]["strict_correct"] for r in of_tag)["mean"]
            metrics[f"geneval/tag/{tag}/strict"] = strict
            tag_strict.append(strict)
    # official: unweighted mean of per-tag accuracies (NaN if a tag had no finite value)
    metrics["geneval/overall"] = float(np.mean(tag_acc))
    metrics["geneval/overall_num_tags"] = len(present)
    if has_strict:
        metrics["geneval/strict_overall"] = float(np.mean(tag_strict))
    metrics[PER_IMAGE_KEY] = score_stats(r["scores"]["correct"] for r in rows)["mean"]
    if has_strict:
        metrics[STRICT_PER_IMAGE_KEY] = score_stats(r["scores"]["strict_correct"] for r in rows)["mean"]
    headline = {"geneval/overall": metrics["geneval/overall"]}
    return metrics, headline


def summarize(dataset: str, rows: Sequence[Mapping]) -> dict:
    """Summary of one evaluation run.

    Returns ``{"dataset", "num_rows", "metrics": {name: value}, "headline": {name: value}}``.
    Every score key ``k`` gets ``k/mean``, ``k/std``, ``k/count``, ``k/nan_count``. For
    ``geneval`` the official numbers come first: ``geneval/overall`` (mean of the six per-tag
    accuracies), ``geneval/strict_overall``, ``geneval/tag/<tag>`` and the explicitly labelled
    per-image means; ``correct``/``strict_correct`` get no unlabelled ``/mean``. ``headline``
    holds the numbers a comparison table shows: ``geneval/overall`` for GenEval, else
    ``<dataset>/<score>`` (mean) for every score.
    """
    rows = list(rows)
    if not rows:
        raise ValueError(f"summarize({dataset!r}): no result rows")
    metrics: dict[str, float] = {}
    headline: dict[str, float] = {}
    skip: set[str] = set()
    if dataset == "geneval":
        metrics, headline = _geneval_metrics(rows)
        skip = {"correct", "strict_correct"}
    for key in _score_keys(rows):
        if key in skip:
            continue
        stats = score_stats(r.get("scores", {}).get(key) for r in rows)
        for stat, value in stats.items():
            metrics[f"{key}/{stat}"] = value
        if dataset != "geneval":
            headline[f"{dataset}/{key}"] = stats["mean"]
    return {"dataset": dataset, "num_rows": len(rows), "metrics": metrics, "headline": headline}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "nan"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.4f}"


def write_summary(summary: Mapping, out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``summary.json`` (strict JSON, NaN as null) and ``summary.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "summary.json", out / "summary.md"
    write_json(json_path, dict(summary), sort_keys=False)
    lines = [f"# {summary['dataset']} ({summary['num_rows']} images)", "", "| metric | value |", "|---|---|"]
    lines += [f"| **{k}** | {_fmt(v)} |" for k, v in summary["headline"].items()]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary["metrics"].items() if k not in summary["headline"]]
    if summary["dataset"] == "geneval":
        lines += ["", f"`geneval/overall` is the official GenEval score (mean of per-tag accuracies); "
                      f"`{PER_IMAGE_KEY}` is the per-image mean some scripts print."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def minmax_average(table: Mapping[str, Mapping[str, float]], metrics: Optional[Sequence[str]] = None,
                   higher_is_better: Optional[Mapping[str, bool]] = None) -> dict[str, float]:
    """The paper's "Average": min-max normalise each metric across the compared models
    (best -> 1, worst -> 0, flipped where ``higher_is_better[m]`` is False), then the mean over
    metrics for each model.

    ``table`` maps model -> metric -> value; ``metrics`` defaults to those every model has. A
    metric equal for all models carries no ranking information and is left out (with a
    warning). Needs at least two models and a finite value for every (model, metric).
    """
    models = list(table)
    if len(models) < 2:
        raise ValueError(f"minmax_average needs at least two models, got {models}")
    if metrics is None:
        metrics = [m for m in table[models[0]] if all(m in table[x] for x in models)]
    metrics = list(metrics)
    if not metrics:
        raise ValueError("minmax_average: no metric shared by all models")
    higher_is_better = dict(higher_is_better or {})
    unknown = [m for m in higher_is_better if m not in metrics]
    if unknown:
        raise ValueError(f"higher_is_better names metrics not compared: {unknown}; compared: {metrics}")
    values = np.full((len(models), len(metrics)), np.nan)
    for i, model in enumerate(models):
        for j, metric in enumerate(metrics):
            values[i, j] = _as_float(table[model].get(metric))
    missing = [(models[i], metrics[j]) for i, j in zip(*np.nonzero(~np.isfinite(values)))]
    if missing:
        raise ValueError(f"minmax_average: missing or non-finite values for (model, metric): {missing}")
    lo, hi = values.min(axis=0), values.max(axis=0)
    keep = hi > lo
    if not keep.all():
        warnings.warn(f"minmax_average: metrics equal for all models left out: {[m for m, k in zip(metrics, keep) if not k]}")
    if not keep.any():
        raise ValueError("minmax_average: every metric is equal across models")
    norm = (values[:, keep] - lo[keep]) / (hi[keep] - lo[keep])
    flip = np.array([not higher_is_better.get(m, True) for m, k in zip(metrics, keep) if k])
    norm[:, flip] = 1.0 - norm[:, flip]
    return {model: float(v) for model, v in zip(models, norm.mean(axis=1))}


def comparison_markdown(table: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
                        average: Mapping[str, float]) -> str:
    """A markdown table: one row per model, the metrics' raw values, then the Average."""
    header = "| model | " + " | ".join(metrics) + " | Average |"
    sep = "|---|" + "---|" * (len(metrics) + 1)
    body = [
        f"| {model} | " + " | ".join(_fmt(table[model].get(m)) for m in metrics) + f" | {average[model]:.3f} |"
        for model in table
    ]
    note = ("\nAverage: each metric min-max normalised across the models above (best 1, worst 0), "
            "then averaged over the metrics.")
    return "\n".join([header, sep, *body]) + "\n" + note + "\n"
