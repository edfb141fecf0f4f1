"""The round budget (diffusion_opd/budget.py): per-GPU memory under ddp / fsdp and FLOPs of an
OPD round, counted from each real architecture on the meta device; --validate_only's line and
its one-line refusal of a GPU too small, through the console entry."""
import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion_opd import budget
from diffusion_opd.budget import Geometry, geometry_of, recipe_geometry, round_memory
from diffusion_opd.config import load_config
from diffusion_opd.errors import ConfigError
from diffusion_opd.models.architectures import ARCHITECTURES, architecture_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Counting a real-size architecture costs 2-20 s of CPU (FlopCounterMode dispatches every op in
# Python): the default suite counts the memory of one family (Wan: CFG and video), -m slow every
# family's memory and FLOPs (the FLOPs' composition is checked in the default suite against the
# tiny round's measured FLOPs, tests/test_benchmark.py).
FAST = ("wan2.1-t2v-1.3b",)
ALL = [pytest.param(m, marks=() if m in FAST else pytest.mark.slow) for m in ARCHITECTURES]
# The released checkpoints' transformer sizes (safetensors), where the test pins them exactly.
EXACT = {"flux.1-dev": 11_901_408_320, "wan2.1-t2v-1.3b": 1_418_996_800}
# The model cards' sizes (billions) for the others: a wrong layer count or width is >10% off.
PUBLISHED = {"sd3.5-medium": 2.5, "sd3.5-large": 8.1, "flux.2-dev": 32, "qwen-image": 20, "wan2.1-t2v-14b": 14,
             "wan2.2-t2v-a14b": 27}  # A14B: "27B parameters, 14B active per step"


def small(model: str) -> Geometry:
    """A small geometry (the count's cost does not depend on it; the contract does not either)."""
    arch = ARCHITECTURES[model]
    return Geometry(resolution=256, frames=5 if arch.frames else 0, images=1, text_tokens=64, student_cfg=arch.cfg,
                    teacher_cfg=(False, arch.cfg, arch.cfg))


def test_attention_is_counted_as_a_flash_kernel_saves_it():
    q = torch.zeros(2, 4, 1000, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with budget.flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                            lambda t: t):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    # q, k, v, out (bf16) and the fp32 log-sum-exp per query row: no 1000 x 1000 matrix
    assert sorted(t.numel() * t.element_size() for t in saved) == [2 * 4 * 1000 * 4] + [2 * 4 * 1000 * 64 * 2] * 4


@pytest.mark.parametrize("model", ALL)
def test_round_memory_under_ddp_and_fsdp(model):
    """Weights counted exactly and divided by N where FSDP2 shards them; what stays whole (VAE,
    activations, the unsharded gradient accumulation) the same under both; text encoders as placed."""
    geo = small(model)
    ddp = round_memory(model, geo)
    n_params = ddp["parameters"]["transformer"]
    if model in EXACT:
        assert n_params == EXACT[model]
    else:
        assert abs(n_params / 1e9 / PUBLISHED[model] - 1) < 0.12, n_params
    lora, parts, act = ddp["parameters"]["student_lora"], ddp["bytes"], ddp["activation_detail"]
    assert ddp["total_bytes"] == sum(parts.values()) and ddp["rows_per_forward"] == (2 if ARCHITECTURES[model].cfg else 1)
    assert parts["transformer_weights"] == 2 * n_params and parts["full_teacher_weights"] == 0
    assert parts["student_lora_weights_grads_adam_ema"] == 20 * lora and parts["teacher_loras"] == 3 * 2 * lora
    assert parts["text_encoders"] == 2 * ddp["parameters"]["text_encoders"] > 0
    # checkpointing keeps block inputs + what is outside the blocks + one block's saved tensors twice
    assert act["checkpointed_peak"] == act["block_inputs"] + act["outside_blocks"] + 2 * act["block_max"]
    assert parts["activations"] == act["checkpointed_peak"] < act["saved_total"]
    fsdp = {n: round_memory(model, geo, "fsdp", n) for n in (1, 2, 8)}
    for n, m in fsdp.items():
        assert m["bytes"]["transformer_weights"] == 2 * n_params // n
        assert m["bytes"]["student_lora_grads_unsharded"] == 4 * lora + 4 * lora // n
        assert m["bytes"]["student_lora_shards_adam_ema"] == 16 * lora // n
        for same in ("text_encoders", "vae", "activations"):
            assert m["bytes"][same] == parts[same]
    # one GPU: all ddp holds plus the gathered working set; more GPUs: less each, below ddp
    assert fsdp[1]["total_bytes"] > ddp["total_bytes"] > fsdp[2]["total_bytes"] > fsdp[8]["total_bytes"]
    shard = round_memory(model, geo, "fsdp", 8, "shard")["bytes"]["text_encoders"]
    assert parts["text_encoders"] // 8 < shard < parts["text_encoders"]  # 1/8 plus the gathered layers
    assert round_memory(model, geo, "fsdp", 8, "rank0")["bytes"]["text_encoders"] == parts["text_encoders"]
    from dataclasses import replace

    offloaded = round_memory(model, replace(geo, offload_text_encoders=True))
    assert offloaded["bytes"]["text_encoders"] == 0
    with pytest.raises(ValueError, match="text_encoders 'cpu'"):
        round_memory(model, geo, "fsdp", 8, "cpu")
    # fsdp's traffic: per task 10 rollout + 9 teacher forwards + 9 backwards each gather the whole
    # transformer with its 4 adapters; each GPU receives 7/8 of it; lockstep: one batch, 28 gathers
    moved = budget.allgather_volume(model, geo, 8)
    experts = ARCHITECTURES[model].experts  # a gather moves the one expert its step runs
    assert moved["gathers_per_round"] == 84 and moved["bytes_per_gather"] == 2 * (n_params + 4 * lora) // experts
    assert moved["received_per_gpu"] == 84 * moved["bytes_per_gather"] * 7 // 8
    assert budget.allgather_volume(model, replace(geo, lockstep=True), 8)["gathers_per_round"] == 28


@pytest.mark.slow
@pytest.mark.parametrize("model", list(ARCHITECTURES))
def test_round_flops_follow_the_round(model):
    """Per task: 10 rollout forwards of the student, 9 teacher forwards, 9 backwards; a teacher at
    guidance 1 runs one row per sample, a CFG one two; frozen weights: the backward costs about
    one forward (activation gradients and the LoRA's, no weight gradients)."""
    geo = small(model)
    cfg = ARCHITECTURES[model].cfg
    flops = (budget.expected_flops_cfg if cfg else budget.expected_flops_embedded_guidance)(model, geo)
    rows = 2 if cfg else 1
    fwd, bwd = flops[f"forward_{rows}_rows"], flops[f"backward_{rows}_rows"]
    one = flops["forward_1_rows"]
    teacher = one + 2 * fwd if cfg else 3 * one
    assert flops["fused_phases"] == {"rollout": 30 * fwd, "teacher": 9 * teacher, "backward": 27 * bwd, "optimizer": 0}
    assert flops["fused"] == sum(flops["fused_phases"].values()) and flops["two_pass"] == flops["fused"] + 27 * fwd
    assert 0.9 * fwd < bwd < 1.2 * fwd
    if cfg:
        assert 1.9 * one < fwd <= 2 * one + 1e6  # two rows: twice one row's work (per-row ops only)


@pytest.mark.parametrize("model", list(ARCHITECTURES))
def test_a_folder_config_is_identified_as_its_architecture(model):
    arch = ARCHITECTURES[model]
    config = json.loads(json.dumps({"_class_name": arch.transformer_class, "_diffusers_version": "0.42.1",
                                    **arch.transformer_config()}))
    assert architecture_of(config, experts=arch.experts) == model
    # one expert of Wan 2.2 A14B is Wan 2.1 14B's transformer: the folder's transformer_2 tells them apart
    assert architecture_of(config, experts=3 - arch.experts) == {"wan2.1-t2v-14b": "wan2.2-t2v-a14b",
                                                                 "wan2.2-t2v-a14b": "wan2.1-t2v-14b"}.get(model)
    config["num_layers"] = 3  # another size of the family: not counted as this one
    assert architecture_of(config, experts=arch.experts) is None


@pytest.mark.parametrize("model", list(budget.RECIPES))
def test_recipe_geometry_is_read_from_the_shipped_config(model):
    config = load_config(budget.RECIPES[model], [])
    geo = recipe_geometry(model)
    arch = ARCHITECTURES[model]
    assert (geo.resolution, geo.frames, geo.images) == (config.sample.resolution, config.sample.num_frames,
                                                        config.train.batch_size)
    assert geo.student_cfg == arch.cfg  # every recipe guides with a scale > 1: CFG families run 2 rows
    assert geo.teacher_cfg == tuple(arch.cfg and config.teachers[t.teacher].guidance_scale != 1
                                    for t in config.tasks.values())
    assert geo.text_tokens == config.model.max_sequence_length + (77 if arch.family == "sd3" else 0)
    assert geo.weight_bytes == (4 if config.model.dtype == "fp32" else 2)


def _folder(tmp_path, model):
    """A pipeline folder of a real architecture without weights: its model_index.json and
    transformer/config.json (what --validate_only reads)."""
    arch = ARCHITECTURES[model]
    for sub in ("transformer", "transformer_2")[:arch.experts]:
        (tmp_path / model / sub).mkdir(parents=True)
        (tmp_path / model / sub / "config.json").write_text(
            json.dumps({"_class_name": arch.transformer_class, **arch.transformer_config()}))
    pipeline = {"flux2": "Flux2Pipeline", "wan": "WanPipeline"}[arch.family]
    (tmp_path / model / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return str(tmp_path / model)


@pytest.mark.slow
def test_two_experts_hold_both_and_run_one(tmp_path):
    """Wan 2.2 A14B = two Wan 2.1 14B transformers: twice the weights and LoRAs, one expert's
    activations and gathers; its LoRA gradients reduced at each of the 27 backwards (sharding.py);
    a folder with a transformer_2 is budgeted as A14B, the same folder without it as 14B."""
    geo = small("wan2.1-t2v-14b")
    one, two = round_memory("wan2.1-t2v-14b", geo), round_memory("wan2.2-t2v-a14b", geo)
    for part in ("transformer", "student_lora"):
        assert two["parameters"][part] == 2 * one["parameters"][part]
    assert two["activation_detail"] == one["activation_detail"] and two["bytes"]["text_encoders"] == one["bytes"]["text_encoders"]
    a, b = (budget.allgather_volume(m, geo, 8) for m in ("wan2.1-t2v-14b", "wan2.2-t2v-a14b"))
    assert a["bytes_per_gather"] == b["bytes_per_gather"] and b["lora_reduce_scatter_bytes"] == 27 * a["lora_reduce_scatter_bytes"]
    path = _folder(tmp_path, "wan2.2-t2v-a14b")
    config = load_config("opd:tiny_wan22_t2v_mopd", [f"model.path={path}", f"output_dir={tmp_path}/run"])
    assert budget.budget_line(config, 1).startswith("[budget] wan2.2-t2v-a14b, 5 frames of 64 px")
    os.remove(os.path.join(path, "transformer_2", "config.json"))
    assert budget.budget_line(config, 1).startswith("[budget] wan2.1-t2v-14b, 5 frames of 64 px")


def test_validate_only_line_and_the_gpu_it_must_fit(tmp_path, monkeypatch):
    """The line names ddp and fsdp figures equal to round_memory at the config's geometry; a GPU
    smaller than the configured strategy needs is refused in one line naming what would fit."""
    path = _folder(tmp_path, "flux.2-dev")
    config = load_config("opd:tiny_flux2_mopd", [f"model.path={path}", f"output_dir={tmp_path}/run"])
    geo = geometry_of(config, "flux.2-dev")
    assert (geo.resolution, geo.images, geo.student_cfg, geo.weight_bytes) == (64, 2, False, 4)
    ddp, fsdp8 = round_memory("flux.2-dev", geo), round_memory("flux.2-dev", geo, "fsdp", 8)
    line = budget.budget_line(config, 1)
    assert line.startswith(f"[budget] flux.2-dev, 64 px, 2 rows per student forward: ddp {ddp['total_gb']} GB per GPU")
    assert f"x8 {fsdp8['total_gb']} GB" in line and "this run: ddp x1" in line
    config.distributed.gpu_memory_gb = (fsdp8["total_bytes"] + 1e9) / 1e9  # fits fsdp x8 only
    with pytest.raises(ConfigError, match=rf"^distributed.strategy: ddp over 1 GPU needs about {ddp['total_gb']} GB "
                                          rf"per GPU for flux.2-dev .* use distributed.strategy=fsdp over 8 GPUs"):
        budget.budget_line(config, 1, budget.gpu_memory_bytes(config))
    config.distributed.strategy = "fsdp"
    assert "this run: fsdp x8" in budget.budget_line(config, 8, budget.gpu_memory_bytes(config))
    config.distributed.text_encoders = "shard"  # the config's placement is what the line budgets
    sharded = round_memory("flux.2-dev", geo, "fsdp", 8, "shard")
    line = budget.budget_line(config, 8)
    assert f"x8 {sharded['total_gb']} GB" in line and "text encoders: shard" in line
    assert sharded["total_bytes"] < fsdp8["total_bytes"]
    assert budget.budget_line(load_config("opd:tiny_flux2_mopd", []), 1) is None  # a tiny model: nothing counted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config.distributed.gpu_memory_gb = 0.0
    assert budget.gpu_memory_bytes(config) is None  # no GPU here, none given: the check cannot refuse


def test_console_entry_refuses_a_gpu_too_small_in_one_line(tmp_path):
    """dopd-train --validate_only (the function pyproject.toml declares as that console script, as
    the installed script calls it) on a config pointing at a real architecture: exit 2, one line,
    before anything is printed or loaded."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, _, function = tomllib.load(f)["project"]["scripts"]["dopd-train"].partition(":")
    path = _folder(tmp_path, "wan2.1-t2v-1.3b")
    entry = f"import sys; from {module} import {function}; sys.exit({function}())"
    args = ["--config", "opd:tiny_wan_t2v_mopd", f"model.path={path}", f"output_dir={tmp_path}/run",
            "distributed.gpu_memory_gb=2", "--validate_only"]
    result = subprocess.run([sys.executable, "-c", entry, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "1"}, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: distributed.strategy: ddp over 1 GPU needs about ") and "for wan2.1-t2v-1.3b" in lines[0], lines
    assert "the GPU has 2.0 GB" in lines[0]
