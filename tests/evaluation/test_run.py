"""The evaluation CLI on the tiny random SD3 pipeline (and the tiny FLUX one), on the CPU, offline.

End to end with real rewards (rapidocr OCR; GenEval with a tiny Mask2Former + tiny open_clip),
one process vs two real processes (torchrun, gloo), and LoRA / checkpoint loading checked
against a direct rollout of the same weights.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_opd.evaluation.run import DATASET_REWARDS, MODEL_REWARDS, default_rewards, main, shard_indices
from diffusion_opd.evaluation.core import eval_seed
from diffusion_opd.evaluation.summary import GENEVAL_TAGS
from diffusion_opd.trainers.visuals import captioned_grid
from tests.evaluation.tiny_geneval import build_tiny_geneval, write_car_rows
from tests.shared_data import shared_datasets

ROOT = Path(__file__).resolve().parents[2]
# Tiny sampling settings shared by every run: 64 px (8x8 latents), 2 Euler steps, CFG 4.5.
SAMPLING = ["--num_steps", "2", "--resolution", "64", "--batch_size", "2", "--no_progress"]


@contextmanager
def one_thread():
    """Run like a torchrun rank with OMP_NUM_THREADS=1, so float results can be compared bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(argv):
    with one_thread():
        assert main([str(a) for a in argv]) == 0


def read_results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def geneval_setup(tmp_path_factory):
    """(data root with car-related GenEval rows, --reward_option flags of the tiny GenEval models)."""
    root = tmp_path_factory.mktemp("geneval")
    return write_car_rows(root / "data"), build_tiny_geneval(root / "models")


@pytest.fixture(scope="module")
def geneval_one_process(tiny_sd3_dir, geneval_setup, tmp_path_factory):
    """The 1-process GenEval run on the first 5 rows (odd: uneven shards under 2 processes)."""
    data_root, options = geneval_setup
    out = tmp_path_factory.mktemp("geneval_1proc")
    argv = ["--dataset", "geneval", "--model", tiny_sd3_dir, "--data_root", data_root, "--max_samples", "5",
            "--save_images", "--output_dir", out, *SAMPLING]
    for option in options:
        argv += ["--reward_option", option]
    run_cli(argv)
    return out, argv


@pytest.fixture(scope="module")
def ocr_base(tiny_sd3_dir, tmp_path_factory):
    """The base model on the first 3 OCR rows, images saved (also the reference for LoRA tests)."""
    out = tmp_path_factory.mktemp("ocr_base")
    run_cli(["--dataset", "ocr", "--model", tiny_sd3_dir, "--data_root", shared_datasets(), "--max_samples", "3",
             "--save_images", "--output_dir", out, *SAMPLING])
    return out


# ----------------------------------------------------------------------------- no model needed
def test_bad_arguments_fail_before_any_model_loads(tmp_path, capsys, tiny_sd3_dir):
    data = ["--data_root", str(shared_datasets()), "--model", tiny_sd3_dir]

    def error(dataset, *argv):
        assert main(["--dataset", dataset, *argv]) == 2
        return capsys.readouterr().err

    assert "valid datasets: drawbench, geneval, ocr, pickscore" in error("coco", *data)
    missing = tmp_path / "nowhere" / "round-7"
    assert str(missing) in error("ocr", *data, "--checkpoint_path", str(missing))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    err = error("ocr", *data, "--checkpoint_path", str(tmp_path / "ckpt"), "--use_ema")
    assert str(tmp_path / "ckpt" / "ema" / "pytorch_lora_weights.safetensors") in err and "ema_decay" in err
    assert "not a Hub repo id" in error("ocr", *data, "--lora_path", str(tmp_path / "no_lora"))
    assert "download_data.py --dataset ocr" in error("ocr", "--data_root", str(tmp_path))
    assert "valid rewards:" in error("ocr", *data, "--rewards", "ocr,clip")
    assert "not evaluated" in error("ocr", *data, "--reward_option", "geneval.image_size=64")
    assert "REWARD.KEY=VALUE" in error("ocr", *data, "--reward_option", "image_size=64")
    assert "bad --reward_option" in error("ocr", *data, "--reward_option", "ocr.colour=1")
    assert "--solver sde" in error("ocr", *data, "--noise_level", "0.7")
    # GenEval rows are checked by the scorer's own metadata validation before sampling
    bad = tmp_path / "bad" / "geneval"
    bad.mkdir(parents=True)
    (bad / "test_metadata.jsonl").write_text(json.dumps({"prompt": "a unicorn", "tag": "single_object",
                                                         "include": [{"class": "unicorn", "count": 1}]}) + "\n")
    assert "unicorn" in error("geneval", "--data_root", str(tmp_path / "bad"), "--model", tiny_sd3_dir)


def test_seeds_shards_and_reward_sets():
    seeds = [eval_seed(0, i) for i in range(1000)] + [eval_seed(1, i) for i in range(1000)]
    assert len(set(seeds)) == 2000 and all(0 <= s < 2**63 for s in seeds)
    assert eval_seed(0, 5) == eval_seed(0, 5)
    shards = [shard_indices(5, r, 2) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]  # uneven, unpadded, disjoint, complete
    assert default_rewards("geneval") == ["geneval"] and default_rewards("ocr") == ["ocr"]
    assert default_rewards("drawbench") == default_rewards("pickscore") == list(MODEL_REWARDS)
    assert default_rewards("pickscore", ["unifiedreward"])[-1] == "unifiedreward"
    assert set(DATASET_REWARDS) == {"geneval", "ocr", "pickscore", "drawbench"}


# ----------------------------------------------------------------------------- end to end
def test_ocr_end_to_end(ocr_base):
    rows = read_results(ocr_base)
    prompts = shared_datasets().joinpath("ocr", "test.txt").read_text().splitlines()[:3]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["prompt"] for r in rows] == prompts
    assert [r["seed"] for r in rows] == [eval_seed(0, i) for i in range(3)]
    for r in rows:
        assert 0.0 <= r["scores"]["ocr"] <= 1.0 and isinstance(r["outputs"]["recognised"], str)
        assert pixels(ocr_base / r["image"]).shape == (64, 64, 3)
    summary = json.loads((ocr_base / "summary.json").read_text())
    assert summary["num_rows"] == 3
    assert summary["headline"]["ocr/ocr"] == pytest.approx(np.mean([r["scores"]["ocr"] for r in rows]), abs=1e-12)
    assert "**ocr/ocr**" in (ocr_base / "summary.md").read_text()
    # the grid: the saved images, each captioned with its prompt, index and seed (tests/trainers/test_visuals.py)
    expected = captioned_grid([Image.open(ocr_base / r["image"]) for r in rows], [r["prompt"] for r in rows],
                              [f"#{r['index']} · seed {r['seed']}" for r in rows])
    assert (pixels(ocr_base / "grid.png") == np.asarray(expected, dtype=np.int16)).all()


def test_geneval_end_to_end(geneval_one_process):
    out, _ = geneval_one_process
    rows = read_results(out)
    assert len(rows) == 5 and all(r["metadata"]["include"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    # The official overall is recomputed here from the per-image verdicts: mean over tags of
    # the tag's accuracy (exact arithmetic on at most 5 booleans: tolerance 1e-12).
    by_tag = {}
    for r in rows:
        assert set(r["scores"]) == {"geneval", "correct", "strict_correct"}
        assert 0.0 <= r["scores"]["geneval"] <= 1.0
        by_tag.setdefault(r["metadata"]["tag"], []).append(float(r["scores"]["correct"]))
    assert set(by_tag) <= set(GENEVAL_TAGS) and len(by_tag) >= 4
    overall = np.mean([np.mean(v) for v in by_tag.values()])
    assert summary["headline"] == {"geneval/overall": pytest.approx(overall, abs=1e-12)}
    per_image = np.mean([float(r["scores"]["correct"]) for r in rows])
    assert summary["metrics"]["geneval/per_image_mean_NOT_official"] == pytest.approx(per_image, abs=1e-12)
    # "a photo of a car": the tiny detector always finds exactly one car
    assert rows[0]["prompt"] == "a photo of a car" and rows[0]["scores"]["correct"] is True
    assert "official GenEval score" in (out / "summary.md").read_text()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert (out / "grid.png").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(geneval_one_process, tmp_path):
    out1, argv = geneval_one_process
    out2 = tmp_path / "two"
    argv = [str(a) for a in argv]
    argv[argv.index("--output_dir") + 1] = str(out2)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "scripts/evaluation.py", *argv]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_results(out1), read_results(out2)
    assert [r["index"] for r in two] == [0, 1, 2, 3, 4]  # each row once: no padded duplicate
    assert one == two  # same prompts, seeds, scores, image names
    s1, s2 = (json.loads((o / "summary.json").read_text()) for o in (out1, out2))
    assert (s1["run"]["num_processes"], s2["run"]["num_processes"]) == (1, 2)
    assert s1["metrics"] == s2["metrics"] and s1["headline"] == s2["headline"]
    for r in one:  # bitwise-identical images: a row's noise depends only on (seed, index)
        assert (pixels(out1 / r["image"]) == pixels(out2 / r["image"])).all()
    assert (pixels(out1 / "grid.png") == pixels(out2 / "grid.png")).all()


# ----------------------------------------------------------------------------- weights
def _write_checkpoint(model_dir: str, round_dir: Path) -> dict:
    """A training checkpoint folder (the files trainers/checkpoint.save writes, through the
    same policy writer) holding random student and EMA weights; returns both states."""
    from safetensors.torch import save_file

    from diffusion_opd.models import build_policy

    lora = dict(rank=4, alpha=8, target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"])
    policy = build_policy(model_dir, lora=lora)
    gen = torch.Generator().manual_seed(3)
    states = {}
    for which in ("raw", "ema"):  # entries 0.5: the LoRA visibly moves the tiny model's velocity
        states[which] = {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in policy.student_state_dict().items()}
    policy.save_student(str(round_dir), states["raw"])
    policy.save_student(str(round_dir / "ema"), states["ema"])
    save_file(states["raw"], str(round_dir / "student_raw.safetensors"))
    (round_dir / "config.json").write_text(json.dumps({"model": {"path": model_dir}, "lora": lora}))
    (round_dir / "trainer_state.json").write_text(json.dumps({"round": 3}))
    return {"policy": policy, **states}


def _student_images(policy, state, prompts, seeds):
    """What the student with ``state`` samples with the CLI's settings, decoded."""
    from diffusion_opd.evaluation.core import sample_images
    from diffusion_opd.rollout import Sampling

    policy.load_student_state_dict(state)
    with one_thread():
        images = sample_images(policy, prompts, seeds, Sampling(num_steps=2, noise_level=0.0, guidance_scale=4.5,
                                                               resolution=64))
        return [np.asarray(im, dtype=np.int16) for im in images]


def test_checkpoint_and_lora_folders_load_and_change_images(tiny_sd3_dir, tiny_teacher_dirs, geneval_setup,
                                                           geneval_one_process, tmp_path):
    run_root = tmp_path / "train_run"
    ckpt = _write_checkpoint(tiny_sd3_dir, run_root / "checkpoints" / "round-3")
    data_root, options = geneval_setup
    common = ["--dataset", "geneval", "--data_root", data_root, "--max_samples", "2", "--save_images", *SAMPLING]
    for option in options:  # the tiny GenEval models score fastest of the real rewards here
        common += ["--reward_option", option]
    outs = {
        # no --model: the checkpoint's config names the backbone
        "raw": (["--checkpoint_path", run_root / "checkpoints" / "round-3"], tmp_path / "raw"),
        # the training output_dir: its newest round, EMA weights
        "ema": (["--checkpoint_path", run_root, "--use_ema"], tmp_path / "ema"),
        "peft": (["--model", tiny_sd3_dir, "--lora_path", tiny_teacher_dirs["peft"]], tmp_path / "peft"),
        "diffusers": (["--model", tiny_sd3_dir, "--lora_path", Path(tiny_teacher_dirs["diffusers"]).parent,
                       "--lora_subfolder", "diffusers"], tmp_path / "diffusers"),
    }
    for flags, out in outs.values():
        run_cli([*common, *flags, "--output_dir", out])
    base_dir = geneval_one_process[0]
    rows = read_results(base_dir)[:2]
    base = [pixels(base_dir / r["image"]) for r in rows]
    images = {k: [pixels(out / r["image"]) for r in rows] for k, (_, out) in outs.items()}
    # A LoRA that is not applied leaves every pixel bit-identical (same float ops as the base
    # run); a mean change of half a grey level is far above that.
    for name, imgs in images.items():
        for b, im in zip(base, imgs):
            assert np.abs(im - b).mean() > 0.5, f"{name}: the LoRA did not change the image"
    # The checkpoint, loaded as a LoRA adapter, samples exactly what the student with those
    # weights samples: same math in float32, so pixels agree up to one 8-bit rounding step.
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    for which in ("raw", "ema"):
        expected = _student_images(ckpt["policy"], ckpt[which], prompts, seeds)
        for e, im in zip(expected, images[which]):
            assert np.abs(e - im).max() <= 1, which
    assert np.abs(images["raw"][0] - images["ema"][0]).mean() > 0.5
    run = json.loads((tmp_path / "ema" / "summary.json").read_text())["run"]
    assert run["model"] == tiny_sd3_dir and run["adapter"]["path"].endswith(os.path.join("round-3", "ema"))


def test_flux_pipeline_and_checkpoint_end_to_end(tiny_flux_dir, tmp_path):
    """A FLUX pipeline folder through the whole CLI: the family comes from its model_index.json
    (via the checkpoint's config), the trained LoRA is applied, OCR scores every image, and the
    images are exactly what the FLUX student with those weights samples."""
    run_root = tmp_path / "flux_run"
    ckpt = _write_checkpoint(tiny_flux_dir, run_root / "checkpoints" / "round-3")
    out = tmp_path / "flux_eval"
    run_cli(["--dataset", "ocr", "--data_root", shared_datasets(), "--max_samples", "2", "--save_images",
             "--checkpoint_path", run_root, "--output_dir", out, *SAMPLING])
    rows = read_results(out)
    assert [r["index"] for r in rows] == [0, 1] and all(0.0 <= r["scores"]["ocr"] <= 1.0 for r in rows)
    assert type(ckpt["policy"]).__name__ == "FluxPolicy"
    expected = _student_images(ckpt["policy"], ckpt["raw"], [r["prompt"] for r in rows], [r["seed"] for r in rows])
    for e, r in zip(expected, rows):  # same float32 math: pixels agree up to one 8-bit rounding step
        assert e.shape == (64, 64, 3) and np.abs(e - pixels(out / r["image"])).max() <= 1
    run = json.loads((out / "summary.json").read_text())["run"]
    assert run["model"] == tiny_flux_dir and run["adapter"]["path"].endswith("round-3")


def test_diverged_samples_are_failures_not_scores(tmp_path, capsys, tiny_sd3_dir, tiny_teacher_dirs):
    """Issue 24, finding 6: NaN latents decoded to black were scored (brightness 0.0, nan_count
    0, rc 0). A LoRA whose weights blew up (x 1e30) makes every sample non-finite: each is
    counted as a failure with null scores, and the run says so."""
    from safetensors.torch import load_file, save_file

    diverged = tmp_path / "diverged"
    shutil.copytree(tiny_teacher_dirs["peft"], diverged)
    weights = diverged / "adapter_model.safetensors"
    save_file({k: v * 1e30 for k, v in load_file(str(weights)).items()}, str(weights))
    out = tmp_path / "eval"
    run_cli(["--dataset", "ocr", "--model", tiny_sd3_dir, "--data_root", shared_datasets(), "--max_samples", "2",
             "--rewards", "brightness", "--lora_path", diverged, "--output_dir", out, *SAMPLING])
    rows = read_results(out)
    assert [r["nonfinite"] for r in rows] == [True, True]
    assert [r["scores"]["brightness"] for r in rows] == [None, None]  # not 0.0, the black image's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_samples"] == 2 and summary["metrics"]["brightness/nan_count"] == 2
    assert "2 of 2 samples diverged" in capsys.readouterr().err


def test_evaluations_never_mix_in_one_output_dir(tmp_path, capsys, tiny_sd3_dir):
    """Issue 24, finding 7: a second evaluation into the same --output_dir mixed its outputs with
    the first's (scores of one, images of the other). Now the trainer's rules: a used folder is
    refused (--overwrite moves it aside), and a live evaluation's lock refuses a concurrent one."""
    out = tmp_path / "eval"
    argv = ["--dataset", "ocr", "--model", tiny_sd3_dir, "--data_root", shared_datasets(), "--max_samples", "1",
            "--rewards", "brightness", "--save_images", "--output_dir", out, *SAMPLING]
    run_cli(argv)
    first = (out / "results.jsonl").read_text()
    capsys.readouterr()
    assert main([str(a) for a in argv + ["--seed", "7"]]) == 2  # refused before any model loads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds" in err[0] and "--overwrite" in err[0], err
    assert (out / "results.jsonl").read_text() == first
    run_cli(argv + ["--seed", "7", "--overwrite"])
    aside = list(tmp_path.glob("eval.previous-*"))
    assert len(aside) == 1 and (aside[0] / "results.jsonl").read_text() == first
    assert sorted(p.name for p in aside[0].iterdir()) == ["grid.png", "images", "results.jsonl", "summary.json",
                                                            "summary.md"]
    assert json.loads((out / "results.jsonl").read_text())["seed"] != json.loads(first)["seed"]

    # A live evaluation holds the folder: a second one fails at once, naming it.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom diffusion_opd.trainers.run_dir import "
                               "RunLock\nlock = RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)",
                               str(tmp_path / "busy")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main([str(a) for a in argv[:-len(SAMPLING) - 2] + ["--output_dir", tmp_path / "busy", *SAMPLING]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another run (PID {holder.pid}" in err[0], err
        assert not (tmp_path / "busy" / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("folder, extra", [("tiny_wan_dir", []), pytest.param("tiny_wan22_dir", ["--guidance_scale_2", "3.0"],
                                                                         marks=pytest.mark.slow)])
def test_video_model_writes_mp4_and_frame_strips(request, folder, extra, tmp_path):
    """A Wan pipeline folder (2.1; 2.2 A14B's two experts with the low-noise expert's own CFG scale)
    through the CLI on the built-in video prompts: 5-frame videos, each saved as an mp4 (PyAV) and a
    frame-strip PNG, the captioned grid of strips, an image reward (brightness) scored frame by frame
    and the video reward temporal_consistency."""
    from diffusion_opd.data.video_prompts import VIDEO_MOTION_TEST

    av = pytest.importorskip("av")
    out = tmp_path / "wan_eval"
    run_cli(["--dataset", "video_motion", "--rewards", "brightness,temporal_consistency", "--max_samples", "2",
             "--save_images", "--model", request.getfixturevalue(folder), "--num_frames", "5", "--fps", "8",
             "--output_dir", out, *extra, *SAMPLING])
    rows = read_results(out)
    assert [r["prompt"] for r in rows] == list(VIDEO_MOTION_TEST[:2])  # --split test: the held-out prompts
    assert [r["index"] for r in rows] == [0, 1]
    assert all(0.0 < r["scores"]["brightness"] < 1.0 and 0.0 < r["scores"]["temporal_consistency"] <= 1.0
               for r in rows)
    for r in rows:
        with av.open(str(out / r["video"])) as container:
            assert sum(1 for _ in container.decode(video=0)) == 5
        assert pixels(out / r["image"]).shape == (64, 5 * 64, 3)  # the 5 frames side by side
    expected = captioned_grid([Image.open(out / r["image"]) for r in rows], [r["prompt"] for r in rows],
                              [f"#{r['index']} · seed {r['seed']}" for r in rows])
    assert (pixels(out / "grid.png") == np.asarray(expected, dtype=np.int16)).all()
