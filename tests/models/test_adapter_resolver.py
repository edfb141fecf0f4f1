"""One resolver for every LoRA (models/hub.py: teachers, model.student_init, eval inputs): local
folders, Flow-GRPO / DiffusionNFT ``checkpoint-N``, ``owner/repo/subfolder[@rev]`` from the Hub,
offline, through huggingface_hub's real download code on a Hub cache laid out as it writes one."""
import os
import shutil

import pytest
import torch

from diffusion_opd.models import build_policy
from diffusion_opd.models.hub import (ModelNotFoundError, adapter_allow_patterns, resolve_adapter,
                                      split_hub_path)

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_teacher_dirs):
    """A Hub cache holding ``owner/opd`` at ``main``: ``Student/lora`` (a PEFT adapter with a second
    adapter nested below it, as a multi-adapter save_pretrained writes) and a peer
    ``ckpt/checkpoint-4/lora``. Returns the snapshot folder."""
    import huggingface_hub.constants as constants

    repo = tmp_path / "cache" / "models--owner--opd"
    snapshot = repo / "snapshots" / SHA
    shutil.copytree(tiny_teacher_dirs["peft"], snapshot / "Student" / "lora")
    shutil.copytree(tiny_teacher_dirs["diffusers"], snapshot / "Student" / "lora" / "other")
    shutil.copytree(tiny_teacher_dirs["peft"], snapshot / "ckpt" / "checkpoint-4" / "lora")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # read at call time
    assert constants.HF_HUB_OFFLINE  # conftest: nothing reaches the network
    return snapshot


def test_only_top_level_adapter_files_are_requested():
    """The allow patterns, applied by huggingface_hub's own filter to a multi-adapter repo's file
    list: the adapter at the top of the folder (or of its lora/), nothing nested deeper."""
    from huggingface_hub.utils import filter_repo_objects

    files = ["README.md", "Student/lora/adapter_config.json", "Student/lora/adapter_model.safetensors",
             "Student/lora/other/adapter_config.json", "Student/lora/other/adapter_model.safetensors",
             "Student/lora/ema/pytorch_lora_weights.safetensors", "Student/optimizer.pt",
             "Teacher/lora/adapter_model.safetensors"]
    patterns = adapter_allow_patterns("Student/lora")
    assert sorted(filter_repo_objects(files, allow_patterns=patterns)) == [
        "Student/lora/adapter_config.json", "Student/lora/adapter_model.safetensors"]
    # the old pattern downloaded every nested adapter too
    assert len(list(filter_repo_objects(files, allow_patterns=["Student/lora/*"]))) == 5
    peer = ["ckpt/checkpoint-4/lora/adapter_config.json", "ckpt/checkpoint-4/lora/adapter_model.safetensors",
            "ckpt/checkpoint-4/optimizer.bin", "ckpt/checkpoint-4/lora/x/adapter_model.safetensors"]
    assert sorted(filter_repo_objects(peer, allow_patterns=adapter_allow_patterns("ckpt/checkpoint-4"))) == peer[:2]
    assert adapter_allow_patterns(None, "w.safetensors") == ["adapter_config.json", "w.safetensors",
                                                             "lora/adapter_config.json", "lora/w.safetensors"]


@pytest.mark.parametrize("path, expected", [
    ("owner/repo", ("owner/repo", None, None)),
    ("owner/repo/Student/lora", ("owner/repo", "Student/lora", None)),
    ("owner/repo/Student@v1", ("owner/repo", "Student", "v1")),
])
def test_split_hub_path(path, expected):
    assert split_hub_path(path) == expected
    assert split_hub_path("owner/repo/a", subfolder="b") == ("owner/repo", "a/b", None)
    with pytest.raises(ModelNotFoundError, match="revision"):
        split_hub_path("owner/repo@v1", revision="v2")


def test_resolver_on_hub_and_local_layouts(hub_cache, tmp_path, tiny_teacher_dirs):
    assert resolve_adapter("owner/opd/Student/lora") == str(hub_cache / "Student" / "lora")
    assert resolve_adapter("owner/opd", subfolder="Student/lora", revision="main") == str(hub_cache / "Student" / "lora")
    assert resolve_adapter("owner/opd/ckpt/checkpoint-4@main") == str(hub_cache / "ckpt" / "checkpoint-4" / "lora")
    peer = tmp_path / "save_dir" / "checkpoints" / "checkpoint-2"
    shutil.copytree(tiny_teacher_dirs["peft"], peer / "lora")
    assert resolve_adapter(str(peer)) == str(peer / "lora")  # a peer checkpoint-N: its lora/
    assert resolve_adapter(str(peer / "lora")) == str(peer / "lora")
    assert resolve_adapter(tiny_teacher_dirs["diffusers"]) == tiny_teacher_dirs["diffusers"]  # like our round-N
    with pytest.raises(ModelNotFoundError, match="holds no LoRA weights"):
        resolve_adapter(str(tmp_path / "save_dir"))
    with pytest.raises(ModelNotFoundError, match="no subfolder 'Teacher'"):
        resolve_adapter("owner/opd/Teacher")


def _adapter(policy, name):
    return {k.replace(f".{name}.", "."): v for k, v in policy.transformer.named_parameters() if f".{name}." in k}


def test_peer_checkpoint_and_hub_subfolder_as_teacher_and_student_init(hub_cache, tmp_path, tiny_sd3_dir,
                                                                        tiny_teacher_dirs):
    peer = tmp_path / "checkpoints" / "checkpoint-7"
    shutil.copytree(tiny_teacher_dirs["peft"], peer / "lora")
    policy = build_policy(tiny_sd3_dir, teachers=[dict(name="hub", path="owner/opd/Student/lora"),
                                                  dict(name="peer", path=str(peer)),
                                                  dict(name="ref", path=tiny_teacher_dirs["peft"])],
                          student_init=dict(path="owner/opd/ckpt/checkpoint-4"))
    ref = _adapter(policy, "ref")
    assert ref and all(torch.equal(ref[k], v) for name in ("hub", "peer") for k, v in _adapter(policy, name).items())
    student = _adapter(policy, "student")
    assert student.keys() == ref.keys() and all(torch.equal(student[k], ref[k]) for k in ref)
    # the same student init from a local peer checkpoint-N (config key model.student_init)
    again = build_policy(tiny_sd3_dir, student_init=dict(path=str(peer)))
    assert all(torch.equal(v, ref[k]) for k, v in _adapter(again, "student").items())
