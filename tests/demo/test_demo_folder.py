"""Rerunning the demo into its folder (issue 24, finding 8): only the demo's own working folders
are replaced, the user's files in the folder are never touched, and the previous report survives
an interrupted rerun (its files are replaced one by one, atomically, only at the end)."""
import os

import pytest

from diffusion_opd.config import ConfigError
from diffusion_opd.demo.pipeline import MARKER, REPORT, WORK, prepare_output_dir
from diffusion_opd.files import replace_atomically


def previous_demo(out):
    """A folder as an earlier demo left it, plus the user's own files."""
    for name in WORK:
        os.makedirs(out / name / "inner")
        (out / name / "inner" / "weights.bin").write_bytes(b"old")
    for name in REPORT:
        (out / name).write_text(f"previous {name}")
    (out / MARKER).write_text("")
    (out / "my_notes.txt").write_text("mine")  # the user's
    os.makedirs(out / "my_plots")
    (out / "my_plots" / "a.png").write_bytes(b"png")


def test_a_rerun_replaces_only_the_demos_own_files(tmp_path):
    out = tmp_path / "demo"
    previous_demo(out)
    prepare_output_dir(str(out))  # what a rerun does first, before hours of training
    assert all(not (out / name).exists() for name in WORK)  # its own runs: rebuilt
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "my_plots" / "a.png").read_bytes() == b"png"
    # the rerun is interrupted here: the previous report is still whole
    assert all((out / name).read_text() == f"previous {name}" for name in REPORT)
    assert (out / MARKER).is_file()


def test_a_folder_the_demo_did_not_write_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="was not written by the demo"):
        prepare_output_dir(str(tmp_path))
    assert os.listdir(tmp_path) == ["x.txt"]


def test_report_files_are_replaced_atomically(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("previous")

    def dies_half_way(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new rep")
        raise KeyboardInterrupt  # the user's Ctrl-C while the new report is written

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(report, dies_half_way)
    assert report.read_text() == "previous" and os.listdir(tmp_path) == ["report.md"]  # no partial file left
    replace_atomically(report, lambda tmp: open(tmp, "w").write("new"))
    assert report.read_text() == "new" and os.listdir(tmp_path) == ["report.md"]
    plot = tmp_path / "convergence.png"  # writers that pick the format from the name get a .png name
    replace_atomically(plot, lambda tmp: (tmp.endswith(".png") or pytest.fail(tmp), open(tmp, "wb").write(b"x")))
    assert plot.read_bytes() == b"x"
