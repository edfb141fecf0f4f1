"""Sample grids and curves: what they contain, drawn from real images and real metric rows."""
import numpy as np
from PIL import Image

from diffusion_opd.trainers.visuals import SampleGrids, captioned_grid, plot_curves


def _solid(value, size=16):
    return Image.new("RGB", (size, size), (value, value, value))


def test_captioned_grid_places_each_image_above_its_caption():
    grid = captioned_grid([_solid(0), _solid(255), _solid(128)], ["black", "white", "a much longer caption " * 4],
                          columns=2)
    cell_w, strip = 6 * 28, 40
    assert grid.size == (2 * cell_w, 2 * (16 + strip))
    px = np.asarray(grid)
    left = (cell_w - 16) // 2
    assert (px[:16, left:left + 16] == 0).all()  # first image, top-left cell
    assert (px[16 + strip:16 + strip + 16, left:left + 16] == 128).all()  # third: second row
    assert (px[17:16 + strip, :cell_w] < 128).any()  # caption text drawn in the strip


def test_sample_grids_fixed_seeds_and_teacher_once(tmp_path):
    calls = []

    def sample(prompts, seeds, adapter, guidance):  # a real sampler stand-in: images from the seed
        calls.append((tuple(prompts), tuple(seeds), adapter, guidance))
        return [_solid(s % 256) for s in seeds]

    grids = SampleGrids(str(tmp_path), {"ocr": ["p1", "p2", "p3"], "objects": ["q1"]},
                        {"ocr": ("teacher_ocr", 4.5), "objects": ("teacher_obj", 1.0)}, num_images=2, seed=7)
    first = grids.draw(0, sample, "student", 2.0)
    second = grids.draw(10, sample, "student", 2.0)
    assert set(first) == {"samples/ocr", "samples/ocr/teacher", "samples/objects", "samples/objects/teacher"}
    assert set(second) == {"samples/ocr", "samples/objects"}  # teachers drawn once
    assert (tmp_path / "samples" / "ocr" / "round-10.png").is_file()
    assert (tmp_path / "samples" / "objects" / "teacher.png").is_file()
    ocr_calls = [c for c in calls if c[0] == ("p1", "p2")]
    assert len({c[1] for c in ocr_calls}) == 1  # the same seeds for teacher and every round
    assert [c[2:] for c in ocr_calls] == [("teacher_ocr", 4.5), ("student", 2.0), ("student", 2.0)]


def test_curves_plot_loss_distance_and_reward_per_task(tmp_path):
    rows = [{"round": 0, "eval/distance/a": 1.0, "eval/distance/b": 2.0}]
    rows += [{"round": r, "loss": 1 / r, "loss/a": 1 / r, "loss/b": 2 / r} for r in range(1, 11)]
    rows += [{"round": 10, "eval/distance/a": 0.5, "eval/distance/b": 0.4, "eval/reward/a": 0.7}]
    path = plot_curves(rows, ["a", "b"], str(tmp_path / "curves.png"))
    image = Image.open(path)
    assert image.size == (1500, 360)  # three panels: loss, distance, reward
    assert plot_curves([{"round": 1, "lr": 0.1}], ["a"], str(tmp_path / "none.png")) is None
    assert Image.open(plot_curves(rows[:11], ["a", "b"], str(tmp_path / "two.png"))).size == (1000, 360)


def test_tiny_run_writes_sample_grids_and_curves_and_logs_them_to_offline_wandb(tmp_path, capfd):
    import glob
    import os

    import diffusers.utils.logging as diffusers_logging

    from diffusion_opd.config import load_config
    from diffusion_opd.trainers.opd import train

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "run"
    config = load_config(os.path.join(root, "config", "opd.py") + ":tiny_mopd", [
        f"output_dir={out}", "logging.progress=false", "logging.wandb_mode=offline", "train.num_rounds=2",
        "eval.every=2", "eval.num_prompts=2", "eval.sample_images=2", "save_every=2"])
    train(config)
    for task in config.tasks:
        for label in ("teacher", "round-0", "round-2"):
            image = Image.open(out / "samples" / task / f"{label}.png")
            assert image.size[1] == 64 + 40  # one row of 64 px samples + the caption strip
    student0, student2 = (np.asarray(Image.open(out / "samples" / "objects" / f"round-{r}.png")) for r in (0, 2))
    assert (student0 != student2).any()  # the grids follow the training
    assert Image.open(out / "curves.png").size[0] >= 1000  # loss + held-out distance panels
    media = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "images" / "**" / "*.png"),
                      recursive=True)
    names = sorted(os.path.relpath(m, glob.glob(str(out / "wandb" / "offline-run-*"))[0]) for m in media)
    def logged(key):  # wandb names media files <key>_<its own counter>_<hash>.png
        return [n for n in names if n.startswith(f"files/media/images/{key}_")]

    assert len(logged("samples/objects")) == len(logged("samples/signs")) == 2  # rounds 0 and 2
    assert len(logged("samples/objects/teacher")) == len(logged("samples/signs/teacher")) == 1
    assert len(logged("curves")) == 1
    # logging.progress=false: no progress bar from us, diffusers, transformers or the Hub
    assert not diffusers_logging.is_progress_bar_enabled()
    assert "%|" not in capfd.readouterr().err
