"""Qwen-Image back end of :class:`~diffusion_opd.models.base.Policy` (diffusers' QwenImagePipeline parts).

What differs from SD3 (everything else is :class:`~diffusion_opd.models.diffusers_policy.DiffusersPolicy`),
each as ``QwenImagePipeline`` runs it:

* Text: Qwen2.5-VL's last hidden state over the pipeline's prompt template, the template's 34
  system-prefix tokens dropped (the pipeline's own ``encode_prompt``). Prompts have different
  lengths: each is zero-padded to ``max_sequence_length`` with a token mask
  (``prompt_embeds_mask``) that the transformer's joint attention applies, so padding does not
  change the image tokens (up to the order of fp32 sums).
* Latents: the VAE latent (16, H / 8, W / 8) is the rollout state (the pipeline draws its noise
  in that shape, as (B, 1, 16, h, w)); the transformer sees 2x2 patches as 64-channel tokens
  (FLUX's packing) with ``img_shapes`` for its 3-axis rotary positions.
* Guidance: no guidance embedding; ``guidance_scale`` is true CFG against the negative (empty)
  prompt, ``true_cfg_scale`` of the pipeline, INCLUDING its rescale: the guided velocity of each
  token is scaled back to the norm of the conditional one, ``comb * |v_c| / |comb|``.
* Schedule: ``linspace(1, 1 / N, N)`` through the scheduler with the dynamic shift
  ``mu = calculate_shift(tokens)`` (Qwen-Image: base 0.5 / max 0.9 over 256..8192 tokens, then
  shift_terminal 0.02), read from the folder's scheduler, the model timestep the sigma.
* Decode: ``z = latents * latents_std + latents_mean`` (per channel, the VAE config) through the
  causal 3-D VAE as a one-frame video.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .diffusers_policy import DiffusersPolicy
from .flux import FluxPolicy, pack_latents, unpack_latents

__all__ = ["QwenImagePolicy"]


class QwenImagePolicy(DiffusersPolicy):
    """Student LoRA + frozen teachers on a Qwen-Image transformer (use ``models.build_policy``)."""

    pipeline_class = "QwenImagePipeline"
    transformer_class = "QwenImageTransformer2DModel"
    vae_class = "AutoencoderKLQwenImage"
    embed_keys = ("prompt_embeds", "prompt_embeds_mask")
    teacher_config_keys = DiffusersPolicy.teacher_config_keys + ("axes_dims_rope",)

    def _encode_texts(self, pipe, texts):
        # encode_prompt's embedding and mask before it repeats them per image (and drops an all-ones mask)
        length = self.max_sequence_length
        emb, mask = pipe._get_qwen_prompt_embeds(texts, device=self.device)
        emb, mask = emb[:, :length], mask[:, :length]
        pad = length - emb.shape[1]
        return (torch.cat([emb, emb.new_zeros(emb.shape[0], pad, emb.shape[2])], 1),
                torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], 1))

    def sigmas(self, num_steps: int, resolution: int, shift: Optional[float] = None) -> torch.Tensor:
        """QwenImagePipeline's sigmas for ``resolution`` px: its scheduler after
        ``set_timesteps(sigmas=linspace(1, 1 / N, N), mu=calculate_shift(tokens))`` (or a static ``shift``)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        cfg = self.scheduler_config
        side = self.latent_shape(resolution)[1] // 2
        mu = calculate_shift(side * side, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        kwargs = dict(mu=mu) if cfg.get("use_dynamic_shifting") else {}
        return self._scheduler_sigmas(num_steps, shift, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **kwargs)

    latent_shape = FluxPolicy.latent_shape  # (16, H / 8, W / 8) split into 2x2 patches, as FLUX.1's

    def _forward(self, module, x, sigma, cond, guidance_scale):
        b, _, h, w = x.shape
        out = module(hidden_states=pack_latents(x), timestep=self._scheduler_timesteps(sigma).to(x.dtype) / 1000,
                     encoder_hidden_states=cond["prompt_embeds"],
                     encoder_hidden_states_mask=cond["prompt_embeds_mask"].to(torch.long),
                     img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def _guided(self, v_u, v_c, scale):
        """QwenImagePipeline's true CFG: ``comb = v_u + g (v_c - v_u)``, each packed token rescaled
        to the conditional velocity's norm (``comb * |v_c| / |comb|`` over its 64 channels)."""
        h, w = v_c.shape[-2:]
        u, c = pack_latents(v_u.float()), pack_latents(v_c.float())
        comb = u + scale * (c - u)
        return unpack_latents(comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)), h, w)

    def _vae_decode(self, latents):
        vae = self._vae_model()
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        z = latents / (1.0 / std) + mean  # the pipeline's expression (divide by the inverse std)
        return vae.decode(z.unsqueeze(2), return_dict=False)[0][:, :, 0]
