"""Kill a real training process after a checkpoint, resume it, and compare with an uninterrupted run
(once per model family: the tiny SD3 and the tiny FLUX recipe)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from diffusion_opd.trainers.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["train.num_rounds=6", "save_every=1", "keep_last=10",
        "eval.every=3", "logging.progress=false", "train.ema_decay=0.9"]


def _cmd(out, *extra, config="tiny_mopd"):
    return [sys.executable, "scripts/train_opd.py", "--config", f"config/opd.py:{config}", *ARGS, f"output_dir={out}",
            *extra]


def _losses(out):
    return [{k: v for k, v in r.items() if k.startswith(("loss", "eval/", "round", "grad_norm"))}
            for r in read_metrics(out)]


@pytest.mark.parametrize("config", ["tiny_mopd", "tiny_flux_mopd"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, config):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_cmd(full, config=config), cwd=ROOT, check=True, capture_output=True)

    proc = subprocess.Popen(_cmd(killed, config=config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(killed, "checkpoints", "round-2", "trainer_state.json")
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "checkpoints", "round-6")), "killed too late to test resume"

    subprocess.run(_cmd(killed, "resume_from=latest", config=config), cwd=ROOT, check=True, capture_output=True)
    for name in ("student_raw.safetensors", "pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors"):
        a = load_file(os.path.join(full, "checkpoints", "round-6", name))
        b = load_file(os.path.join(killed, "checkpoints", "round-6", name))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), (name, k)
    assert _losses(full) == _losses(killed)
    leftovers = [n for n in os.listdir(os.path.join(killed, "checkpoints")) if n.startswith(".tmp")]
    assert leftovers == [] or all(int(n.rsplit("-", 1)[1]) > 2 for n in leftovers)
