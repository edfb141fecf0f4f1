"""A damaged LoRA file is ONE line naming the file, wherever a LoRA or a checkpoint's round
folder is read (issue 24, finding 9): eval --checkpoint_path / --lora_path, scripts/export.py,
model.student_init and a teacher's path. Two kinds of damage on a real training checkpoint:
a flipped byte in tensor data (the file still parses: only the checkpoint's manifest can tell,
and it must be consulted) and a truncated file outside any checkpoint (safetensors' own
error, which used to escape as a traceback naming no file)."""
import os
import shutil
import sys

import pytest

from diffusion_opd.config import load_config
from diffusion_opd.evaluation.run import main as eval_main
from diffusion_opd.trainers.opd import train
from tests.shared_data import shared_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from export import main as export_main  # noqa: E402
from train import main as train_main  # noqa: E402

TINY = os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd"
QUICK = ["logging.progress=false", "eval.every=0"]
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real one-round tiny OPD run: its output_dir (builtin backbone, checkpoints/round-1)."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    train(load_config(TINY, [f"output_dir={out}", *QUICK, "train.num_rounds=1"]))
    return out


def flip_a_byte(path):
    """Change one byte of the file's last tensor data: safetensors still reads it, with other weights."""
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x55]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def damaged_copy(trained, tmp_path, how):
    """A copy of the run whose round-1 LoRA file is damaged ("flip": inside the checkpoint,
    manifest kept) or a copy of the round's LoRA folder alone, truncated ("truncate": no manifest)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("run.lock"))
    round_dir = run / "checkpoints" / "round-1"
    if how == "flip":
        flip_a_byte(round_dir / WEIGHTS)
        return run, round_dir, round_dir / WEIGHTS, "SHA-256 mismatch"
    lone = tmp_path / "adapter"
    lone.mkdir()
    shutil.copy(round_dir / WEIGHTS, lone / WEIGHTS)
    truncate(lone / WEIGHTS)
    return run, lone, lone / WEIGHTS, "cannot be read as LoRA weights"


def builtin_model(run):
    return str(run / "builtin" / "tiny-sd3")


CASES = {
    "eval --checkpoint_path": lambda run, folder, tmp: (eval_main, [
        "--dataset", "ocr", "--data_root", str(shared_datasets()), "--max_samples", "1", "--num_steps", "2",
        "--resolution", "64", "--no_progress", "--output_dir", str(tmp / "eval"), "--checkpoint_path", str(folder)]),
    "eval --lora_path": lambda run, folder, tmp: (eval_main, [
        "--dataset", "ocr", "--data_root", str(shared_datasets()), "--max_samples", "1", "--num_steps", "2",
        "--resolution", "64", "--no_progress", "--output_dir", str(tmp / "eval"), "--model", builtin_model(run),
        "--lora_path", str(folder)]),
    "export": lambda run, folder, tmp: (export_main, [
        str(folder), "--format", "diffusers", "--model", builtin_model(run), "--out", str(tmp / "export"), "--no_check"]),
    "model.student_init": lambda run, folder, tmp: (train_main, [
        "--config", TINY, f"output_dir={tmp / 'next'}", *QUICK, "train.num_rounds=1", f"model.student_init={folder}"]),
    "teacher path": lambda run, folder, tmp: (train_main, [
        "--config", TINY, f"output_dir={tmp / 'next'}", *QUICK, "train.num_rounds=1",
        f"teachers.teacher_a.path={folder}"]),
}


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("entry", list(CASES))
def test_a_damaged_lora_is_one_line_naming_the_file(entry, how, trained, tmp_path, capsys):
    if entry == "eval --checkpoint_path" and how == "truncate":
        pytest.skip("--checkpoint_path takes training checkpoints, which carry a manifest")
    run, folder, damaged, why = damaged_copy(trained, tmp_path, how)
    main, argv = CASES[entry](run, folder, tmp_path)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert str(damaged) in lines[0] and why in lines[0], lines[0]
    assert "Traceback" not in out + err
    if main is train_main:  # the run that failed to start leaves no run.lock behind
        assert not (tmp_path / "next" / "run.lock").exists()


@pytest.mark.parametrize("rel", [WEIGHTS, f"lora/{WEIGHTS}", f"lora/transformer_2/{WEIGHTS}"])
def test_a_checkpoint_file_is_checked_against_the_round_manifest_at_every_depth(rel, tmp_path):
    """A round's manifest covers Wan 2.2's second expert (round-N/lora/transformer_2/) too."""
    from diffusion_opd.files import DamagedFileError, check_against_manifest
    from diffusion_opd.trainers.checkpoint import write_manifest

    path = tmp_path / "round-1" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)))
    write_manifest(str(tmp_path / "round-1"))
    assert check_against_manifest(path)
    flip_a_byte(path)
    with pytest.raises(DamagedFileError, match="SHA-256 mismatch"):
        check_against_manifest(path)
