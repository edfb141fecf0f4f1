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
