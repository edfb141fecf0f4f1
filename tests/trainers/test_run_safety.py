"""A run never destroys another run's data, and resume survives damaged files (issue 11).

Every test is one of the issue's reproductions, on the real trainer with the tiny SD3 (CPU).
"""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from diffusion_opd.config import ConfigError, load_config
from diffusion_opd.trainers import checkpoint as ckpt
from diffusion_opd.trainers.metrics import read_metrics
from diffusion_opd.trainers.opd import train
from diffusion_opd.trainers.run import Run
from diffusion_opd.trainers.run_dir import claim_output_dir
from diffusion_opd.trainers.stop import NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd"
QUICK = ["logging.progress=false", "eval.every=0"]


def numbers(out):
    """The metrics rows without wall-clock figures."""
    return [{k: v for k, v in r.items() if k.startswith(("round", "loss", "eval/", "grad_norm", "lr"))}
            for r in read_metrics(str(out))]


def tiny(out, *overrides):
    return load_config(TINY, [f"output_dir={out}", *QUICK, *overrides])


def _tree(folder):
    """{relative path: bytes} of every file under ``folder`` but the lock."""
    out = {}
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.basename(path) != "run.lock":
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_second_run_into_a_used_folder_is_refused_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = str(tmp_path / "run")
    train(tiny(out, "train.num_rounds=2", "save_every=1"))
    before = _tree(out)
    assert "metrics.jsonl" in before and "checkpoints/round-2/manifest.json" in before

    with pytest.raises(ConfigError) as err:  # refused before any model loads
        Run(tiny(out, "train.num_rounds=3"))
    message = str(err.value)
    assert "\n" not in message and "resume_from=latest" in message and "overwrite=true" in message
    assert "metrics.jsonl with 2 rows, checkpoints up to round-2" in message
    assert _tree(out) == before  # nothing touched

    train(tiny(out, "train.num_rounds=1", "overwrite=true"))
    moved = glob.glob(str(tmp_path / "run.previous-*"))
    assert len(moved) == 1 and f"moved the previous run's files to {moved[0]}" in capsys.readouterr().out
    assert _tree(moved[0]) == before  # every old file, byte for byte
    assert [r["round"] for r in read_metrics(out)] == [1]
    assert [r for r, _ in ckpt.list_checkpoints(out)] == [1]


def test_pruning_only_touches_this_runs_checkpoints(tmp_path):
    out = str(tmp_path)

    def publish(round_idx, run_id):
        tmp = ckpt.temporary_dir(out, round_idx)
        os.makedirs(tmp)
        ckpt.write_json(os.path.join(tmp, "trainer_state.json"), {"round": round_idx, "run_id": run_id})
        ckpt.publish(out, round_idx, keep_last=2, run_id=run_id)

    for r in (4, 6, 8):
        publish(r, "old")
    for r in (1, 2, 3):
        publish(r, "new")
    assert {r: ckpt.run_id_of(p) for r, p in ckpt.list_checkpoints(out)} == {
        2: "new", 3: "new", 6: "old", 8: "old"}  # the old run's own pruning kept its last 2
    with pytest.raises(ckpt.CheckpointError, match="round-6: exists and belongs to another run"):
        publish(6, "new")
    assert ckpt.run_id_of(os.path.join(ckpt.checkpoint_root(out), "round-6")) == "old"


def _lock_holder(out):
    try:
        with open(os.path.join(out, "run.lock")) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def test_two_concurrent_runs_second_fails_at_once_then_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = str(tmp_path / "run")
    first = Run(tiny(out, "train.num_rounds=100"))  # a live run in this process holds the folder
    try:
        cmd = [sys.executable, "scripts/train_opd.py", "--config", "config/opd.py:tiny_mopd", f"output_dir={out}",
               *QUICK, "resume_from=latest"]
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"error: output_dir: {out} is in use by another run (PID {os.getpid()} on "
                                   f"{socket.gethostname()}, started {_lock_holder(out)['started']})")
    finally:
        first.close()
    assert _lock_holder(out) == {}  # released cleanly: nothing stale for the next run

    # a holder killed without a chance to clean up (SIGKILL) leaves its name in the lock file
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from diffusion_opd.trainers.run_dir import "
                               "RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)",
                               out], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    assert _lock_holder(out)["pid"] == holder.pid
    capsys.readouterr()
    lock = claim_output_dir(tiny(out, "overwrite=true"), Accelerator(cpu=True))
    try:
        assert f"took over a stale lock of {out} left by PID {holder.pid}" in capsys.readouterr().out
        assert _lock_holder(out)["pid"] == os.getpid()
    finally:
        lock.release()


def test_truncated_checkpoint_is_skipped_for_an_older_intact_one(tmp_path, capsys):
    """resume_from=latest passes over a truncated safetensors (naming it) and a half-written
    metrics line; the re-run rounds equal the originals; an explicit corrupt resume fails in one line."""
    out = str(tmp_path / "run")
    full = train(tiny(out, "train.num_rounds=2", "save_every=1"))
    expected_weights = full.policy.student_state_dict()
    expected_rows = numbers(out)
    damaged = os.path.join(ckpt.checkpoint_root(out), "round-2", "student_raw.safetensors")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"round": 3, "loss": 0.1')  # killed mid-write
    capsys.readouterr()

    with pytest.warns(UserWarning, match="dropped a half-written last line"):
        resumed = train(tiny(out, "train.num_rounds=2", "save_every=1", "resume_from=latest"))
    printed = capsys.readouterr().out
    assert f"skipping {os.path.dirname(damaged)}: {damaged}: " in printed and "truncated" in printed
    assert "resumed from" in printed and printed.split("resumed from ")[1].split()[0].endswith("round-1")
    assert "moved the later or damaged checkpoints (round-2)" in printed  # never silently
    assert len(glob.glob(f"{out}.previous-*/checkpoints/round-2/student_raw.safetensors")) == 1  # set aside, kept
    got = resumed.policy.student_state_dict()
    assert all(torch.equal(got[k], expected_weights[k]) for k in expected_weights)
    assert numbers(out) == expected_rows

    with open(damaged, "r+b") as f:  # the rewritten round-2, damaged again
        f.truncate(100)
    with pytest.raises(ckpt.CheckpointError) as err:
        Run(tiny(out, f"resume_from={os.path.dirname(damaged)}"))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"resume_from: {damaged}: 100 bytes")


def test_manifest_catches_a_changed_byte(tmp_path):
    folder = tmp_path / "round-1"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"0123456789")
    ckpt.write_manifest(str(folder))
    ckpt.verify(str(folder))
    (folder / "a.bin").write_bytes(b"0123456780")  # same size, one byte changed
    with pytest.raises(ckpt.CheckpointError, match="a.bin: content differs .*SHA-256"):
        ckpt.verify(str(folder))


def test_fp16_loss_scaler_is_checkpointed_and_restored(tmp_path):
    """The GradScaler accelerate keeps for fp16 (a CPU GradScaler stands in: fp16 autocast needs
    CUDA) goes through checkpoint.save and checkpoint.load unchanged."""
    run = Run(tiny(tmp_path / "a", "train.num_rounds=1"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=7)
    weight = torch.nn.Parameter(torch.ones(1))
    sgd = torch.optim.SGD([weight], lr=0.1)
    for grad in (float("inf"), 1.0, 1.0):  # one overflow (scale halves, step skipped), two good steps
        scaler.scale(weight.sum()).backward()
        weight.grad.fill_(grad)
        scaler.step(sgd)
        scaler.update()
        sgd.zero_grad()
    run.accelerator.scaler = scaler
    run.state.round = 1
    run.save()
    saved = os.path.join(ckpt.checkpoint_root(run.config.output_dir), "round-1")
    assert os.path.isfile(os.path.join(saved, "scaler.pt"))

    run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=7)  # a fresh one
    ckpt.load(run, saved)
    restored = run.accelerator.scaler.state_dict()
    assert restored == scaler.state_dict() and restored["scale"] == 2.0**15 and restored["_growth_tracker"] == 2
    run.close()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    run = Run(tiny(tmp_path / "run", "train.num_rounds=1"))
    with torch.no_grad():
        run.params[0].view(-1)[0] = float("nan")
    run.state.round = 1
    with pytest.raises(NonFiniteError, match="round 1: the student's weights are not finite; no checkpoint"):
        run.save()
    assert not os.path.exists(ckpt.checkpoint_root(run.config.output_dir))  # not even a temporary folder
    run.close()


def test_run_stopped_at_round_10_and_resumed_is_bit_identical_for_30_rounds(tmp_path):
    """The issue's case. With prompts encoded in batches it drifted (max weight difference ~2e-7):
    a prompt's embedding depended on the prompts first encoded with it, e.g. the empty prompt went
    with the held-out prompts at round 0 in the uninterrupted run but with round 11's prompts after
    the resume."""
    stop = 10
    args = ["train.num_rounds=30", "save_every=1000", "eval.every=10", "train.ema_decay=0.9"]  # win over QUICK's
    full = train(tiny(tmp_path / "full", *args))
    train(tiny(tmp_path / "split", *args, f"train.stop_after_round={stop}"))
    resumed = train(tiny(tmp_path / "split", *args, "resume_from=latest"))
    a, b = full.policy.student_state_dict(), resumed.policy.student_state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"max weight difference {worst}"
    assert numbers(tmp_path / "full") == numbers(tmp_path / "split")


def test_changed_optimizer_settings_on_resume_are_applied_logged_and_recorded(tmp_path, capsys):
    """Issue 24, finding 1: the restored optimizer / scheduler states used to overwrite a changed
    learning rate, weight decay and betas (metrics kept lr 0.03 while config.json said 1e-3)."""
    out = tmp_path / "run"
    train(tiny(out, "train.num_rounds=4", "save_every=2"))
    first = tiny(out)
    capsys.readouterr()
    changes = ["train.learning_rate=0.001", "train.weight_decay=0.05", "train.adam_beta1=0.8", "train.adam_beta2=0.95"]
    train(tiny(out, "train.num_rounds=6", "save_every=2", "resume_from=latest", *changes))
    said = [line for line in capsys.readouterr().out.splitlines() if "[resume] warning" in line]
    assert len(said) == 1 and "train.learning_rate=0.001" in said[0], said
    assert f"train.learning_rate={first.train.learning_rate:g}" in said[0]
    rows = read_metrics(str(out))
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["lr"] == pytest.approx(0.001) and rows[5]["lr"] == pytest.approx(0.001)  # constant schedule
    assert rows[4]["resume_changed/train.learning_rate"] == pytest.approx(0.001)
    assert rows[4]["resume_changed/train.adam_beta1"] == pytest.approx(0.8)
    assert not any(k.startswith("resume_changed/") for r in rows[:4] + rows[5:] for k in r)
    ckpt_dir = out / "checkpoints" / "round-6"
    group = torch.load(ckpt_dir / "optimizer.pt", weights_only=False)["param_groups"][0]
    assert group["lr"] == pytest.approx(0.001) and group["weight_decay"] == pytest.approx(0.05)
    assert tuple(group["betas"]) == pytest.approx((0.8, 0.95))
    assert torch.load(ckpt_dir / "scheduler.pt", weights_only=False)["base_lrs"] == pytest.approx([0.001])
    recorded = json.loads((ckpt_dir / "config.json").read_text())["train"]
    assert recorded["learning_rate"] == pytest.approx(0.001) and recorded["adam_beta1"] == pytest.approx(0.8)


def test_a_rewind_then_an_interruption_resumes_the_rewound_branch(tmp_path, capsys):
    """Issue 24, finding 2: after resuming from round-4 of 8 and stopping at 5, resume_from=latest
    took the abandoned round-8 (metrics ended 0..5, 9, 10). The later checkpoints are moved
    aside at the rewind (with a copy of the metrics), so latest is round-5."""
    out = tmp_path / "run"
    args = ["train.num_rounds=8", "save_every=2", "keep_last=10"]
    train(tiny(out, *args))
    old_rows = numbers(out)
    train(tiny(out, *args, f"resume_from={out}/checkpoints/round-4", "train.stop_after_round=5"))
    assert [r for r, _ in ckpt.list_checkpoints(str(out))] == [2, 4, 5]
    aside = glob.glob(f"{out}.previous-*")
    assert len(aside) == 1 and sorted(os.listdir(os.path.join(aside[0], "checkpoints"))) == ["round-6", "round-8"]
    assert [r["round"] for r in read_metrics(aside[0])] == list(range(1, 9))  # the abandoned branch's rows
    capsys.readouterr()
    train(tiny(out, *args, "resume_from=latest"))
    assert "resumed from " + str(out / "checkpoints" / "round-5") in capsys.readouterr().out
    assert [r["round"] for r in read_metrics(str(out))] == list(range(1, 9))
    assert numbers(out)[:4] == old_rows[:4]


def test_a_damaged_trainer_state_is_set_aside_not_taken_for_another_run(tmp_path, capsys):
    """Issue 24, finding 3: a garbled round-8/trainer_state.json made every rerun train 7-8 and
    then fail "round-8 ... belongs to another run (run_id None)"."""
    out = tmp_path / "run"
    args = ["train.num_rounds=8", "save_every=2", "keep_last=10"]
    train(tiny(out, *args))
    state = out / "checkpoints" / "round-8" / "trainer_state.json"
    garbled = state.read_text()[:40]  # cut mid-JSON
    state.write_text(garbled)
    capsys.readouterr()
    train(tiny(out, *args, "resume_from=latest"))
    printed = capsys.readouterr().out
    assert f"skipping {state.parent}: {state}" in printed and "moved the later or damaged checkpoints (round-8)" in printed
    assert ckpt.verify(str(state.parent)) is None and ckpt.run_id_of(str(state.parent)) is not None  # rewritten
    aside = glob.glob(f"{out}.previous-*/checkpoints/round-8/trainer_state.json")
    assert len(aside) == 1 and open(aside[0]).read() == garbled  # kept as it was, beside the run
    assert [r["round"] for r in read_metrics(str(out))] == list(range(1, 9))
    train(tiny(out, *args, "resume_from=latest"))  # and a rerun is fine too (nothing left to train)
