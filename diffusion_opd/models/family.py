"""Which back end a pipeline folder needs, decided in ONE place: the diffusers pipeline class
named in its ``model_index.json`` (``_class_name``). The trainer, the evaluation CLI and the
benchmark all build their policy through :func:`build_policy`.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from .hub import ModelNotFoundError, resolve_adapter, resolve_pipeline_dir
from .lora import LoraAdapter, read_lora_adapter
from ..dtypes import parse_dtype
from .specs import FAMILIES, GUIDANCE_MODES, VIDEO_FAMILIES, parse_lora, parse_teachers

__all__ = ["pipeline_family", "policy_class", "build_policy"]


def pipeline_family(model_dir: str) -> str:
    """The family ("sd3", "flux", "qwen_image", "flux2", "wan", "toy") of a local pipeline folder, from ``model_index.json``'s ``_class_name``."""
    index = os.path.join(model_dir, "model_index.json")
    try:
        with open(index) as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{index}: cannot read the pipeline's model_index.json ({e})") from e
    if class_name not in FAMILIES:
        valid = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        raise ConfigError(f"{index}: _class_name {class_name!r} is not a supported pipeline; supported: {valid}")
    return FAMILIES[class_name]


def policy_class(family: str):
    """The :class:`~diffusion_opd.models.base.Policy` subclass of ``family``."""
    if family == "toy":
        from .toy import ToyPolicy

        return ToyPolicy
    if family == "flux":
        from .flux import FluxPolicy

        return FluxPolicy
    if family == "qwen_image":
        from .qwen_image import QwenImagePolicy

        return QwenImagePolicy
    if family == "flux2":
        from .flux2 import Flux2Policy

        return Flux2Policy
    if family == "wan":
        from .wan import WanPolicy

        return WanPolicy
    from .sd3 import SD3Policy

    return SD3Policy


def build_policy(
    model_path: str,
    *,
    revision: Optional[str] = None,
    dtype="fp32",
    device="cpu",
    lora: Optional[dict] = None,
    teachers: Sequence[dict] = (),
    gradient_checkpointing: bool = False,
    max_sequence_length: int = 128,
    max_cached_prompts: Optional[int] = None,
    offload_text_encoders: bool = False,
    guidance: str = "auto",
    embedded_guidance: float = 1.0,
    student_init: Optional[dict | LoraAdapter] = None,
    merge_teachers: bool = False,
    num_frames: Optional[int] = None,
    guidance_scale_2: Optional[float] = None,
):
    """Build the policy of the pipeline at ``model_path`` (Hub id or local folder) of any family
    in ``specs.FAMILIES``.

    Every argument is validated before any weight is read: dtype ("fp32"/"fp16"/"bf16"), the
    LoRA dict (rank, alpha, init, target_modules; defaults r 32, alpha 64, the family's targets
    from ``specs.DEFAULT_LORA_TARGETS``), the teacher dicts (name, path, subfolder, weight_name,
    kind "lora"/"transformer", revision; names unique and not "student"/"base").
    ``max_cached_prompts`` bounds the prompt-embedding cache (LRU; default unbounded: about 1.3 MB
    per prompt for SD3.5 in fp16). ``offload_text_encoders``: move the text encoders back to the
    CPU after every encoding call (saves ~11 GB of GPU memory for SD3.5, ~9.5 GB for FLUX's T5,
    costs two host<->device copies of them per call).

    ``guidance``: what ``velocity``'s ``guidance_scale`` drives. "auto": the guidance embedding
    when the transformer has one (FLUX.1-dev is guidance-distilled: one forward, no uncond
    branch), classifier-free guidance otherwise (SD3). "true_cfg": classifier-free guidance with
    the empty prompt as the negative (FluxPipeline's ``true_cfg_scale``); a guidance-distilled
    model's embedding then gets ``embedded_guidance``. "embedded": demand the embedding.

    ``student_init`` ({path, subfolder, revision, weight_name}: a LoRA folder or Hub repo, PEFT
    or diffusers format; or a :class:`LoraAdapter` already read): the student starts as exactly
    that adapter (its rank, alpha, targets and weights; ``lora`` is then ignored).

    ``merge_teachers``: the teacher fast path, each LoRA teacher merged into its own frozen copy
    of the backbone (no LoRA work in teacher forwards; one backbone of memory per teacher, printed
    when they are built).

    ``num_frames``: frames per video of a video family (Wan: 1 + a multiple of 4; default 81, the
    pipeline's); refused for an image family. ``guidance_scale_2``: Wan 2.2 A14B's low-noise expert's
    CFG scale (WanPipeline's ``guidance_scale_2``; None = the call's scale, its default); refused
    for a model with one transformer.
    """
    torch_dtype = parse_dtype(dtype)
    parse_lora(lora)  # option errors first; the family's default targets are filled in below
    specs = parse_teachers(teachers)
    if not isinstance(model_path, str) or not model_path:
        raise ValueError(f"model_path must be a Hub id or a local folder, got {model_path!r}")
    if not 1 <= int(max_sequence_length) <= 512:
        raise ValueError(f"max_sequence_length must be in [1, 512] (T5's limit), got {max_sequence_length}")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {list(GUIDANCE_MODES)}, got {guidance!r}")
    if not isinstance(embedded_guidance, (int, float)) or embedded_guidance < 0:
        raise ValueError(f"embedded_guidance must be a number >= 0, got {embedded_guidance!r}")
    init = read_student_init(student_init) if isinstance(student_init, dict) else student_init  # before the backbone
    model_dir = resolve_pipeline_dir(model_path, revision)
    family = pipeline_family(model_dir)
    video = {}
    if guidance_scale_2 is not None and family != "wan":
        raise ConfigError(f"model.guidance_scale_2: {guidance_scale_2} but {model_dir} is a {family} model; it is the "
                          "low-noise expert's CFG scale of Wan 2.2 A14B: leave it 0 (unset)")
    if family in VIDEO_FAMILIES:
        video = {} if num_frames is None else {"num_frames": num_frames}
        if guidance_scale_2 is not None:
            video["guidance_scale_2"] = float(guidance_scale_2)
    elif num_frames not in (None, 0, 1):
        raise ConfigError(f"sample.num_frames: {num_frames} frames but {model_dir} is an image model ({family}); "
                          "set it to 0 or use a video pipeline (Wan)")
    return policy_class(family)(
        model_dir, dtype=torch_dtype, device=torch.device(device), lora=parse_lora(lora, family), teachers=specs,
        gradient_checkpointing=gradient_checkpointing, max_sequence_length=int(max_sequence_length),
        max_cached_prompts=max_cached_prompts, offload_text_encoders=offload_text_encoders, guidance=guidance,
        embedded_guidance=float(embedded_guidance), student_init=init,
        merge_teachers=bool(merge_teachers), **video)


def read_student_init(spec: dict) -> LoraAdapter:
    """The adapter a student starts from: ``{path, subfolder, revision, weight_name}``."""
    unknown = sorted(set(spec) - {"path", "subfolder", "revision", "weight_name"})
    if unknown or not spec.get("path"):
        raise ValueError(f"student_init needs 'path' (+ optional subfolder, revision, weight_name), got {spec}")
    folder = resolve_adapter(spec["path"], subfolder=spec.get("subfolder") or None,
                             revision=spec.get("revision") or None, weight_name=spec.get("weight_name") or None,
                             what="model.student_init")
    return read_lora_adapter(folder, spec.get("weight_name") or None)
