"""Wan 2.1 text-to-video back end of :class:`~diffusion_opd.models.base.Policy` (diffusers' WanPipeline parts).

The same policy for video: the rollout state is the 5-D video latent (B, 16, F', H / 8, W / 8)
with ``F' = (num_frames - 1) / 4 + 1`` (the causal VAE keeps the first frame and compresses the
rest 4x); every per-step Gaussian kernel, loss and checkpoint is shape-agnostic, so frames are
just one more latent dimension. What differs from SD3, each as ``WanPipeline`` runs it:

* Text: UMT5's last hidden state of the cleaned prompt (ftfy + whitespace, the pipeline's own
  ``encode_prompt``), zero after the prompt's tokens up to ``max_sequence_length``, no mask and
  no pooled embedding.
* Guidance: CFG against the empty negative prompt (``guidance_scale``), one batched forward.
* Schedule: the folder's own scheduler's sigmas for N steps (the released folders ship UniPC
  with ``flow_shift`` 3.0 for 480p / 5.0 for 720p; FlowMatchEuler with ``shift`` works alike); the
  model timestep is the scheduler's own timestep at that sigma (UniPC: an integer). The rollout
  takes Euler / Euler-Maruyama steps on that grid (the per-step Gaussian kernels OPD needs),
  not UniPC's multistep corrector; with FlowMatchEuler it is exactly the pipeline's update.
* Decode: ``z = latents * latents_std + latents_mean`` (per channel) through the video VAE.

The frame count is a property of the policy (``num_frames``, ``sample.num_frames`` in a config):
``latent_shape(resolution)`` is (16, F', h, w). Wan 2.2's A14B folders (two experts switched at
``boundary_ratio``) and TI2V-5B (per-token timesteps) are refused in one line: not built here.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..errors import ConfigError
from .diffusers_policy import DiffusersPolicy
from .specs import check_num_frames

__all__ = ["WanPolicy", "refuse_unbuilt_wan"]


def refuse_unbuilt_wan(model_dir: str) -> None:
    """One line for the Wan folders this back end does not run (Wan 2.2 A14B's two experts, TI2V)."""
    with open(os.path.join(model_dir, "model_index.json")) as f:
        index = json.load(f)
    if (index.get("transformer_2") or [None])[-1] or index.get("boundary_ratio") is not None:
        raise ConfigError(f"model.path: {model_dir} is a Wan 2.2 A14B folder with two experts (transformer_2, "
                          f"boundary_ratio {index.get('boundary_ratio')}); the two-expert policy is not built: use a "
                          "Wan 2.1 T2V folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    if index.get("expand_timesteps"):
        raise ConfigError(f"model.path: {model_dir} is a Wan 2.2 TI2V folder (per-token timesteps, expand_timesteps); "
                          "not built: use a Wan 2.1 T2V folder")


class WanPolicy(DiffusersPolicy):
    """Student LoRA + frozen teachers on a Wan 2.1 video transformer (use ``models.build_policy``)."""

    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    embed_keys = ("prompt_embeds",)
    teacher_config_keys = ("in_channels", "out_channels", "patch_size", "text_dim", "num_attention_heads",
                           "attention_head_dim")

    def __init__(self, model_dir: str, *, num_frames: int = 81, **kwargs):
        refuse_unbuilt_wan(model_dir)
        super().__init__(model_dir, **kwargs)
        self.temporal_factor = int(self._vae_config.get("scale_factor_temporal") or 4)
        self.num_frames = check_num_frames(num_frames, self.temporal_factor)
        self.scheduler_shift = float(self.scheduler_config.get("flow_shift") or self.scheduler_config.get("shift", 1.0))

    def _encode_texts(self, pipe, texts):
        emb, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False,
                                    max_sequence_length=self.max_sequence_length, device=self.device)
        return (emb,)

    def sigmas(self, num_steps: int, resolution: int, shift: Optional[float] = None) -> torch.Tensor:
        """WanPipeline's sigmas: its scheduler after ``set_timesteps(N)`` (or with a static ``shift``)."""
        return self._scheduler_sigmas(num_steps, shift)

    def latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        """(16, (num_frames - 1) / 4 + 1, resolution / 8, resolution / 8)."""
        cfg = self.transformer.config
        step = self.vae_scale_factor * cfg.patch_size[-1]
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
        side = resolution // self.vae_scale_factor
        return (cfg.in_channels, (self.num_frames - 1) // self.temporal_factor + 1, side, side)

    def _forward(self, module, x, sigma, cond, guidance_scale):
        return module(hidden_states=x, timestep=self._scheduler_timesteps(sigma), encoder_hidden_states=cond["prompt_embeds"],
                      return_dict=False)[0]

    def _vae_decode(self, latents):
        vae = self._vae_model()
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        return vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Video latents -> "pil": one list of PIL frames per video; "pt": float (B, F, 3, H, W) in [0, 1]."""
        from diffusers.image_processor import VaeImageProcessor

        video = self._vae_decode(latents.to(self.device, self.dtype))
        b, _, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
        out = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(frames, output_type=output_type)
        if output_type == "pt":
            return out.reshape(b, f, 3, h, w)
        return [out[i * f:(i + 1) * f] for i in range(b)]
