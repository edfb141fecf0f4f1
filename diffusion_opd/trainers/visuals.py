"""What a researcher looks at while a run goes: sample grids and the curves of the run.

* Every ``eval.every`` rounds, ``<output_dir>/samples/<task>/round-<N>.png``: the student's
  images for the first ``eval.sample_images`` held-out prompts of each task, always on the same
  seeds (so grids of different rounds differ only by the weights), captioned with the prompts.
  Once per run, ``samples/<task>/teacher.png``: the task's teacher on the same prompts and seeds,
  the target to compare with. Both are logged to wandb as images too.
* At the end of the run, ``<output_dir>/curves.png``: the training loss and the held-out
  distance / reward of every task over rounds, from ``metrics.jsonl``.
"""
from __future__ import annotations

import os
import textwrap
from typing import Callable, Optional, Sequence

SAMPLES_DIR = "samples"
CURVES_FILE = "curves.png"
TEACHER_LABEL = "teacher"
# (panel title, metric key prefix): one line per task in each panel that has any data
CURVE_PANELS = (("training loss", "loss/"), ("training reward", "reward/"),
                ("held-out distance to the teacher", "eval/distance/"), ("held-out reward", "eval/reward/"))

# (prompts, seeds, adapter, guidance_scale) -> PIL images: the recipe's own sampler
SampleFn = Callable[[Sequence[str], Sequence[int], str, float], list]


def quiet_progress_bars() -> None:
    """Silence the progress bars of diffusers, transformers and huggingface_hub (pipeline loading,
    checkpoint shards, downloads): what ``logging.progress=false`` promises."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()


def captioned_grid(images: Sequence, captions: Sequence[str], columns: Optional[int] = None, width_chars: int = 28):
    """Images side by side (``columns`` per row, default all in one row), each with its caption
    (wrapped, at most 3 lines) in a white strip underneath."""
    from PIL import Image, ImageDraw, ImageFont

    if not images or len(images) != len(captions):
        raise ValueError(f"captioned_grid: {len(images)} images for {len(captions)} captions")
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    cell_w = max(w, 6 * width_chars)  # captions stay legible under small images
    font = ImageFont.load_default()
    line_h, strip = 12, 3 * 12 + 4
    grid = Image.new("RGB", (columns * cell_w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * (h + strip)
        grid.paste(image.convert("RGB").resize((w, h)), (x + (cell_w - w) // 2, y))
        lines = textwrap.wrap(caption, width_chars)[:3]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + h + 2 + j * line_h), line, fill="black", font=font)
    return grid


class SampleGrids:
    """The per-task sample grids of one run (main process only; see the module docstring).

    ``prompts[task]``: the held-out prompt strings (the first ``num_images`` are used);
    ``teachers[task]``: (adapter name, guidance scale) of the task's teacher (absent or None: no
    teacher grid, e.g. for the reward-driven recipes).
    """

    def __init__(self, output_dir: str, prompts: dict[str, Sequence[str]], teachers: dict[str, tuple[str, float]],
                 num_images: int, seed: int):
        self.root = os.path.join(output_dir, SAMPLES_DIR)
        self.prompts = {task: list(rows[:num_images]) for task, rows in prompts.items()}
        self.teachers = teachers
        self.seeds = {task: [seed * 1000 + 100 * t + i for i in range(len(rows))]  # fixed for the whole run
                      for t, (task, rows) in enumerate(self.prompts.items())}

    def path(self, task: str, label: str) -> str:
        return os.path.join(self.root, task, f"{label}.png")

    def _save(self, task: str, label: str, images: list) -> str:
        path = self.path(task, label)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        captioned_grid(images, self.prompts[task]).save(path)
        return path

    def draw(self, round_idx: int, sample: SampleFn, student: str, student_guidance: float) -> dict[str, str]:
        """Write this round's student grids (and the teachers' grids the first time); returns
        ``{wandb key: png path}`` of what was written."""
        written = {}
        for task, prompts in self.prompts.items():
            if not prompts:
                continue
            teacher, guidance = self.teachers.get(task) or (None, 0.0)  # reward-only tasks have no teacher
            if teacher and not os.path.isfile(self.path(task, TEACHER_LABEL)):  # once per run, also across resumes
                images = sample(prompts, self.seeds[task], teacher, guidance)
                written[f"samples/{task}/teacher"] = self._save(task, TEACHER_LABEL, images)
            images = sample(prompts, self.seeds[task], student, student_guidance)
            written[f"samples/{task}"] = self._save(task, f"round-{round_idx}", images)
        return written


def log_images(wandb_run, images: dict[str, str], round_idx: int) -> None:
    """Log PNG files to a wandb run (online or offline) as images at step ``round_idx``."""
    if wandb_run is None or not images:
        return
    import wandb

    wandb_run.log({key: wandb.Image(path, caption=os.path.basename(path)) for key, path in images.items()},
                  step=round_idx)


def plot_curves(rows: Sequence[dict], tasks: Sequence[str], path: str) -> Optional[str]:
    """``curves.png``: one panel per metric family of :data:`CURVE_PANELS` that has data, one line
    per task over rounds (plus the mean loss). Returns the path, or None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, prefix in CURVE_PANELS:
        keys = [("mean" if prefix == "loss/" and k == "loss" else k[len(prefix):], k)
                for k in (["loss"] if prefix == "loss/" else []) + [prefix + t for t in tasks]]
        series = []
        for label, key in keys:
            points = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "round" in r]
            if points:
                series.append((label, points))
        if series:
            panels.append((title, series))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label,
                    linestyle="--" if label == "mean" else "-")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
