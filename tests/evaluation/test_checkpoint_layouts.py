"""The eval CLI reads our checkpoints and the peers' (Flow-GRPO / DiffusionNFT checkpoint-N/lora),
and says in one line when a folder is neither."""
import shutil
from pathlib import Path

import pytest

from diffusion_opd.evaluation.run import main, resolve_checkpoint
from tests.shared_data import shared_datasets


@pytest.fixture
def peers_save_dir(tmp_path, tiny_teacher_dirs):
    """A Flow-GRPO-style save_dir: checkpoints/checkpoint-{5,10}/lora (PEFT) + a junk folder."""
    save = tmp_path / "flow_grpo_run"
    for step in (5, 10):
        shutil.copytree(tiny_teacher_dirs["peft"], save / "checkpoints" / f"checkpoint-{step}" / "lora")
    (save / "checkpoints" / "checkpoint-99").mkdir()  # an interrupted save: no lora/ -> skipped
    return save


def test_peers_layouts_resolve_to_their_peft_folder(peers_save_dir):
    newest = peers_save_dir / "checkpoints" / "checkpoint-10"
    five = peers_save_dir / "checkpoints" / "checkpoint-5"
    assert resolve_checkpoint(str(peers_save_dir)) == (str(newest / "lora"), str(newest), {})
    assert resolve_checkpoint(str(five))[0] == str(five / "lora")
    assert resolve_checkpoint(str(five / "lora"))[0] == str(five / "lora")
    with pytest.raises(FileNotFoundError, match="Flow-GRPO / DiffusionNFT checkpoint: it holds one set .*drop --use_ema"):
        resolve_checkpoint(str(five), use_ema=True)


def test_our_round_lora_folder_is_its_round(tmp_path):
    round_dir = tmp_path / "out" / "checkpoints" / "round-4"
    (round_dir / "lora").mkdir(parents=True)
    (round_dir / "ema").mkdir()
    for folder in (round_dir, round_dir / "ema"):
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (round_dir / "config.json").write_text('{"model": {"path": "x/y"}}')
    assert resolve_checkpoint(str(round_dir / "lora"), use_ema=True) == (str(round_dir / "ema"), str(round_dir),
                                                                       {"model": {"path": "x/y"}})


def test_a_folder_that_is_neither_gets_one_clear_line(tmp_path, capsys, tiny_sd3_dir, peers_save_dir):
    junk = tmp_path / "junk"
    (junk / "lora").mkdir(parents=True)
    (junk / "lora" / "weights.pt").write_bytes(b"")
    data = ["--dataset", "ocr", "--data_root", str(shared_datasets()), "--model", tiny_sd3_dir]
    assert main([*data, "--checkpoint_path", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(junk.resolve()) in err
    assert "is neither a checkpoint of this repo" in err and "checkpoint-N/lora/" in err and "--lora_path" in err
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    assert main([*data, "--checkpoint_path", str(empty)]) == 2
    assert "no complete checkpoint under" in capsys.readouterr().err


def test_peer_flag_names_are_aliases_and_a_peer_checkpoint_is_a_lora_path(peers_save_dir, tiny_sd3_dir):
    """DiffusionNFT's --lora_hf_path / --num_inference_steps mean --lora_path / --num_steps; a peer
    checkpoint-N folder and an owner/repo/subfolder@rev Hub path are accepted as the LoRA."""
    from diffusion_opd.evaluation.run import build_parser, plan_from_args

    data = ["--dataset", "ocr", "--data_root", str(shared_datasets()), "--model", tiny_sd3_dir, "--max_samples", "1"]
    five = peers_save_dir / "checkpoints" / "checkpoint-5"
    peer = build_parser().parse_args([*data, "--lora_hf_path", str(five), "--num_inference_steps", "7"])
    ours = build_parser().parse_args([*data, "--lora_path", str(five), "--num_steps", "7"])
    assert vars(peer) == vars(ours) and ours.num_steps == 7
    assert plan_from_args(peer).adapter["path"] == str(five)  # resolved to five/lora when the policy loads
    hub = plan_from_args(build_parser().parse_args([*data, "--lora_hf_path", "owner/opd/Student/lora@v1"]))
    assert hub.adapter["path"] == "owner/opd/Student/lora@v1"
