"""Kill (SIGKILL) or stop (SIGTERM) a real training process, resume it, and compare with an
uninterrupted run (SIGKILL once per model family: the tiny SD3 and the tiny FLUX recipe)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from diffusion_opd.config import load_config
from diffusion_opd.trainers.metrics import read_metrics
from diffusion_opd.trainers.opd import train
from tests.processes import signal_once_written

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["train.num_rounds=6", "save_every=1", "keep_last=10",
        "eval.every=3", "logging.progress=false", "train.ema_decay=0.9"]


def _cmd(out, *extra, config="tiny_mopd"):
    return [sys.executable, "scripts/train_opd.py", "--config", f"config/opd.py:{config}", *ARGS, f"output_dir={out}",
            *extra]


def _losses(out):
    return [{k: v for k, v in r.items() if k.startswith(("loss", "eval/", "round", "grad_norm"))}
            for r in read_metrics(out)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run of a config (once per config: the tests compare with it)."""
    done = {}

    def get(config):
        if config not in done:
            done[config] = str(tmp_path_factory.mktemp("resume") / f"full_{config}")
            subprocess.run(_cmd(done[config], config=config), cwd=ROOT, check=True, capture_output=True)
        return done[config]
    return get


def _assert_same_run(full, other):
    for name in ("student_raw.safetensors", "pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a = load_file(os.path.join(full, "checkpoints", "round-6", name))
        b = load_file(os.path.join(other, "checkpoints", "round-6", name))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (name, k)
    assert _losses(full) == _losses(other)


def test_sigterm_finishes_the_round_checkpoints_and_says_how_to_resume(tmp_path, full_run):
    stopped = str(tmp_path / "stopped")
    proc = subprocess.Popen(_cmd(stopped, "save_every=100"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(stopped, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and "\"round\": 2" in open(metrics).read()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # during round 3 (or at its very start)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    done = read_metrics(stopped)[-1]["round"]
    assert 2 <= done < 6, "stopped too late to test resume"
    assert last.startswith(f"error: stopped by signal {int(signal.SIGTERM)} after round {done} of 6;")
    assert last.endswith("continue with the same command plus resume_from=latest")
    # the round in progress was finished and checkpointed although save_every=100
    assert sorted(os.listdir(os.path.join(stopped, "checkpoints"))) == [f"round-{done}"]

    # resumed in this process (a third interpreter start would only cost time)
    config = load_config(os.path.join(ROOT, "config", "opd.py") + ":tiny_mopd",
                         ARGS + [f"output_dir={stopped}", "save_every=100", "resume_from=latest"])
    train(config)
    _assert_same_run(full_run("tiny_mopd"), stopped)


@pytest.mark.parametrize("config", ["tiny_mopd", "tiny_flux_mopd"] + [
    pytest.param(name, marks=pytest.mark.slow)  # the newer families: minutes of CPU each
    for name in ("tiny_qwen_image_mopd", "tiny_flux2_mopd", "tiny_wan_t2v_mopd", "tiny_wan22_t2v_mopd")])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, config, full_run):
    full, killed = full_run(config), str(tmp_path / "killed")

    proc = subprocess.Popen(_cmd(killed, config=config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    signal_once_written(proc, os.path.join(killed, "checkpoints", "round-2", "trainer_state.json"))
    assert not os.path.exists(os.path.join(killed, "checkpoints", "round-6")), "killed too late to test resume"

    subprocess.run(_cmd(killed, "resume_from=latest", config=config), cwd=ROOT, check=True, capture_output=True)
    _assert_same_run(full, killed)
    leftovers = [n for n in os.listdir(os.path.join(killed, "checkpoints")) if n.startswith(".tmp")]
    assert leftovers == [] or all(int(n.rsplit("-", 1)[1]) > 2 for n in leftovers)
