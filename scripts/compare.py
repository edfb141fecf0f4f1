#!/usr/bin/env python
"""Compare evaluation runs: a markdown table with the paper's min-max Average, and a bar chart.

    python scripts/compare.py A_geneval/summary.json A_ocr/summary.json B_geneval/summary.json \\
        B_ocr/summary.json --names A A B B --out comparison/ [--metrics geneval/overall ocr/ocr]
        [--lower-is-better METRIC ...]

Each summary.json (written by diffusion_opd.evaluation.summary.write_summary) contributes its
``headline`` numbers; summaries given the same name are merged into one model row (one model is
usually evaluated on several datasets). Writes DIR/comparison.md, DIR/comparison.json and
DIR/comparison.png (min-max normalised metrics and the Average per model).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from diffusion_opd.errors import UserError, run_cli
from diffusion_opd.evaluation.summary import comparison_markdown, minmax_average


def load_table(paths, names) -> dict:
    """model -> metric -> value from the summaries' headlines (same name: merged)."""
    table: dict = {}
    for path, name in zip(paths, names):
        summary = json.loads(Path(path).read_text())
        if "headline" not in summary:
            raise ValueError(f"{path}: not a summary.json (no 'headline')")
        row = table.setdefault(name, {})
        for metric, value in summary["headline"].items():
            if metric in row:
                raise ValueError(f"model '{name}': metric '{metric}' appears in two summaries")
            row[metric] = math.nan if value is None else float(value)
    return table


def plot(table, metrics, average, higher_is_better, out_png: Path) -> None:
    """Grouped bars: each metric min-max normalised across models, then the Average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(table)
    groups = list(metrics) + ["Average"]
    fig, ax = plt.subplots(figsize=(min(18.0, max(6.0, 1.0 + 0.3 * len(groups) * len(models))), 4.5))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        heights = []
        for metric in metrics:
            column = [table[m][metric] for m in models]
            lo, hi = min(column), max(column)
            h = 0.5 if hi == lo else (table[model][metric] - lo) / (hi - lo)
            heights.append(h if higher_is_better.get(metric, True) else 1.0 - h)
        heights.append(average[model])
        ax.bar(np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width, heights, width, label=model)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("min-max normalised (best = 1)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """Parse arguments, build the table, write the files; returns an exit code."""
    parser = argparse.ArgumentParser(description="Compare summary.json files with the paper's min-max Average.")
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--names", nargs="+", required=True, help="one model name per summary (repeat to merge)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", nargs="+", default=None, help="columns, in order (default: shared by all)")
    parser.add_argument("--lower-is-better", nargs="+", default=[], metavar="METRIC")
    args = parser.parse_args(argv)
    if len(args.names) != len(args.summaries):
        parser.error(f"{len(args.summaries)} summaries but {len(args.names)} --names")
    try:
        table = load_table(args.summaries, args.names)
        models = list(table)
        shared = [m for m in table[models[0]] if all(m in table[x] for x in models)]
        metrics = args.metrics or shared
        missing = [(x, m) for m in metrics for x in models if m not in table[x]]
        if missing:
            raise ValueError(f"metrics missing for (model, metric): {missing}")
        dropped = sorted({m for x in models for m in table[x]} - set(metrics))
        higher = {m: False for m in args.lower_is_better}
        average = minmax_average(table, metrics, higher)
    except (ValueError, OSError) as err:  # unreadable or inconsistent summaries (JSONDecodeError is a ValueError)
        raise UserError(str(err)) from None
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = comparison_markdown(table, metrics, average)
    if dropped:
        markdown += f"\nNot compared (missing for some model): {', '.join(dropped)}\n"
    (args.out / "comparison.md").write_text(markdown)
    (args.out / "comparison.json").write_text(json.dumps(
        {"metrics": metrics, "lower_is_better": args.lower_is_better,
         "table": {k: {m: v for m, v in row.items() if m in metrics} for k, row in table.items()},
         "average": average}, indent=2) + "\n")
    plot(table, metrics, average, higher, args.out / "comparison.png")
    print(markdown)
    print(f"wrote {args.out / 'comparison.md'}, {args.out / 'comparison.json'}, {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
