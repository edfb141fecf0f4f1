"""Stage 1 on the tiny SD3 (CPU): DiffusionNFT, Flow-GRPO and GRPO-Guard raise a weight-free
reward (brightness of the decoded image) from the same base; GRPO's first update is exactly
on-policy; GRPO-Guard's ratio stays centred where plain GRPO's drifts below 1; a teacher trained
here distils with OPD as is; cascades run in order; resume is bit-identical."""
import importlib.util
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion_opd.config import load_config
from diffusion_opd.trainers.metrics import read_metrics
from diffusion_opd.trainers.recipes import train, train_cascade

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NFT, GRPO = (os.path.join(ROOT, "config", f"{n}.py") for n in ("nft", "grpo"))
QUIET = ["logging.progress=false"]


def _train(spec, out, *overrides):
    config = load_config(spec, [f"output_dir={out}", *QUIET, *overrides])
    train(config)
    return config, read_metrics(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three recipes from the same base (tiny SD3, seed 42), 10 rounds each, the reward on
    fixed held-out prompts and seeds before and after."""
    root = tmp_path_factory.mktemp("stage1")
    return {name: _train(spec, root / name) for name, spec in
            (("nft", f"{NFT}:tiny"), ("grpo", f"{GRPO}:tiny_grpo"), ("guard", f"{GRPO}:tiny_guard"))}


# GRPO-Guard's held-out rise after 10 tiny rounds is within noise: +0.00091 +- 0.00088 over the 32
# paired samples (measured on this CPU box, 2026-12-04); the earlier 4-sample check passed or failed
# with the evaluation seeds alone. Strict: the day it passes, this mark must go.
GUARD_NOISE = pytest.mark.xfail(strict=True, reason="GRPO-Guard's held-out rise at 10 tiny rounds is not "
                                                    "significant (+0.0009 +- 0.0009 over 32 paired samples)")


@pytest.mark.parametrize("name", ["nft", "grpo", pytest.param("guard", marks=GUARD_NOISE)])
def test_mean_reward_rises(runs, name):
    config, rows = runs[name]
    evals = [r["eval/reward/bright"] for r in rows if "eval/reward/bright" in r]
    train_reward = [r["reward/bright"] for r in rows if "reward/bright" in r]
    print(f"{name}: held-out brightness {evals[0]:.5f} -> {evals[-1]:.5f}; training batches "
          f"{sum(train_reward[:3]) / 3:.5f} (rounds 1-3) -> {sum(train_reward[-3:]) / 3:.5f} (rounds 8-10)")
    assert len(evals) == 2 and len(train_reward) == config.train.num_rounds
    assert sum(train_reward[-3:]) > sum(train_reward[:3])  # the training batches' reward rises (guard too)
    # Same seeds and prompts before and after: the change is the policy's, not sampling noise.
    # The run's own evaluation scores 4 images (one per held-out prompt), whose noise alone moves
    # the mean by ~0.005 (measured: a different seed rule moved the changes by up to 0.0056), so
    # the rise is measured on 32: each held-out prompt x 8 evaluation seeds, base vs final student.
    mean, stderr = _paired_rise(config, name)
    assert mean > 2 * stderr, (mean, stderr)  # a rise beyond twice its standard error


def _heldout_brightness(config, samples_per_prompt: int) -> tuple[list, list]:
    """Per-sample held-out rewards (the evaluation core) of the base and of the run's final student."""
    from diffusion_opd.data.prompts import task_prompts
    from diffusion_opd.evaluation.core import evaluate_rows
    from diffusion_opd.models.base import BASE, STUDENT
    from diffusion_opd.rewards.multi import task_scorer
    from diffusion_opd.rollout import Sampling
    from diffusion_opd.trainers import checkpoint as ckpt
    from diffusion_opd.trainers.setup import build_policy_from_config, make_accelerator

    from diffusion_opd.trainers.ema import EMA

    policy = build_policy_from_config(config, make_accelerator(config))
    final = ckpt.round_dir(config.output_dir, config.train.num_rounds)
    policy.load_student_state_dict(ckpt.read_student(final))
    (task, spec), = config.tasks.items()
    held_out = task_prompts(config, task, "eval").prompts[: config.eval.num_prompts]  # what the run evaluates
    rows = [{"prompt": p, "metadata": {}} for p in held_out for _ in range(samples_per_prompt)]
    sampling = Sampling.from_config(config.sample, num_steps=config.eval.num_steps, noise_level=0.0)
    scorer = task_scorer(spec.reward, "cpu", config.sample.reward_frames, config.sample.frame_reduce)

    def mean(adapter):  # per-sample rewards, in row order
        return [r["scores"]["total"] for r in evaluate_rows(policy, rows, range(len(rows)), sampling, config.seed,
                                                            scorer, adapter=adapter)]

    before = mean(BASE)
    if config.train.ema_decay > 0:  # the run evaluates its EMA weights: so does this
        ema = EMA(policy.trainable_parameters(), config.train.ema_decay, config.train.ema_warmup)
        ema.load_state_dict(torch.load(os.path.join(final, "ema_state.pt"), weights_only=False))
        with ema.swapped_in():
            return before, mean(STUDENT)
    return before, mean(STUDENT)


def test_grpo_on_video_runs_a_round_and_writes_mp4_samples(tmp_path):
    """config/grpo.py:tiny_wan_t2v for one round (2 prompts x 4 videos of 5 frames): SDE rollouts
    over the 5-D video latents, brightness scored on every frame and averaged per video, two
    optimizer steps of which the first is on-policy; the samples at rounds 0 and 1 are a
    frame-strip PNG and an mp4 of the same picture (PyAV installed: make test installs it)."""
    config, rows = _train(f"{GRPO}:tiny_wan_t2v", tmp_path / "run", "train.num_rounds=1", "rl.group_size=4",
                          "train.batch_size=4", "eval.every=1", "eval.num_prompts=2", "eval.sample_images=2")
    (row,) = [r for r in rows if "loss" in r]
    assert row["ratio_mean/first_update"] == 1.0 and row["grad_norm"] > 0 and 0 < row["reward/bright"] < 1
    assert row["ratio_max_deviation/later_updates"] > 0  # the second step ran on the updated policy
    samples = tmp_path / "run" / "samples" / "bright"
    for round_idx in (0, 1):
        assert Image.open(samples / f"round-{round_idx}.png").size[0] >= 2 * 5 * 32  # two 5-frame strips
        if importlib.util.find_spec("av") is not None:
            import av

            with av.open(str(samples / f"round-{round_idx}.mp4")) as container:
                assert sum(1 for _ in container.decode(video=0)) == config.sample.num_frames


@pytest.mark.slow  # 7 s warm on the 2-core CPU box unloaded, 28 s under the session's load
def test_grpo_on_video_raises_the_per_frame_reward(tmp_path):
    """config/grpo.py:tiny_wan_t2v as shipped (10 rounds of 2 prompts x 8 videos): the held-out
    per-frame brightness rises beyond twice its standard error over 32 paired samples."""
    config, rows = _train(f"{GRPO}:tiny_wan_t2v", tmp_path / "run")
    assert len([r for r in rows if "loss" in r]) == config.train.num_rounds == 10
    mean, stderr = _paired_rise(config, "video GRPO, per-frame")
    assert mean > 2 * stderr, (mean, stderr)


def _paired_rise(config, label: str) -> tuple[float, float]:
    """The held-out reward's paired rise from the base to the run's final student over each
    held-out prompt x 8 evaluation seeds (the same prompt and noise before and after): (mean,
    standard error)."""
    before, after = _heldout_brightness(config, samples_per_prompt=8)
    d = [a - b for a, b in zip(after, before)]
    mean, stderr = sum(d) / len(d), (sum((x - sum(d) / len(d)) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
    print(f"{label}: held-out brightness over {len(d)} samples {sum(before) / len(d):.5f} -> "
          f"{sum(after) / len(d):.5f} (paired rise {mean:.5f} +- {stderr:.5f})")
    return mean, stderr


@pytest.mark.parametrize("name", ["grpo", "guard"])
def test_first_update_of_a_round_is_exactly_on_policy(runs, name):
    """The first optimizer step replays the sampling forwards: the ratio is 1 to the last bit."""
    _, rows = runs[name]
    trained = [r for r in rows if "ratio_mean/first_update" in r]
    assert len(trained) == 10
    assert all(r["ratio_mean/first_update"] == 1.0 and r["ratio_max_deviation/first_update"] == 0.0
               for r in trained)
    assert any(r["ratio_max_deviation/later_updates"] > 0 for r in trained)  # the policy did move


def test_guard_ratio_centred_where_plain_ratio_drifts(runs):
    """After the first update the plain ratio's mean falls below 1 (the drift GRPO-Guard
    describes); the normalised ratio stays centred at 1."""
    plain = [r["ratio_mean/later_updates"] for r in runs["grpo"][1] if "ratio_mean/later_updates" in r]
    guard = [r["ratio_mean/later_updates"] for r in runs["guard"][1] if "ratio_mean/later_updates" in r]
    mean_plain, mean_guard = sum(plain) / len(plain), sum(guard) / len(guard)
    print(f"ratio mean after the first update, averaged over rounds: GRPO {mean_plain:.5f}, "
          f"GRPO-Guard {mean_guard:.5f}")
    assert all(p < 1 for p in plain)
    assert abs(mean_guard - 1) < 0.25 * abs(mean_plain - 1)


def _distil_from_nft(nft_config, opd_name: str, out) -> list[float]:
    """6 OPD rounds of ``config/opd.py:<opd_name>`` (32 px, 4 steps) on one task whose teacher is
    the NFT run's final EMA checkpoint; returns the held-out distances (first, last)."""
    teacher = os.path.join(nft_config.output_dir, "checkpoints", f"round-{nft_config.train.num_rounds}", "ema")
    opd = load_config(f"{ROOT}/config/opd.py:{opd_name}", [
        f"output_dir={out}", *QUIET, "train.num_rounds=6", "eval.every=6", "sample.resolution=32",
        "sample.num_steps=4", "train.num_train_steps=3", "eval.num_steps=4", "save_every=6", "eval.sample_images=0"])
    opd.teachers = {"bright_teacher": {**opd.teachers.teacher_a, "path": teacher, "guidance_scale": 1.0}}
    opd.tasks = {"bright": {**opd.tasks.objects, "teacher": "bright_teacher"}}
    train(opd)
    return [r["eval/distance/bright"] for r in read_metrics(opd.output_dir) if "eval/distance/bright" in r]


def test_a_teacher_trained_here_distils_with_opd(runs, tmp_path):
    """The NFT run's final checkpoint's EMA weights (what the references evaluate and save) are an
    OPD teacher as is (no conversion)."""
    dist = _distil_from_nft(runs["nft"][0], "tiny_mopd", tmp_path / "opd")
    print(f"OPD from the NFT teacher: held-out distance {dist[0]:.4g} -> {dist[-1]:.4g}")
    assert dist[-1] < 0.5 * dist[0]


def test_cascade_runs_stages_in_order_each_from_the_last(tmp_path):
    out = str(tmp_path / "cascade")
    finals = train_cascade(f"{NFT}:tiny_cascade", out, [*QUIET, "train.num_rounds=2", "eval.every=0"])
    assert [os.path.basename(os.path.dirname(os.path.dirname(f))) for f in finals] == \
        ["stage1-tiny", "stage2-tiny_colorful"]
    saved = [json.load(open(os.path.join(f, "config.json"))) for f in finals]
    assert saved[0]["model"]["student_init"] == ""
    assert saved[1]["model"]["student_init"] == os.path.join(finals[0], "ema")  # the EMA weights
    assert saved[1]["tasks"].keys() == {"colorful"}
    # (model.student_init makes a run start as exactly that adapter: tests/trainers/test_peers_formats.py)
    # rerunning a finished cascade trains nothing
    before = os.path.getmtime(os.path.join(finals[1], "trainer_state.json"))
    assert train_cascade(f"{NFT}:tiny_cascade", out, [*QUIET, "train.num_rounds=2", "eval.every=0"]) == finals
    assert os.path.getmtime(os.path.join(finals[1], "trainer_state.json")) == before


@pytest.mark.parametrize("spec", [f"{NFT}:tiny", f"{GRPO}:tiny_guard"], ids=["nft", "grpo_guard"])
def test_resume_is_bit_identical(tmp_path, spec):
    """Stopped after round 2 and resumed in a fresh run object = uninterrupted (student, EMA,
    NFT's old policy, metrics)."""
    common = ["train.num_rounds=4", "save_every=1", "keep_last=10", "eval.every=0", "train.ema_decay=0.9"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _train(spec, full, *common)
    _train(spec, part, *common, "train.stop_after_round=2")
    _train(spec, part, *common, "resume_from=latest")
    for name in ("student_raw.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a, b = (load_file(os.path.join(d, "checkpoints", "round-4", name)) for d in (full, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    recipe = os.path.join("checkpoints", "round-4", "recipe_state.pt")
    if os.path.isfile(os.path.join(full, recipe)):
        a, b = (torch.load(os.path.join(d, recipe)) for d in (full, part))
        assert a["steps_taken"] == b["steps_taken"] == 4 and all(torch.equal(x, y) for x, y in zip(a["old"], b["old"]))
    keys = ("round", "loss", "reward/bright", "grad_norm", "ratio_mean/later_updates")
    strip = [[{k: r.get(k) for k in keys} for r in read_metrics(d)] for d in (full, part)]
    assert strip[0] == strip[1]


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["config/nft.py:tiny", "config/grpo.py:tiny_guard"], ids=["nft", "grpo_guard"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, spec):
    """A real process killed (SIGKILL) after its round-2 checkpoint, resumed with the same command
    plus resume_from=latest: the same weights and metrics as an uninterrupted run (the fast
    in-process version above covers the same state; this one adds the process death)."""
    import subprocess
    import sys

    from tests.processes import signal_once_written

    def cmd(out, *extra):
        return [sys.executable, "scripts/train.py", "--config", spec, f"output_dir={out}", "train.num_rounds=4",
                "save_every=1", "keep_last=10", "eval.every=0", *QUIET, *extra]

    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(cmd(full), cwd=ROOT, check=True, capture_output=True)
    proc = subprocess.Popen(cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    signal_once_written(proc, os.path.join(killed, "checkpoints", "round-2"))
    assert not os.path.isdir(os.path.join(killed, "checkpoints", "round-4")), "killed too late to test resume"
    subprocess.run(cmd(killed, "resume_from=latest"), cwd=ROOT, check=True, capture_output=True)
    a, b = (load_file(os.path.join(d, "checkpoints", "round-4", "student_raw.safetensors")) for d in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("round", "loss", "reward/bright", "grad_norm")
    rows_full, rows_killed = ([{k: r.get(k) for k in keys} for r in read_metrics(d)] for d in (full, killed))
    assert rows_full == rows_killed


def test_cascade_killed_before_a_stages_first_checkpoint_continues(tmp_path):
    """A stage with metrics but no checkpoint (SIGKILL after its first round): rerunning the
    cascade starts that stage again (its partial files moved aside), and overwrite=true is
    accepted and starts every stage again (both used to fail: rc 2, 'resume_from: latest')."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cascade"
    args = [*QUIET, "train.num_rounds=3", "save_every=100", "eval.every=0"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--cascade",
                             f"{NFT}:tiny_cascade", f"output_dir={out}", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stage1 = out / "stage1-tiny"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # until round 1's metrics row is written
        if (stage1 / "metrics.jsonl").is_file() and (stage1 / "metrics.jsonl").read_text().strip():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_metrics(str(stage1)), "killed before round 1 was logged: the test did not reproduce the case"
    assert not (stage1 / "checkpoints").exists() or not os.listdir(stage1 / "checkpoints"), \
        "the kill came after the stage's checkpoint: the test did not reproduce the case"
    finals = train_cascade(f"{NFT}:tiny_cascade", str(out), args)
    assert all(os.path.isfile(os.path.join(f, "trainer_state.json")) for f in finals)
    assert [r["round"] for r in read_metrics(str(stage1))] == [1, 2, 3]
    assert len(list(tmp_path.glob("cascade/stage1-tiny.previous-*"))) == 1  # the partial run, moved aside
    before = os.path.getmtime(os.path.join(finals[1], "trainer_state.json"))
    assert train_cascade(f"{NFT}:tiny_cascade", str(out), [*args, "overwrite=true"]) == finals
    assert os.path.getmtime(os.path.join(finals[1], "trainer_state.json")) > before  # trained again


@pytest.mark.slow  # 22 s on the 2-core CPU box: 10 NFT rounds of 16 videos, then 6 OPD rounds
def test_a_video_teacher_trained_with_nft_on_a_per_frame_reward_distils_a_video_student(tmp_path):
    """NFT on the tiny Wan (brightness of every frame, mean per video) raises the held-out reward;
    its EMA checkpoint is then the OPD teacher of a video student, whose distance to it falls."""
    config, rows = _train(f"{NFT}:tiny_wan_t2v", tmp_path / "nft")
    evals = [r["eval/reward/bright"] for r in rows if "eval/reward/bright" in r]
    print(f"video NFT: held-out per-frame brightness {evals[0]:.5f} -> {evals[-1]:.5f} (the run's 4 samples)")
    assert len(evals) == 2
    # the run's own 4 evaluation samples are too few to tell a rise from noise (see test_mean_reward_rises)
    mean, stderr = _paired_rise(config, "video NFT, per-frame")
    assert mean > 2 * stderr, (mean, stderr)
    dist = _distil_from_nft(config, "tiny_wan_t2v_mopd", tmp_path / "opd")
    print(f"OPD video student from the NFT video teacher: held-out distance {dist[0]:.4g} -> {dist[-1]:.4g}")
    assert dist[-1] < 0.5 * dist[0]
