"""Registry, load_reward caching, the Scorer contract, checkpoint resolution and its messages,
the checkpoint README and the download script."""
import functools
import importlib.util
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from diffusion_opd.rewards import (
    REGISTRY,
    MissingCheckpointError,
    Scorer,
    check_reward_name,
    ckpt_root,
    load_reward,
    reward_class,
    reward_names,
)
from diffusion_opd.rewards.base import resolve_dir, resolve_file

REPO = Path(__file__).resolve().parents[2]
WEIGHT_FREE = ["brightness", "colorfulness", "target_color"]
VIDEO_ONLY = ["temporal_consistency"]  # weight-free, scores videos (tests/rewards/test_video.py)
TOY = ["toy_aesthetic", "toy_colour", "toy_glyph"]  # the demo's world (tests/demo)
ALL = sorted(["aesthetic", "clipscore", "geneval", "hpsv2", "imagereward", "ocr", "pickscore", "unifiedreward"]
             + WEIGHT_FREE + TOY + VIDEO_ONLY)


def _script():
    spec = importlib.util.spec_from_file_location("download_reward_ckpts", REPO / "scripts" / "download_reward_ckpts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_and_unknown_name_lists_valid_ones():
    assert reward_names() == ALL
    with pytest.raises(ValueError) as err:
        load_reward("ocrr")
    for name in ALL:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid rewards"):
        check_reward_name("")


@pytest.mark.parametrize("name", ALL)
def test_every_registered_class_is_a_scorer_with_checkpoints(name):
    cls = reward_class(name)
    assert issubclass(cls, Scorer) and cls.name == name
    module = importlib.import_module(cls.__module__)
    for entry_name, entry in module.CHECKPOINTS.items():
        assert {"repo_id", "files", "local", "purpose"} <= set(entry), (name, entry_name)


def test_load_reward_caches_per_options():
    a = load_reward("unifiedreward", url="http://127.0.0.1:1")
    assert load_reward("unifiedreward", url="http://127.0.0.1:1") is a  # once per process
    assert load_reward("unifiedreward", url="http://127.0.0.1:2") is not a
    assert load_reward("unifiedreward", url="http://127.0.0.1:1", cache=False) is not a


class _Echo(Scorer):
    """A scorer of image widths, to check the base-class contract."""

    name = "echo"
    loads = 0

    def _load(self):
        type(self).loads += 1

    def _score(self, images, prompts, metadata):
        return {"echo": np.array([im.width for im in images], dtype=np.float32), "n": np.array([len(images)] * len(images))}


def test_scorer_contract_batches_and_loads_once():
    from PIL import Image

    scorer = _Echo(batch_size=2)
    images = [Image.new("RGB", (w, 4)) for w in (1, 2, 3, 4, 5)]
    out = scorer(images, ["p"] * 5)
    np.testing.assert_array_equal(out["echo"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["n"], [2, 2, 2, 2, 1])  # batches of at most 2
    scorer(images[:1], ["p"])
    assert _Echo.loads == 1
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(images[:2], ["p"])
    with pytest.raises(ValueError, match="metadata rows"):
        scorer(images[:2], ["p", "q"], [{}])
    assert scorer([], [])["echo"].shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        _Echo(batch_size=0)


def test_ckpt_root_precedence(monkeypatch):
    monkeypatch.delenv("DIFFUSION_OPD_REWARD_CKPTS", raising=False)
    assert ckpt_root() == Path("reward_ckpts")
    monkeypatch.setenv("DIFFUSION_OPD_REWARD_CKPTS", "/elsewhere")
    assert ckpt_root() == Path("/elsewhere")
    assert ckpt_root("mine") == Path("mine")


def test_resolution_prefers_local_and_explains_misses(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    assert resolve_file("r", [tmp_path / "missing.bin", tmp_path / "a.bin"]) == tmp_path / "a.bin"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_dir("r", [tmp_path / "model"]) == str(tmp_path / "model")
    # Offline and not cached: the error lists every place and the command.
    with pytest.raises(MissingCheckpointError) as err:
        resolve_file("pickscore", [tmp_path / "nope.bin"], "org/not-cached-repo", ["w.bin"])
    msg = str(err.value)
    assert str(tmp_path / "nope.bin") in msg and "org/not-cached-repo :: w.bin" in msg
    assert "python scripts/download_reward_ckpts.py --only pickscore" in msg
    with pytest.raises(MissingCheckpointError, match="org/not-cached-repo"):
        resolve_dir("r", [tmp_path / "empty"], "org/not-cached-repo")


def test_readme_documents_every_checkpoint():
    readme = (REPO / "reward_ckpts" / "README.md").read_text()
    for name in ALL:
        assert f"`{name}`" in readme, name
        module = importlib.import_module(reward_class(name).__module__)
        for entry in module.CHECKPOINTS.values():
            if entry["repo_id"]:
                assert entry["repo_id"] in readme, entry["repo_id"]
            if entry["local"]:
                assert entry["local"] in readme, entry["local"]
            for spec in entry["files"]:
                if spec != "*":
                    assert spec.split("|")[0] in readme, spec
    assert "scripts/download_reward_ckpts.py" in readme


def test_download_script_plan_covers_every_reward(capsys):
    script = _script()
    assert script.main(["--dry-run", "--optional"]) == 0
    printed = capsys.readouterr().out
    for name in ALL:
        assert f"[{name}/" in printed, name
    assert "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth" in printed
    assert script.main(["--dry-run", "--only", "ocr"]) == 0
    assert "[geneval/" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--only", "nope"])


def test_download_script_fetches_url_and_reports_failures(tmp_path, capsys):
    script = _script()
    served = tmp_path / "served"
    served.mkdir()
    (served / "ckpt.pth").write_bytes(b"weights" * 1000)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = script.fetch_url(f"http://127.0.0.1:{server.server_address[1]}/ckpt.pth", tmp_path / "out" / "c.pth")
    finally:
        server.shutdown()
        server.server_close()
    assert dest.read_bytes() == b"weights" * 1000 and not (tmp_path / "out" / "c.pth.part").exists()
    # Offline: the script says which files are missing and where they come from, and exits 1.
    assert script.main(["--only", "geneval", "--root", str(tmp_path / "root")]) == 1
    printed = capsys.readouterr()
    assert "facebook/mask2former-swin-small-coco-instance" in printed.out + printed.err


def _solid(*rgb, size=(6, 4)):
    from PIL import Image

    return Image.new("RGB", size, rgb)


def _halves(left, right):
    """A 4x4 image: left half ``left``, right half ``right`` (uint8 array)."""
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    a[:, :2], a[:, 2:] = left, right
    return a


RED, BLUE = (255, 0, 0), (0, 0, 255)


# Hand-computed: luma 0.299 R + 0.587 G + 0.114 B; colourfulness with rg = R - G,
# yb = (R + G)/2 - B (red|blue halves: rg = {1, 0}, yb = {.5, -1} -> sqrt(.25 + .5625) +
# .3 sqrt(.25 + .0625)); colour match 1 - mean ||p - c|| / sqrt(3).
@pytest.mark.parametrize("name, options, image, prompt, expected", [
    ("brightness", {}, _solid(*RED), "", 0.299),
    ("brightness", {}, _solid(255, 255, 255), "", 1.0),
    ("brightness", {}, _halves((0, 0, 0), (255, 255, 255)), "", 0.5),
    ("colorfulness", {}, _solid(128, 128, 128), "", 0.0),
    ("colorfulness", {}, _solid(*RED), "", 0.3 * np.sqrt(1.25)),
    ("colorfulness", {}, _halves(RED, BLUE), "", np.sqrt(0.8125) + 0.3 * np.sqrt(0.3125)),
    ("target_color", {}, _solid(*RED), "a Red apple", 1.0),
    ("target_color", {}, _solid(0, 0, 0), "a red car", 1 - 1 / np.sqrt(3)),
    ("target_color", {}, _solid(255, 255, 255), "a black cat", 0.0),
    ("target_color", {}, _solid(*BLUE), "a blue cup and a red apple", 1.0),  # the first colour word
    ("target_color", {"color": "blue"}, _halves(RED, BLUE), "no colour named", 1 - np.sqrt(2) / 2 / np.sqrt(3)),
    ("target_color", {}, _solid(*RED), "a reddish sky", float("nan")),  # whole words only
])
def test_weight_free_rewards_closed_form(name, options, image, prompt, expected):
    out = load_reward(name, cache=False, **options)([image], [prompt])
    np.testing.assert_allclose(out[name], [expected], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_weight_free_rewards_contract(name, test_images, test_prompts):
    """Every image type and size, batching-independent, deterministic, bounded, no checkpoint."""
    scorer = load_reward(name, cache=False, batch_size=2)
    out = scorer(test_images, test_prompts)
    scores = out[name]
    assert scores.shape == (5,) and scores.dtype == np.float32
    one_by_one = np.concatenate([scorer([im], [p])[name] for im, p in zip(test_images, test_prompts)])
    np.testing.assert_array_equal(scores, one_by_one)
    finite = scores[np.isfinite(scores)]
    assert len(finite) and (finite >= 0).all() and (finite <= 2).all()
    if name == "target_color":  # 3 of the 5 prompts name no colour
        assert list(out["color"]) == ["", "red", "", "green", ""] and np.isnan(scores).sum() == 3
        assert scorer.stats["prompts_without_color"] == 6
    else:
        assert np.isfinite(scores).all()
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        load_reward("target_color", color="teal", cache=False)


def test_weight_free_rewards_in_a_multi_reward():
    from diffusion_opd.rewards.multi import MultiReward

    multi = MultiReward({"brightness": 1.0, "target_color": 2.0})
    out = multi([_solid(*RED), _solid(*BLUE)], ["a red kite", "a red kite"])
    np.testing.assert_allclose(out["total"], [0.299 + 2.0, 0.114 + 2 * (1 - np.sqrt(2) / np.sqrt(3))], rtol=1e-5)
    assert list(out["target_color/color"]) == ["red", "red"]
