"""What a researcher looks at while a run goes: sample pictures and the curves of the run.

* At every evaluation (every ``eval.every`` rounds, and always at the last round),
  ``<output_dir>/samples/<task>/round-<N>.png``: ONE picture per task, a teacher row and a
  student row on the same held-out prompts and the same seeds (column by column, so the rows
  differ only by the model; the seeds are fixed for the whole run, so pictures of different
  rounds differ only by the weights). Captioned with the task, round, sampler, each row's model
  and CFG scale and each column's prompt, in DejaVu Sans (the TrueType font matplotlib ships),
  sized to the cells: small samples are enlarged (nearest neighbour) to stay readable. Logged to
  the trackers as images too. A video model's cells are strips of frames, and beside the PNG
  ``round-<N>.mp4`` plays the same captioned picture frame by frame (every video of the picture
  at once); without PyAV (the ``video`` extra) one line says so, once, and only the PNG is written.
* The evaluation CLI's ``grid.png`` (:func:`captioned_grid`): its first samples in cells sized
  as above, each captioned with its prompt, row index and seed.
* At the end of the run, ``<output_dir>/curves.png``: the training loss and the held-out
  distance / reward of every task over rounds, from ``metrics.jsonl`` (smoothed like
  TensorBoard's slider, ``logging.curve_smoothing``, the raw values faint behind; a log scale
  with ``logging.curve_log_scale``).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Sequence

from ..evaluation.core import eval_seed
from ..video import is_video

SAMPLES_DIR = "samples"
CURVES_FILE = "curves.png"
# (panel title, metric key prefix): one line per task in each panel that has any data
CURVE_PANELS = (("training loss", "loss/"), ("training reward", "reward/"),
                ("held-out distance to the teacher", "eval/distance/"), ("held-out reward", "eval/reward/"))
MIN_SMOOTHED_POINTS = 10  # sparser series (a few evaluations) are drawn raw: an EMA over them only lags
MIN_CELL, MAX_CELL = 256, 512  # sample cells in pixels: small samples are enlarged, large ones reduced

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


def font(size: int, bold: bool = False):
    """DejaVu Sans at ``size`` pixels: the TrueType font shipped inside matplotlib (a dependency),
    so captions look the same on every machine."""
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


def _wrap(text: str, face, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last kept line ends with an ellipsis if cut."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and face.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and face.getlength(lines[-1] + "…") > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines


class _Cells:
    """The cell geometry both pictures share: samples of ``w`` x ``h`` enlarged (nearest
    neighbour) to at least :data:`MIN_CELL` or reduced to at most :data:`MAX_CELL` on their long
    side, and a caption font sized to the cell width."""

    def __init__(self, w: int, h: int):
        from PIL import Image

        self.scale = min(max(1.0, MIN_CELL / max(w, h)), MAX_CELL / max(w, h))
        self.w, self.h = round(w * self.scale), round(h * self.scale)
        self.size = max(14, self.w // 16)
        self.face = font(self.size)
        self.pad, self.line = self.size // 2, round(self.size * 1.25)
        self.resample = Image.NEAREST if self.scale >= 1 else Image.LANCZOS

    def fit(self, image):
        return image.convert("RGB").resize((self.w, self.h), self.resample)


def _as_images(samples: Sequence) -> list:
    """Images as they are, videos (lists of frames) as strips of their frames."""
    from ..video import frame_strip

    return [frame_strip(x) if is_video(x) else x for x in samples]


def comparison_picture(title: str, rows: Sequence[tuple[str, Sequence]], prompts: Sequence[str]):
    """One picture: a title line, then one row of images per ``(label, images)`` (the label, e.g.
    "teacher\nCFG 4.5", in a column on the left), then each column's prompt under the last row.
    A video (a list of frames) shows as a strip of its frames."""
    from PIL import Image, ImageDraw

    rows = [(label, _as_images(images)) for label, images in rows]
    if not rows or any(len(images) != len(prompts) for _, images in rows) or not prompts:
        raise ValueError(f"comparison_picture: rows of {[len(i) for _, i in rows]} images for {len(prompts)} prompts")
    cell = _Cells(*rows[0][1][0].size)
    cw, ch, size, face, pad, line = cell.w, cell.h, cell.size, cell.face, cell.pad, cell.line
    bold = font(round(size * 1.2), bold=True)
    label_w = max(max(face.getlength(part) for label, _ in rows for part in label.split("\n")) + 3 * pad, 4 * size)
    label_w = int(label_w)
    title_lines = _wrap(title, bold, label_w + len(prompts) * (cw + pad) - 2 * pad, 2)
    top = pad + len(title_lines) * round(size * 1.5) + pad
    captions = [_wrap(prompt, face, cw, 4) for prompt in prompts]
    caption_h = max(len(c) for c in captions) * line + 2 * pad
    width = label_w + len(prompts) * (cw + pad)
    height = top + len(rows) * (ch + pad) + caption_h
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for i, text in enumerate(title_lines):
        draw.text((pad, pad + i * round(size * 1.5)), text, fill="black", font=bold)
    for r, (label, images) in enumerate(rows):
        y = top + r * (ch + pad)
        for j, part in enumerate(label.split("\n")):
            draw.text((pad, y + ch // 2 - line + j * line), part, fill="black", font=face)
        for c, image in enumerate(images):
            picture.paste(cell.fit(image), (label_w + c * (cw + pad), y))
    y = top + len(rows) * (ch + pad)
    for c, lines in enumerate(captions):
        for j, text in enumerate(lines):
            draw.text((label_w + c * (cw + pad), y + j * line), text, fill=(40, 40, 40), font=face)
    return picture


def captioned_grid(samples: Sequence, captions: Sequence[str], notes: Sequence[str], columns: Optional[int] = None):
    """The evaluation's ``grid.png``: samples (videos: frame strips) tiled row-major in cells
    sized as :func:`comparison_picture`'s, each with its caption under it (the prompt, up to 3
    lines) and a grey note (e.g. "#3 · seed 123"). ``columns`` defaults to a roughly square grid:
    ``ceil(sqrt(n))`` for square samples, fewer for frame strips."""
    import math

    from PIL import Image, ImageDraw

    images = _as_images(samples)
    if not images or not len(images) == len(captions) == len(notes):
        raise ValueError(f"captioned_grid: {len(images)} samples, {len(captions)} captions, {len(notes)} notes")
    cell = _Cells(*images[0].size)
    n = len(images)
    columns = columns or max(1, min(n, math.ceil(math.sqrt(n * cell.h / cell.w))))
    # each cell's text: (line, colour) pairs, the caption dark, the note grey
    texts = [[(line, (40, 40, 40)) for line in _wrap(caption, cell.face, cell.w, 3)] +
             [(line, (120, 120, 120)) for line in _wrap(note, cell.face, cell.w, 2)]
             for caption, note in zip(captions, notes)]
    caption_h = max(len(lines) for lines in texts) * cell.line + cell.pad
    step_x, step_y = cell.w + cell.pad, cell.h + caption_h + cell.pad
    picture = Image.new("RGB", (cell.pad + columns * step_x, cell.pad + math.ceil(n / columns) * step_y), "white")
    draw = ImageDraw.Draw(picture)
    for i, (image, lines) in enumerate(zip(images, texts)):
        x, y = cell.pad + (i % columns) * step_x, cell.pad + (i // columns) * step_y
        picture.paste(cell.fit(image), (x, y))
        for j, (text, colour) in enumerate(lines):
            draw.text((x, y + cell.h + cell.pad // 2 + j * cell.line), text, fill=colour, font=cell.face)
    return picture


def comparison_video(title: str, rows: Sequence[tuple[str, Sequence]], prompts: Sequence[str]) -> Iterator:
    """:func:`comparison_picture`'s layout once per frame of the videos in ``rows``: frame ``t``
    shows every video's ``t``-th frame in its cell, so the frames play as one captioned mp4.
    Yielded one at a time (81 frames of a 2 x 4 grid of 480 px cells would hold ~0.5 GB)."""
    for t in range(len(rows[0][1][0])):
        yield comparison_picture(title, [(label, [video[t] for video in videos]) for label, videos in rows], prompts)


class SampleGrids:
    """The per-task sample pictures of one run (main process only; see the module docstring).

    ``prompts[task]``: the held-out prompt strings (the first ``num_images`` are used);
    ``teachers[task]``: (adapter name, guidance scale) of the task's teacher (absent or None: no
    teacher row, e.g. for the reward-driven recipes). ``sampler``: how the images are sampled,
    for the title (e.g. "ODE, 10 steps"). The teachers are frozen: their images are sampled once
    per process and reused. ``write=False``: sample without writing (under distributed.strategy=fsdp
    every process runs the sharded denoiser; the main process writes).
    """

    def __init__(self, output_dir: str, prompts: dict[str, Sequence[str]], teachers: dict[str, tuple[str, float]],
                 num_images: int, seed: int, sampler: str = "", write: bool = True):
        self.root = os.path.join(output_dir, SAMPLES_DIR)
        self.write = write  # False: sample only (a sharded model's other processes), the main process writes
        self.prompts = {task: list(rows[:num_images]) for task, rows in prompts.items()}
        self.teachers = teachers
        self.sampler = sampler
        # the evaluation seeds of these rows (fixed for the whole run): the images evaluation scores
        self.seeds = {task: [eval_seed(seed, i) for i in range(len(rows))]
                      for task, rows in self.prompts.items()}
        self._teacher_images: dict[str, list] = {}
        self.fps = 16  # the mp4 of a video model's samples (Wan's frame rate)
        self._mp4_missing_said = False

    def write_video(self, title: str, rows, prompts, path: str) -> Optional[str]:
        """The mp4 beside a video model's picture (:func:`comparison_video`), or None without
        PyAV: the run goes on with the PNG, and says so once."""
        from ..errors import UserError
        from ..video import write_mp4

        try:
            return write_mp4(comparison_video(title, rows, prompts), path, fps=self.fps)
        except UserError as err:  # PyAV missing: the optional extra "video"
            if not self._mp4_missing_said:
                print(f"[samples] no mp4 of the video samples, only the frame grid PNG: {err}", flush=True)
                self._mp4_missing_said = True
            return None

    def path(self, task: str, round_idx: int) -> str:
        return os.path.join(self.root, task, f"round-{round_idx}.png")

    def draw(self, round_idx: int, sample: SampleFn, student: str, student_guidance: float,
             student_label: str = "student") -> dict[str, str]:
        """Write this round's picture of every task; returns ``{tracker key: png path}``."""
        written = {}
        for task, prompts in self.prompts.items():
            if not prompts:
                continue
            rows = []
            teacher, guidance = self.teachers.get(task) or (None, 0.0)  # reward-only tasks have no teacher
            if teacher:
                if task not in self._teacher_images:
                    self._teacher_images[task] = sample(prompts, self.seeds[task], teacher, guidance)
                rows.append((f"teacher\n{teacher}\nCFG {guidance:g}", self._teacher_images[task]))
            rows.append((f"{student_label}\nround {round_idx}\nCFG {student_guidance:g}",
                         sample(prompts, self.seeds[task], student, student_guidance)))
            title = f"task {task} · round {round_idx}" + (f" · {self.sampler}" if self.sampler else "") + \
                " · same seed in each column"
            path = self.path(task, round_idx)
            if self.write:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                comparison_picture(title, rows, prompts).save(path)
                if is_video(rows[-1][1][0]):
                    self.write_video(title, rows, prompts, path[: -len(".png")] + ".mp4")
            written[f"samples/{task}"] = path  # the PNG (trackers take images)
        return written


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with debiasing (the first point is
    the first value, not ``(1 - weight) * value``). ``weight`` 0 returns the values unchanged."""
    out, last, n = [], 0.0, 0
    for value in values:
        n += 1
        last = weight * last + (1 - weight) * value
        out.append(last / (1 - weight ** n) if weight else value)
    return out


def plot_curves(rows: Sequence[dict], tasks: Sequence[str], path: str, smoothing: float = 0.0,
                log_scale: bool = False) -> Optional[str]:
    """``curves.png``: one panel per metric family of :data:`CURVE_PANELS` that has data, one line
    per task over rounds (plus the mean loss). ``smoothing`` in [0, 1): lines of at least
    :data:`MIN_SMOOTHED_POINTS` points are smoothed (:func:`smooth`) over the faint raw values; ``log_scale``: a log y axis on the panels whose
    values are all positive (a panel with values <= 0 stays linear and says so). Returns the
    path, or None when nothing to plot."""
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
        smoothed = False
        for label, points in series:
            xs, ys = zip(*points)
            style = dict(marker="o" if len(xs) < 20 else None, markersize=3, linestyle="--" if label == "mean" else "-")
            if smoothing and len(xs) >= MIN_SMOOTHED_POINTS:
                smoothed = True
                (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=1, linestyle=style["linestyle"])
                ax.plot(xs, smooth(ys, smoothing), label=label, color=raw.get_color(), **style)
            else:
                ax.plot(xs, ys, label=label, **style)
        positive = all(y > 0 for _, points in series for _, y in points)
        if log_scale and positive:
            ax.set_yscale("log")
        ax.set_title(title + (" (linear: values <= 0)" if log_scale and not positive else ""))
        ax.set_xlabel("round" + (f" (smoothing {smoothing:g})" if smoothed else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
