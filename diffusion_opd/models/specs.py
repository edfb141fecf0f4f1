"""Validation of the policy's build arguments (dtype, student LoRA, teachers), done before any
weight is read so that a typo fails in milliseconds, not after minutes of loading."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


from .base import BASE, STUDENT

__all__ = ["FAMILIES", "DEFAULT_LORA", "DEFAULT_LORA_TARGETS", "GUIDANCE_MODES", "VIDEO_FAMILIES", "check_num_frames", "TeacherSpec", "parse_lora",
           "parse_teachers"]


# Model families: the diffusers pipeline class named in a folder's model_index.json -> family.
FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "QwenImagePipeline": "qwen_image",
            "Flux2Pipeline": "flux2", "WanPipeline": "wan", "ToyFlowPipeline": "toy"}
VIDEO_FAMILIES = ("wan",)  # rollout latents carry frames: (C, F', H, W)

VIDEO_TEMPORAL_FACTOR = 4  # Wan's causal video VAE: the first frame, then 4 frames per latent frame


def check_num_frames(num_frames, temporal: int = VIDEO_TEMPORAL_FACTOR, key: str = "sample.num_frames") -> int:
    """``num_frames`` if a causal video VAE can encode it (1 + a multiple of ``temporal``), else a
    one-line :class:`~diffusion_opd.errors.ConfigError` naming ``key`` (the config key, or the
    evaluation CLI's ``--num_frames``)."""
    from ..errors import ConfigError

    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % temporal:
        near = max(1, (num_frames - 1) // temporal * temporal + 1) if isinstance(num_frames, int) else 81
        raise ConfigError(f"{key}: {num_frames!r} frames cannot be encoded by the video VAE (it keeps the "
                          f"first frame and compresses the rest {temporal}x): use 1 + a multiple of {temporal}, "
                          f"e.g. {near}")
    return num_frames


# What a policy's guidance_scale drives (see models.build_policy).
GUIDANCE_MODES = ("auto", "embedded", "true_cfg")

# The joint-attention projections (image stream q/k/v/out, text stream add_q/k/v + to_add_out).
_ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
# Default student LoRA targets per family (peft suffix match on module names), the one source of
# truth for configs, the policy and config checks.
# sd3: DiffusionNFT / DiffusionOPD's set: every projection of every joint-attention block.
# flux: the same names; in FLUX.1 they adapt all 8 projections of the 19 double-stream blocks and
#   to_q / to_k / to_v of the 38 single-stream blocks (whose attention has no output projection:
#   proj_out / proj_mlp are block-level and not adapted), the attention-only LoRA that Flow-GRPO
#   and diffusers' FLUX LoRA examples train.
# qwen_image: the same 8 projections of each of its 60 dual-stream blocks (the attention LoRA of
#   diffusers' Qwen-Image examples; the MLPs and modulations stay frozen).
# flux2: the 8 projections of the double-stream blocks plus the single-stream blocks' fused
#   q/k/v + MLP input projection (attn.to_qkv_mlp_proj; their output projection shares the name
#   attn.to_out with the double blocks' ModuleList, so it is not targeted).
# wan: q / k / v / out of self- and cross-attention (attn1, attn2) of every block, the targets of
#   diffusers' Wan LoRA examples.
# toy: every Linear of the demo's MLP denoiser (models/toy.py), text and time conditioning included.
DEFAULT_LORA_TARGETS = {"sd3": _ATTENTION, "flux": _ATTENTION, "qwen_image": _ATTENTION,
                        "flux2": _ATTENTION + ("attn.to_qkv_mlp_proj",), "wan": ("to_q", "to_k", "to_v", "to_out.0"),
                        "toy": ("cond_proj", "in_proj", "mod", "fc1", "fc2", "out_proj")}

# DiffusionNFT / DiffusionOPD student LoRA: r 32, alpha 64 on the joint-attention projections.
DEFAULT_LORA = dict(rank=32, alpha=64, init="gaussian", target_modules=DEFAULT_LORA_TARGETS["sd3"])
# Inits that leave the base weights untouched (pissa / olora / loftq rewrite them, which would
# silently change every teacher sharing the backbone).
LORA_INITS = (True, False, "gaussian")
LORA_INIT_WORDS = {"true": True, "false": False}  # lora.init typed on the command line (a string key)
TEACHER_KINDS = ("lora", "transformer")


@dataclass(frozen=True)
class TeacherSpec:
    """Where one frozen teacher comes from (see :func:`parse_teachers`)."""

    name: str
    path: str
    subfolder: Optional[str] = None
    weight_name: Optional[str] = None
    kind: str = "lora"
    revision: Optional[str] = None


def parse_lora(lora: Optional[dict], family: str = "sd3") -> dict:
    """Student LoRA settings merged over :data:`DEFAULT_LORA` (targets: the family's default), checked."""
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(DEFAULT_LORA))
    if unknown:
        raise ValueError(f"unknown student LoRA option(s) {unknown}; valid: {list(DEFAULT_LORA)}")
    cfg = {**DEFAULT_LORA, "target_modules": DEFAULT_LORA_TARGETS[family], **lora}
    if not isinstance(cfg["rank"], int) or cfg["rank"] < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {cfg['rank']!r}")
    if not isinstance(cfg["alpha"], (int, float)) or cfg["alpha"] <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {cfg['alpha']!r}")
    if cfg["init"] not in LORA_INITS:
        raise ValueError(f"LoRA init must be one of {list(LORA_INITS)}, got {cfg['init']!r}")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"LoRA target_modules must be a non-empty list of module names, got {targets!r}")
    cfg["target_modules"] = tuple(targets)
    return cfg


def parse_teachers(teachers: Sequence[dict]) -> list[TeacherSpec]:
    """Teacher dicts -> :class:`TeacherSpec` list; unique names, never "student" / "base"."""
    fields = list(TeacherSpec.__dataclass_fields__)
    specs, seen = [], set()
    for i, t in enumerate(teachers or ()):
        if isinstance(t, TeacherSpec):
            t = {f: getattr(t, f) for f in fields}
        if not isinstance(t, dict):
            raise TypeError(f"teacher #{i} must be a dict with keys {fields}, got {type(t).__name__}")
        unknown = sorted(set(t) - set(fields))
        if unknown:
            raise ValueError(f"teacher #{i}: unknown key(s) {unknown}; valid: {fields}")
        name = t.get("name")
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"teacher #{i}: 'name' must be a non-empty string without dots, got {name!r}")
        if name in (STUDENT, BASE):
            raise ValueError(f"teacher name {name!r} is reserved ({STUDENT!r} and {BASE!r} are built in)")
        if name in seen:
            raise ValueError(f"duplicate teacher name {name!r}")
        seen.add(name)
        if not isinstance(t.get("path"), str) or not t["path"]:
            raise ValueError(f"teacher {name!r}: 'path' (a local folder or a Hub repo id) is required")
        kind = t.get("kind") or "lora"
        if kind not in TEACHER_KINDS:
            raise ValueError(f"teacher {name!r}: unknown kind {kind!r}; valid: {list(TEACHER_KINDS)}")
        specs.append(TeacherSpec(**{**t, "kind": kind}))
    return specs
