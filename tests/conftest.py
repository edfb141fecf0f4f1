"""Shared fixtures: a tiny random SD3 pipeline folder and random teacher adapters for it.

Built once per test session in a temporary folder (about a second), offline. Other test files
reuse them:

- ``tiny_sd3_dir``: path of a complete StableDiffusion3Pipeline folder
  (:func:`diffusion_opd.models.tiny.build_tiny_sd3`, seed 0; 64 px images -> 16x8x8 latents).
- ``tiny_teacher_dirs``: ``{"peft": dir, "diffusers": dir}``, two different random teacher
  LoRAs for it, one per on-disk format (:func:`~diffusion_opd.models.tiny.write_random_teacher_lora`).
- ``tiny_flux_dir`` / ``tiny_flux_teacher_dirs``: the same for a tiny random FluxPipeline.
- ``tiny_family``: parametrised over the model families ("sd3", "flux"): a :class:`TinyFamily`
  with the folder, its teachers and how the family's own pipeline calls its transformer, so
  one test states a contract for every family.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Nothing in the test suite may reach the Hub (set before huggingface_hub reads it at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _teacher_dirs(pipeline_dir: str, root) -> dict:
    """Random teacher LoRA folders for a tiny pipeline, in both formats: {"peft": ..., "diffusers": ...}."""
    from diffusion_opd.models.tiny import write_random_teacher_lora

    return {
        fmt: write_random_teacher_lora(pipeline_dir, str(root / fmt), seed=seed, fmt=fmt)
        for seed, fmt in enumerate(("peft", "diffusers"), start=1)
    }


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> str:
    """A random tiny SD3 pipeline folder (every component of the real pipeline)."""
    from diffusion_opd.models.tiny import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dirs(tiny_sd3_dir, tmp_path_factory) -> dict:
    return _teacher_dirs(tiny_sd3_dir, tmp_path_factory.mktemp("tiny_teachers"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    """A random tiny FLUX.1 pipeline folder (CLIP + T5, guidance embedding, dynamic shift)."""
    from diffusion_opd.models.tiny import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")), seed=0)


@pytest.fixture(scope="session")
def tiny_flux_teacher_dirs(tiny_flux_dir, tmp_path_factory) -> dict:
    return _teacher_dirs(tiny_flux_dir, tmp_path_factory.mktemp("tiny_flux_teachers"))


@dataclass
class TinyFamily:
    """One model family's tiny pipeline and the facts a shared test needs about it."""

    name: str
    dir: str
    teachers: dict
    pipeline: str  # diffusers pipeline class name
    t5: str  # the pipeline attribute holding the T5 encoder
    guidance: float  # a guidance scale at which velocity() is ONE forward (no CFG branch)
    dead_lora_matrices: int  # student LoRA matrices that get no gradient (outputs unused)

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def no_text_kwargs(self) -> dict:
        """from_pretrained kwargs that skip the text encoders and the VAE."""
        names = ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if self.name == "sd3" else ())
        return {n: None for n in names + ("vae",)}

    def reference_encode(self, pipe, prompts, max_sequence_length):
        """(prompt_embeds, pooled) exactly as the family's pipeline computes them."""
        if self.name == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=max_sequence_length)
            return emb, pooled
        emb, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=max_sequence_length)
        return emb, pooled

    def reference_forward(self, transformer, x, sigma: float, cond: dict, guidance: float):
        """The transformer called the way the family's pipeline calls it (SD3: timestep 1000 sigma;
        FLUX: diffusers' own packing and position ids, timestep sigma, guidance embedding)."""
        b = x.shape[0]
        if self.name == "sd3":
            return transformer(hidden_states=x, timestep=torch.full((b,), 1000.0 * sigma),
                               encoder_hidden_states=cond["prompt_embeds"],
                               pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        from diffusers import FluxPipeline

        _, c, h, w = x.shape
        text = cond["prompt_embeds"]
        out = transformer(
            hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=torch.full((b,), sigma),
            guidance=torch.full((b,), guidance) if transformer.config.guidance_embeds else None,
            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3), img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
            return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


@pytest.fixture(scope="session", params=["sd3", "flux"])
def tiny_family(request) -> TinyFamily:
    """The tiny pipeline of each model family in turn (shared, built once per session)."""
    if request.param == "sd3":
        return TinyFamily("sd3", request.getfixturevalue("tiny_sd3_dir"), request.getfixturevalue("tiny_teacher_dirs"),
                          "StableDiffusion3Pipeline", "text_encoder_3", guidance=1.0, dead_lora_matrices=2)
    return TinyFamily("flux", request.getfixturevalue("tiny_flux_dir"),
                      request.getfixturevalue("tiny_flux_teacher_dirs"), "FluxPipeline", "text_encoder_2",
                      guidance=3.5, dead_lora_matrices=0)
