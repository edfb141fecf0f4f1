"""The demo's outputs from its measured results: ``report.md``, ``convergence.png``, ``samples.png``.

Pure functions of the ``results`` dict that :mod:`diffusion_opd.demo.pipeline` fills (and writes
as ``results.json``), so the report can be rebuilt without re-running anything.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..data import toy_world as world

TASKS = list(world.TASKS)
GAIN_KEPT = 0.95  # claim (a): the OPD student keeps at least this share of each teacher's gain
VARIANCE_RATIO = 2.0  # claim (b): the PPO-style gradient's variance at least this many times larger
MEAN_Z = 3.0  # claim (b): the two estimators' means agree within this many standard errors


def min_max_average(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """The paper's "Average": every metric min-max normalised across the compared rows, then the
    mean over metrics (a metric equal on every row contributes 0)."""
    out = {name: 0.0 for name in rows}
    for task in TASKS:
        values = [r[task] for r in rows.values()]
        lo, hi = min(values), max(values)
        for name, r in rows.items():
            out[name] += ((r[task] - lo) / (hi - lo) if hi > lo else 0.0) / len(TASKS)
    return out


def gains_kept(results: dict, method: str) -> dict[str, float]:
    """Per task: (method - base) / (task's teacher - base)."""
    m = results["methods"]
    base = m["base"]["rewards"]
    kept = {}
    for t in TASKS:
        gain = m[f"teacher_{t}"]["rewards"][t] - base[t]
        kept[t] = (m[method]["rewards"][t] - base[t]) / gain if gain > 0 else math.nan  # no gain: nothing to keep
    return kept


def check_claims(results: dict, gain_kept: float = GAIN_KEPT, variance_ratio: float = VARIANCE_RATIO,
                 mean_z: float = MEAN_Z) -> list[dict]:
    """The paper's claims, each with ``held`` (bool) and the measured numbers behind it."""
    m = results["methods"]
    claims = []
    teacher_gains = {t: m[f"teacher_{t}"]["rewards"][t] - m["base"]["rewards"][t] for t in TASKS}
    kept = gains_kept(results, "opd")
    claims.append(dict(
        id="a1", held=all(g > 0 for g in teacher_gains.values()) and all(kept[t] >= gain_kept for t in TASKS),
        text=f"the OPD student keeps >= {gain_kept:.0%} of every teacher's reward gain over the base",
        measured=", ".join(f"{t} {kept[t]:.1%} of {teacher_gains[t]:+.3f}" for t in TASKS)))
    rows = {k: v["rewards"] for k, v in m.items() if v["kind"] != "teacher"}
    avg = min_max_average(rows)
    for baseline in [k for k, v in m.items() if v["kind"] == "baseline"]:
        claims.append(dict(
            id=f"a2_{baseline}", held=avg["opd"] > avg[baseline],
            text=f"the OPD student beats {m[baseline]['label']} at equal compute (min-max Average)",
            measured=f"{avg['opd']:.3f} vs {avg[baseline]:.3f}"))
    v = results["variance"]
    claims.append(dict(
        id="b1", held=v["z"] <= mean_z,
        text=f"the closed-form and PPO-style gradients have the same expectation (means within {mean_z:g} "
             "standard errors)",
        measured=f"norm of the mean difference {v['mean_diff_norm']:.3g} = {v['z']:.2f} standard errors"))
    claims.append(dict(
        id="b2", held=v["ratio"] >= variance_ratio,
        text=f"the PPO-style gradient's variance is >= {variance_ratio:g}x the closed-form's",
        measured=f"{v['ratio']:.1f}x (trace of the per-trajectory gradient covariance, "
                 f"{v['trace_ppo']:.3g} vs {v['trace_kl']:.3g})"))
    return claims


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def report_markdown(results: dict) -> str:
    """The report: setup, the paper-shaped table, the ablations, the gradient variance, the claims."""
    m, v = results["methods"], results["variance"]
    rows = {k: x["rewards"] for k, x in m.items() if x["kind"] != "teacher"}
    avg = min_max_average(rows)
    head = "| model | " + " | ".join(TASKS) + " | Average | wall-clock | training images |"
    lines = [
        "# DiffusionOPD on the toy world: measured results",
        "",
        f"Profile `{results['profile']}`, seed {results['seed']}, machine: {results['machine']}. "
        f"Every number below comes from this run (`{results['command']}`); the wall-clock columns "
        "vary between runs, every other number is identical for the same seed.",
        "",
        "## The setup",
        "",
        results["setup"],
        "",
        "## Per-task reward (held-out seeds, ODE, "
        f"{results['eval']['num_steps']} steps, CFG {results['eval']['guidance_scale']:g}, "
        f"{results['eval']['samples']} images per model)",
        "",
        head,
        "|" + "---|" * (len(TASKS) + 4),
    ]
    for name, x in m.items():
        r = x["rewards"]
        cells = []
        for t in TASKS:
            cell = f"{r[t]:.3f}"
            if x["kind"] == "teacher" and name == f"teacher_{t}":
                cell = f"**{cell}**"
            cells.append(cell)
        average = f"{avg[name]:.3f}" if name in avg else "—"
        images = f"{x['images']:,}" if x.get("images") else "—"
        if x.get("diverged"):
            images += f" (diverged: loss non-finite, stopped at {x['diverged']})"
        lines.append(f"| {x['label']} | " + " | ".join(cells) + f" | {average} | {_fmt_seconds(x['seconds'])} | {images} |")
    kept = gains_kept(results, "opd")
    lines += [
        "",
        "Teachers are each trained on their own task only (bold: the task they were made for) and "
        "are left out of the Average, which min-max normalises each task's reward over the other "
        "rows (as the paper's table does) and averages the three. The OPD student's wall-clock is "
        "stage 2 only; stage 1 (the three teachers) took "
        f"{_fmt_seconds(sum(m[f'teacher_{t}']['seconds'] for t in TASKS))} more. The baselines got the "
        "same training images as the whole OPD pipeline (teachers + student): equal compute, "
        "counted in images rolled out for training (multi-task NFT and multi-task GRPO-Guard: one "
        "student on all three tasks; cascade NFT: a third per stage, each stage starting from the "
        "previous stage's student). Stage-1 runs (teachers, baselines) are scored with the EMA of "
        "their weights, as DiffusionNFT and Flow-GRPO evaluate and save them.",
        "",
        "Share of each teacher's gain over the base kept by the OPD student: "
        + ", ".join(f"{t} {kept[t]:.1%}" for t in TASKS) + ".",
        "",
        "## Closed-form KL vs PPO-style gradient",
        "",
        f"At the start of stage 2 (student = base, teachers trained), {v['trajectories']} SDE trajectories "
        f"(noise level {v['noise_level']:g}) of the {', '.join(TASKS)} prompts; per trajectory the "
        "gradient of the summed per-step loss over the student LoRA's parameters, once with "
        "`losses.opd_kl` (closed form, eq. 11) and once with `losses.opd_ppo_surrogate` (the KL as a "
        "dense reward: pathwise + score-function term).",
        "",
        "| estimator | squared norm of the mean | variance (trace of covariance) |",
        "|---|---|---|",
        f"| closed-form KL | {v['mean_norm2_kl']:.4g} | {v['trace_kl']:.4g} |",
        f"| PPO-style | {v['mean_norm2_ppo']:.4g} | {v['trace_ppo']:.4g} |",
        "",
        f"Variance ratio PPO-style / closed-form: **{v['ratio']:.1f}x**. Difference of the means: "
        f"{v['mean_diff_norm']:.4g} = {v['z']:.2f} standard errors of the difference (same expectation).",
        "",
        "## The paper's claims on this run",
        "",
        "| claim | measured | held |",
        "|---|---|---|",
    ]
    for c in results["claims"]:
        lines.append(f"| {c['text']} | {c['measured']} | {'yes' if c['held'] else '**no**'} |")
    lines += [
        "",
        "## Timings",
        "",
        "| stage | wall-clock |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt_seconds(s)} |" for k, s in results["timings"].items()]
    lines += ["", "Figures: `convergence.png` (reward vs wall-clock per method), `samples.png` "
              "(the same noise through every model).", ""]
    return "\n".join(lines)


def plot_convergence(results: dict, path: str) -> None:
    """One panel per task + the mean: reward vs cumulative wall-clock for every trained method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["methods"]
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(4 * (len(TASKS) + 1), 3.4), sharex=True)
    styles = {"opd": ("C0", "-"), "opd_sde": ("C0", "--"), "opd_ppo": ("C0", ":"), "multitask": ("C1", "-"),
              "multitask_guard": ("C3", "-"), "cascade": ("C2", "-")}
    for i, ax in enumerate(axes):
        task = TASKS[i] if i < len(TASKS) else None
        for name, x in m.items():
            if not x.get("curve") or (x["kind"] == "teacher" and name != f"teacher_{task}"):
                continue
            xs = [p["seconds"] for p in x["curve"]]
            ys = [p["rewards"][task] if task else sum(p["rewards"].values()) / len(TASKS) for p in x["curve"]]
            colour, line = styles.get(name, ("k", "-"))  # teachers in black
            ax.plot(xs, ys, line, color=colour, marker=".", ms=3,
                    label="teacher of the task" if x["kind"] == "teacher" else x["label"])
        base = m["base"]["rewards"]
        ax.axhline(base[task] if task else sum(base.values()) / len(TASKS), color="grey", lw=0.8, ls="--",
                   label="base")
        ax.set_title(task or "mean over tasks")
        ax.set_xlabel("wall-clock (s, stage 2 starts after stage 1)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward")
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_samples(rows: Sequence[Sequence], labels: Sequence[str], prompts: Sequence[str], path: str,
                 scale: int = 4) -> None:
    """A grid of images: one row per model, one column per prompt (the same noise in a column)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    cell = rows[0][0].size[0] * scale
    left, top = 210, 30
    grid = Image.new("RGB", (left + cell * len(prompts), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, p in enumerate(prompts):
        for k, line in enumerate(_short(p)):
            draw.text((left + j * cell + 2, 2 + 13 * k), line, fill="black", font=font)
    for i, (label, row) in enumerate(zip(labels, rows)):
        draw.text((4, top + i * cell + cell // 2 - 6), label, fill="black", font=font)
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (left + j * cell, top + i * cell))
    grid.save(path)


def _short(prompt: str) -> list[str]:
    """A prompt on two short lines for a column header."""
    prompt = prompt.removeprefix("a ")
    if " that says " in prompt:
        kind, text = prompt.split(" that says ")
        return [kind, f"says {text}"]
    words = prompt.split(", ")
    return words if len(words) > 1 else prompt.split(" ", 1) if " " in prompt else [prompt]
