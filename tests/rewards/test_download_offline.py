"""scripts/download_reward_ckpts.py without a network: one probe, a quick stop, and the list of
files still missing with their paths, sizes, sources and a command to fetch them elsewhere."""
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "download_reward_ckpts.py"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_run_ends_fast_with_the_missing_list(tmp_path):
    root = tmp_path / "ckpts"
    (root / "hpsv2").mkdir(parents=True)
    (root / "hpsv2" / "HPS_v2.1_compressed.pt").write_bytes(b"x")  # already placed: not listed
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--only", "hpsv2,geneval"],
                          capture_output=True, text=True, env=env, timeout=60)
    elapsed = time.perf_counter() - start
    assert elapsed < 30
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert out.startswith("no network:") and "one probe" in out and "nothing was downloaded" in out
    assert "HPS_v2.1_compressed" not in out
    detector = root / "geneval" / "mask2former-swin-small-coco-instance"
    assert f"{detector / 'model.safetensors'} (or pytorch_model.bin)" in out
    assert "[geneval/detector] 280 MB" in out and "[geneval/clip] 1.7 GB" in out
    assert "/facebook/mask2former-swin-small-coco-instance/resolve/main/config.json" in out
    assert f"hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors --local-dir {root / 'geneval' / 'clip'}" in out
    assert not (detector / "config.json").exists()


def test_a_stalled_endpoint_is_given_up_after_the_probe_timeout(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("download_reward_ckpts", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        rc = script.main(["--root", str(tmp_path), "--only", "hpsv2", "--probe-timeout", "1"])
        elapsed = time.perf_counter() - start
    assert rc == 1 and 0.9 < elapsed < 5
    out = capsys.readouterr().out
    assert "timed out" in out and str(tmp_path / "hpsv2" / "HPS_v2.1_compressed.pt") in out
    # With HF_HUB_OFFLINE nothing is probed at all.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert script.main(["--root", str(tmp_path), "--only", "hpsv2"]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().out
