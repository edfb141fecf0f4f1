"""FLUX.2 back end of :class:`~diffusion_opd.models.base.Policy` (diffusers' Flux2Pipeline parts).

What differs from SD3 (everything else is :class:`~diffusion_opd.models.diffusers_policy.DiffusersPolicy`),
each as ``Flux2Pipeline`` runs it:

* Text: the Mistral3 text encoder through its processor's chat template with the pipeline's
  system message, hidden layers 10, 20 and 30 stacked per token (the pipeline's own
  ``encode_prompt``), padded to ``max_sequence_length``; no pooled embedding. Text positions are
  (0, 0, 0, token).
* Latents: the rollout state is the patchified latent (128, H / 16, W / 16) the pipeline draws its
  noise in (2x2 patches of the 32-channel VAE latent); the transformer sees each position as one
  token (row-major) with (0, row, column, 0) position ids.
* Guidance: FLUX.2-dev is guidance-distilled: ``guidance_scale`` feeds the guidance embedding
  (one forward); ``guidance="true_cfg"`` runs real CFG against the empty prompt instead.
* Schedule: ``linspace(1, 1 / N, N)`` through the scheduler with FLUX.2's empirical shift
  ``mu = compute_empirical_mu(tokens, N)`` (it depends on the step count too); timestep = sigma.
* Decode: the VAE's batch-norm statistics undo the latent normalisation
  (``z * sqrt(running_var + eps) + running_mean``), then unpatchify to (32, H / 8, W / 8).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .diffusers_policy import DiffusersPolicy
from .flux import FluxPolicy

__all__ = ["Flux2Policy"]


class _LegacyProcessorKwargs(logging.Filter):
    """Drop transformers' warning that Flux2Pipeline.encode_prompt passes ``padding`` /
    ``max_length`` to ``apply_chat_template`` as plain keyword arguments: transformers folds them
    into ``processor_kwargs`` itself (same tokens), but warns at every encode call, dozens of lines
    in a run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "have to be in `processor_kwargs`" not in record.getMessage()


logging.getLogger("transformers.processing_utils").addFilter(_LegacyProcessorKwargs())


class Flux2Policy(DiffusersPolicy):
    """Student LoRA + frozen teachers on a FLUX.2 transformer (use ``models.build_policy``)."""

    pipeline_class = "Flux2Pipeline"
    transformer_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    embed_keys = ("prompt_embeds",)
    teacher_config_keys = DiffusersPolicy.teacher_config_keys + ("guidance_embeds", "axes_dims_rope")

    def __init__(self, model_dir: str, **kwargs):
        super().__init__(model_dir, **kwargs)
        self._ids: dict[tuple, torch.Tensor] = {}

    def _encode_texts(self, pipe, texts):
        emb, _ = pipe.encode_prompt(texts, device=self.device, max_sequence_length=self.max_sequence_length)
        return (emb,)

    def sigmas(self, num_steps: int, resolution: int, shift: Optional[float] = None) -> torch.Tensor:
        """Flux2Pipeline's sigmas: its scheduler after ``set_timesteps(sigmas=linspace(1, 1 / N, N),
        mu=compute_empirical_mu(tokens, N))`` (or a static ``shift``)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        _, h, w = self.latent_shape(resolution)
        return self._scheduler_sigmas(num_steps, shift, sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                      mu=compute_empirical_mu(h * w, num_steps))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(128, resolution / 16, resolution / 16): the patchified latent."""
        step = self.vae_scale_factor * 2
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
        return (self.transformer.config.in_channels, resolution // step, resolution // step)

    def _position_ids(self, kind: str, b: int, *size: int) -> torch.Tensor:
        """(b, n, 4) ids: image tokens (0, row, column, 0), text tokens (0, 0, 0, index); cached."""
        key = (kind, b, *size)
        if key not in self._ids:
            zero = torch.arange(1)
            axes = (zero, torch.arange(size[0]), torch.arange(size[1]), zero) if kind == "image" else \
                (zero, zero, zero, torch.arange(size[0]))
            self._ids[key] = torch.cartesian_prod(*axes).unsqueeze(0).expand(b, -1, -1).to(self.device)
        return self._ids[key]

    _guidance = FluxPolicy._guidance  # the guidance embedding's input, as FLUX.1's

    def _forward(self, module, x, sigma, cond, guidance_scale):
        b, c, h, w = x.shape
        text = cond["prompt_embeds"]
        guidance = self._guidance(b, guidance_scale)
        out = module(hidden_states=x.reshape(b, c, h * w).permute(0, 2, 1),
                     timestep=self._scheduler_timesteps(sigma).to(x.dtype) / 1000, guidance=guidance,
                     encoder_hidden_states=text, txt_ids=self._position_ids("text", b, text.shape[1]),
                     img_ids=self._position_ids("image", b, h, w), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    def _vae_decode(self, latents):
        from diffusers import Flux2Pipeline

        vae = self._vae_model()
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                               latents.dtype)
        return vae.decode(Flux2Pipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]
