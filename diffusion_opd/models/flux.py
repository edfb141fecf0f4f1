"""FLUX.1 back end of :class:`~diffusion_opd.models.base.Policy` (diffusers' FluxPipeline parts).

What differs from SD3 (everything else is :class:`~diffusion_opd.models.diffusers_policy.DiffusersPolicy`):

* Latents are packed: the transformer sees 2x2 patches of the (16, H / 8, W / 8) VAE latent as
  tokens of 64 channels, ``(B, (H / 16) (W / 16), 64)``, with (0, row, column) position ids for
  its rotary embedding. The rollout keeps the unpacked (16, H / 8, W / 8) latent (the shape the
  pipeline draws its noise in); packing is a permutation, so every per-step Gaussian kernel and
  loss is the same in either layout.
* Guidance: FLUX.1-dev is guidance-distilled; ``guidance_scale`` goes to the guidance embedding
  (one forward, no uncond branch). ``guidance="true_cfg"`` runs real classifier-free guidance
  against the empty prompt instead (the pipeline's ``true_cfg_scale``), the embedding then fixed
  at ``embedded_guidance``.
* Text: CLIP (pooled, 768) + T5 (sequence, 4096), cached per prompt like SD3.
* Schedule: sigmas ``linspace(1, 1 / N, N)`` shifted by the resolution-dependent ``e^mu``
  (:func:`~diffusion_opd.sampling.flux_sigmas`).
* The model timestep is ``sigma`` itself (the transformer multiplies by 1000 inside).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..sampling import flux_sigmas
from .diffusers_policy import DiffusersPolicy

__all__ = ["FluxPolicy", "pack_latents", "unpack_latents"]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H / 2) (W / 2), 4 C): each 2x2 patch becomes one token, channels
    ordered (c, dy, dx), tokens row-major (FluxPipeline's layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a (B, C, h, w) latent."""
    b, n, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


class FluxPolicy(DiffusersPolicy):
    """Student LoRA + frozen teachers on a FLUX.1 transformer (use ``models.build_policy``)."""

    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    teacher_config_keys = DiffusersPolicy.teacher_config_keys + ("guidance_embeds", "axes_dims_rope")

    def __init__(self, model_dir: str, **kwargs):
        super().__init__(model_dir, **kwargs)
        cfg = self.scheduler_config
        if cfg.get("time_shift_type", "exponential") != "exponential" or cfg.get("shift_terminal") \
                or cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas"):
            warnings.warn(f"{model_dir}: the scheduler config asks for a sigma transform FLUX.1 does not use; "
                          "rollouts use FLUX.1's (exponential dynamic shift only)")
        self._image_ids: dict[tuple[int, int], torch.Tensor] = {}

    def sigmas(self, num_steps: int, resolution: int, shift: Optional[float] = None) -> torch.Tensor:
        """FluxPipeline's sigmas for ``resolution`` px: the dynamic shift ``e^mu`` of the image's
        ``(resolution / 16)^2`` tokens (scheduler config's base/max shift and sequence lengths),
        or the static ``shift`` when given (or when the scheduler has no dynamic shifting)."""
        cfg = self.scheduler_config
        if shift is None and not cfg.get("use_dynamic_shifting"):
            shift = self.scheduler_shift
        if shift is not None:
            return flux_sigmas(num_steps, shift=shift)
        side = self.latent_shape(resolution)[1] // 2
        return flux_sigmas(num_steps, side * side, base_seq_len=cfg.get("base_image_seq_len", 256),
                           max_seq_len=cfg.get("max_image_seq_len", 4096), base_shift=cfg.get("base_shift", 0.5),
                           max_shift=cfg.get("max_shift", 1.15))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(16, resolution / 8, resolution / 8); the side must split into 2x2 patches."""
        step = self.vae_scale_factor * 2
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
        side = resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels // 4, side, side)

    def _encode_texts(self, pipe, texts):
        emb, pooled, _ = pipe.encode_prompt(texts, None, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return emb, pooled

    def _position_ids(self, h: int, w: int) -> torch.Tensor:
        """(h/2 * w/2, 3) ids (0, row, column) of the packed image tokens (cached per size)."""
        if (h, w) not in self._image_ids:
            rows = torch.arange(h // 2).repeat_interleave(w // 2)
            cols = torch.arange(w // 2).repeat(h // 2)
            ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
            self._image_ids[(h, w)] = ids.to(self.device, self.dtype)
        return self._image_ids[(h, w)]

    def _guidance(self, b: int, guidance_scale: float) -> Optional[torch.Tensor]:
        """The (b,) guidance-embedding input: ``guidance_scale`` when it drives the embedding,
        ``embedded_guidance`` under true CFG; None for a transformer without the embedding."""
        if not self.transformer.config.guidance_embeds:
            return None
        value = guidance_scale if self.guidance_mode == "embedded" else self.embedded_guidance
        return torch.full((b,), float(value), device=self.device, dtype=torch.float32)

    def _forward(self, module, x, sigma, cond, guidance_scale):
        b, _, h, w = x.shape
        text = cond["prompt_embeds"]
        guidance = self._guidance(b, guidance_scale)
        out = module(hidden_states=pack_latents(x), timestep=sigma.to(x.dtype), guidance=guidance,
                     pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=text,
                     txt_ids=torch.zeros(text.shape[1], 3, device=self.device, dtype=self.dtype),
                     img_ids=self._position_ids(h, w), return_dict=False)[0]
        return unpack_latents(out, h, w)
