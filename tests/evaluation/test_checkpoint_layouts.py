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
