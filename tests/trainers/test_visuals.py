"""Sample grids and curves: what they contain, drawn from real images and real metric rows."""
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_opd.trainers.visuals import (SampleGrids, captioned_grid, comparison_picture, comparison_video, plot_curves,
                                            smooth)


def _solid(value, size=16):
    return Image.new("RGB", (size, size), (value, value, value))


def _ink_rows(px, x0, x1):
    """Rows (y) of ``px`` between columns x0:x1 with dark pixels (drawn text)."""
    return np.where((px[:, x0:x1] < 100).any(axis=(1, 2)))[0]


def _colour(rgb, size=16):
    return Image.new("RGB", (size, size), rgb)


def _cells(px, rgb):
    """(rows, columns) of pixels of exactly ``rgb`` (text is grey: never a pure colour)."""
    return np.where((px == rgb).all(axis=2))


def test_comparison_picture_rows_cells_and_truetype_captions():
    from diffusion_opd.trainers.visuals import MIN_CELL

    blue, red = (0, 0, 255), (255, 0, 0)
    prompts = ["black", "a much longer caption that has to wrap over several lines " * 2]
    picture = comparison_picture("task ocr · round 6", [("teacher\nCFG 4.5", [_colour(blue), _colour(blue)]),
                                                        ("student\nCFG 1", [_colour(red), _colour(red)])], prompts)
    px = np.asarray(picture)
    # 16-px samples are enlarged to MIN_CELL-px cells (nearest neighbour: a solid stays solid)
    ys, xs = _cells(px, blue)
    assert len(ys) == 2 * MIN_CELL * MIN_CELL and ys.max() - ys.min() + 1 == MIN_CELL
    ry, rx = _cells(px, red)  # the student row: below the teacher row, same columns
    assert len(ry) == 2 * MIN_CELL * MIN_CELL and ry.min() > ys.max() and (rx.min(), rx.max()) == (xs.min(), xs.max())
    # captions: a title above the cells, the row labels left of them, the prompts below (wrapped)
    assert len(_ink_rows(px[: ys.min()], 0, px.shape[1])) > 10  # title text
    assert len(_ink_rows(px, 0, xs.min())) > 2 * 10  # two label lines of each row
    second_column = xs.min() + MIN_CELL + 1, px.shape[1]
    assert len(_ink_rows(px[ry.max() + 1:], *second_column)) > 3 * 10  # several lines of the wrapped prompt
    with pytest.raises(ValueError):
        comparison_picture("t", [("a", [_solid(0)])], ["p1", "p2"])


def test_caption_font_grows_with_the_samples():
    """Large samples get a larger font (readable at any resolution): the title's ink is taller."""
    def title_height(size):
        picture = comparison_picture("task ocr · round 6", [("student", [_colour((0, 0, 255), size)])], ["a prompt"])
        px = np.asarray(picture)
        top = _cells(px, (0, 0, 255))[0].min()  # first row of the sample
        rows = _ink_rows(px[:top], 0, px.shape[1])
        return rows.max() - rows.min()

    assert title_height(512) > 1.7 * title_height(64)


def test_captioned_grid_tiles_enlarged_cells_row_major_each_captioned_under_it():
    """The evaluation's grid.png: 5 square samples -> 3 columns x 2 rows of cells enlarged to
    256 px (nearest: each cell exactly its colour), the prompt and note drawn under each cell."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    grid = captioned_grid([_colour(c, 32) for c in colours], [f"prompt {i}" for i in range(5)],
                          [f"#{i} · seed {10 + i}" for i in range(5)])
    px = np.asarray(grid)
    boxes = []
    for rgb in colours:
        ys, xs = _cells(px, rgb)
        assert ys.max() - ys.min() + 1 == 256 and xs.max() - xs.min() + 1 == 256 and len(ys) == 256 * 256
        boxes.append((ys.min(), xs.min()))
    assert boxes[0][0] == boxes[1][0] == boxes[2][0] < boxes[3][0] == boxes[4][0]  # 3 per row
    assert boxes[0][1] == boxes[3][1] < boxes[1][1] == boxes[4][1] < boxes[2][1]  # row-major columns
    for y, x in boxes:  # caption ink: two lines (prompt, note) right under the cell, none above
        ink = _ink_rows(px, x, x + 256)
        assert ((ink > y + 256) & (ink < y + 256 + 80)).sum() > 10
    strips = captioned_grid([[_colour(c, 32)] * 5 for c in colours[:4]], ["p"] * 4, ["n"] * 4)
    assert strips.size[0] < strips.size[1]  # frame strips (5:1) stack in one column, not 2 x 2
    with pytest.raises(ValueError, match="2 samples, 1 captions"):
        captioned_grid([_solid(0), _solid(1)], ["a"], ["n", "m"])


def test_sample_grids_teacher_and_student_rows_on_the_same_seeds(tmp_path):
    calls = []

    def sample(prompts, seeds, adapter, guidance):  # a real sampler stand-in: images from the seed
        calls.append((tuple(prompts), tuple(seeds), adapter, guidance))
        return [_solid(s % 256) for s in seeds]

    grids = SampleGrids(str(tmp_path), {"ocr": ["p1", "p2", "p3"], "objects": ["q1"]},
                        {"ocr": ("teacher_ocr", 4.5)}, num_images=2, seed=7, sampler="ODE, 4 steps")
    first = grids.draw(0, sample, "student", 2.0)
    second = grids.draw(10, sample, "student", 2.0)
    assert set(first) == set(second) == {"samples/ocr", "samples/objects"}  # one picture per task
    assert first["samples/ocr"] == str(tmp_path / "samples" / "ocr" / "round-0.png")
    with_teacher = Image.open(second["samples/ocr"])
    alone = Image.open(second["samples/objects"])  # no teacher for this task: the student row only
    assert with_teacher.size[1] > alone.size[1]
    ocr_calls = [c for c in calls if c[0] == ("p1", "p2")]
    assert len({c[1] for c in ocr_calls}) == 1  # the same seeds for teacher and every round
    # the frozen teacher is sampled once, the student at every evaluation
    assert [c[2:] for c in ocr_calls] == [("teacher_ocr", 4.5), ("student", 2.0), ("student", 2.0)]


def test_video_samples_are_a_frame_grid_png_and_an_mp4_or_one_line_without_pyav(tmp_path, monkeypatch, capsys):
    """A video model's samples (lists of frames): the PNG shows frame strips, the mp4 beside it
    plays the same captioned picture frame by frame; without PyAV the PNG alone, said once."""
    def sample(prompts, seeds, adapter, guidance):  # 5 frames per video, grey level 40 t (+ the seed)
        return [[_solid((40 * t + s) % 256, size=32) for t in range(5)] for s in seeds]

    grids = SampleGrids(str(tmp_path), {"motion": ["a fox running", "waves crashing"]}, {}, num_images=2, seed=3)
    png = grids.draw(1, sample, "student", 1.0)["samples/motion"]
    assert Image.open(png).size[0] >= 2 * 5 * 32  # two cells, each a strip of the 5 frames
    av = pytest.importorskip("av")
    expected = comparison_video("task motion · round 1 · same seed in each column",
                                [("student\nround 1\nCFG 1", sample(None, grids.seeds["motion"], "", 1.0))],
                                ["a fox running", "waves crashing"])
    with av.open(png[: -len(".png")] + ".mp4") as container:
        decoded = [f.to_ndarray(format="rgb24").astype(float) for f in container.decode(video=0)]
    assert len(decoded) == 5
    for frame, want in zip(decoded, expected):  # lossy codec: the picture survives to a few grey levels
        want = np.asarray(want, dtype=float)[: frame.shape[0], : frame.shape[1]]
        assert frame.shape == want.shape and np.abs(frame - want).mean() < 3
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV not installed: `import av` fails
    capsys.readouterr()
    for round_idx in (2, 3):
        grids.draw(round_idx, sample, "student", 1.0)
        assert os.path.isfile(tmp_path / "samples" / "motion" / f"round-{round_idx}.png")
        assert not os.path.exists(tmp_path / "samples" / "motion" / f"round-{round_idx}.mp4")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no mp4 of the video samples" in out[0] and "diffusion-opd[video]" in out[0], out


def test_curves_plot_loss_distance_and_reward_per_task(tmp_path):
    rows = [{"round": 0, "eval/distance/a": 1.0, "eval/distance/b": 2.0}]
    rows += [{"round": r, "loss": 1 / r, "loss/a": 1 / r, "loss/b": 2 / r} for r in range(1, 11)]
    rows += [{"round": 10, "eval/distance/a": 0.5, "eval/distance/b": 0.4, "eval/reward/a": 0.7}]
    path = plot_curves(rows, ["a", "b"], str(tmp_path / "curves.png"))
    image = Image.open(path)
    assert image.size == (1500, 360)  # three panels: loss, distance, reward
    assert plot_curves([{"round": 1, "lr": 0.1}], ["a"], str(tmp_path / "none.png")) is None
    assert Image.open(plot_curves(rows[:11], ["a", "b"], str(tmp_path / "two.png"))).size == (1000, 360)


def test_smoothing_is_tensorboards_debiased_ema_and_log_scale_applies_to_positive_panels(tmp_path):
    assert smooth([1.0, 3.0, 3.0], 0.0) == [1.0, 3.0, 3.0]
    # debiased EMA with weight 0.5: 1, (0.25 + 0.75*... ) -> exact values from the definition
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / 0.75])
    rows = [{"round": r, "loss": 10.0 / r, "loss/a": 10.0 / r, "reward/a": r - 5.0} for r in range(1, 30)]
    rows += [{"round": r, "eval/distance/a": 1.0 / r} for r in (1, 10, 20)]  # a few evaluations: drawn raw
    import matplotlib.pyplot as plt

    seen = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):  # read the real axes matplotlib drew before they are closed
        seen.update({ax.get_title(): (ax.get_yscale(), len(ax.lines), ax.get_xlabel()) for ax in fig.axes})
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot_curves(rows, ["a"], str(tmp_path / "c.png"), smoothing=0.6, log_scale=True)
    finally:
        plt.Figure.savefig = original
    assert seen["training loss"] == ("log", 4, "round (smoothing 0.6)")  # mean + task: raw and smoothed each
    assert seen["training reward (linear: values <= 0)"] == ("linear", 2, "round (smoothing 0.6)")
    assert seen["held-out distance to the teacher"] == ("log", 1, "round")  # 3 points: not smoothed


def test_six_round_run_ends_with_a_final_eval_and_picture_logged_to_trackers(tmp_path, capfd):
    """eval.every=10 > num_rounds=6: the run still evaluates and draws at its last round; the
    pictures and numbers go to wandb (offline) and tensorboard through accelerate."""
    import glob
    import os

    import diffusers.utils.logging as diffusers_logging

    from diffusion_opd.config import load_config
    from diffusion_opd.trainers.metrics import read_metrics
    from diffusion_opd.trainers.opd import train

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "run"
    config = load_config(os.path.join(root, "config", "opd.py") + ":tiny_mopd", [
        f"output_dir={out}", "logging.progress=false", "logging.trackers=wandb,tensorboard",
        "logging.wandb_mode=offline", "train.num_rounds=6", "eval.every=10", "eval.num_prompts=2",
        "eval.sample_images=2", "save_every=6"])
    train(config)
    evals = [r["round"] for r in read_metrics(str(out)) if "eval/distance/objects" in r]
    assert evals == [0, 6]
    for task in config.tasks:
        for r in (0, 6):
            picture = Image.open(out / "samples" / task / f"round-{r}.png")
            assert picture.size[1] > 2 * 256  # a teacher row and a student row of enlarged 64-px samples
    student0, student6 = (np.asarray(Image.open(out / "samples" / "objects" / f"round-{r}.png")) for r in (0, 6))
    assert (student0 != student6).any()  # the pictures follow the training
    assert Image.open(out / "curves.png").size[0] >= 1000  # loss + held-out distance panels
    run_dir = glob.glob(str(out / "wandb" / "offline-run-*"))[0]
    media = glob.glob(os.path.join(run_dir, "files", "media", "images", "**", "*.png"), recursive=True)
    names = sorted(os.path.relpath(m, run_dir) for m in media)

    def logged(key):  # wandb names media files <key>_<its own counter>_<hash>.png
        return [n for n in names if n.startswith(f"files/media/images/{key}_")]

    assert len(logged("samples/objects")) == len(logged("samples/signs")) == 2  # rounds 0 and 6
    assert len(logged("curves")) == 1
    events = b"".join(open(f, "rb").read() for f in glob.glob(str(out / "logs" / "**" / "events.out.*"),
                                                                  recursive=True))
    for tag in (b"loss/objects", b"eval/distance/signs", b"samples/objects", b"curves"):
        assert tag in events  # scalars and images reached tensorboard's event files
    # logging.progress=false: no progress bar from us, diffusers, transformers or the Hub
    assert not diffusers_logging.is_progress_bar_enabled()
    assert "%|" not in capfd.readouterr().err
