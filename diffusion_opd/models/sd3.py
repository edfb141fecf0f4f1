"""SD3 / SD3.5 back end of :class:`~diffusion_opd.models.base.Policy` (diffusers pipeline parts).

Everything but the four family-specific pieces lives in
:class:`~diffusion_opd.models.diffusers_policy.DiffusersPolicy`: three text encoders (two CLIP +
T5), a transformer called with the timestep ``1000 * sigma``, CFG as an uncond branch, latents of
(16, H / 8, W / 8), and SD3's static schedule shift. SD3.5-Medium and SD3.5-Large use this class.
"""
from __future__ import annotations

import warnings

from .diffusers_policy import DiffusersPolicy

__all__ = ["SD3Policy"]


class SD3Policy(DiffusersPolicy):
    """Student LoRA + frozen teachers on an SD3 transformer (use ``models.build_policy``)."""

    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"

    def __init__(self, model_dir: str, **kwargs):
        super().__init__(model_dir, **kwargs)
        if self.scheduler_config.get("use_dynamic_shifting"):  # rollouts use the static SD3 shift
            warnings.warn(f"{model_dir}: the scheduler uses dynamic shifting; rollouts use the static shift "
                          f"{self.scheduler_shift} instead (pass shift= to rollout to choose another)")

    def _encode_texts(self, pipe, texts):
        emb, _, pooled, _ = pipe.encode_prompt(texts, None, None, device=self.device, do_classifier_free_guidance=False,
                                               max_sequence_length=self.max_sequence_length)
        return emb, pooled

    def _forward(self, module, x, sigma, cond, guidance_scale):
        return module(hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=cond["prompt_embeds"],
                      pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(16, resolution / 8, resolution / 8) for SD3; checks the size fits the transformer."""
        cfg = self.transformer.config
        step = self.vae_scale_factor * cfg.patch_size
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
        side = resolution // self.vae_scale_factor
        if side // cfg.patch_size > cfg.pos_embed_max_size:
            raise ValueError(f"resolution {resolution} exceeds the transformer's maximum "
                             f"{cfg.pos_embed_max_size * step}")
        return (cfg.in_channels, side, side)
