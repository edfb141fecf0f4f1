"""The real-size architectures (public configs, no weights) built on the ``meta`` device: what
the benchmark's expected FLOPs and the round-memory budget (``diffusion_opd/memory.py``) count.

Nothing here allocates memory or downloads anything: a meta tensor has a shape and a dtype only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

from .specs import DEFAULT_LORA_TARGETS
from .tiny import sd35_medium_transformer_config

__all__ = ["Architecture", "ARCHITECTURES", "flux1_dev_transformer_config", "sd35_large_transformer_config",
           "meta_student", "meta_inputs"]


def flux1_dev_transformer_config() -> dict:
    """The transformer config of black-forest-labs/FLUX.1-dev (11.9 B parameters)."""
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def sd35_large_transformer_config() -> dict:
    """The transformer config of stabilityai/stable-diffusion-3.5-large (8.1 B parameters)."""
    return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")


def _t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel, T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                    feed_forward_proj="gated-gelu")


def _clip(width: int, layers: int, heads: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls, CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                               num_attention_heads=heads, projection_dim=width)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL, dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                               layers_per_block=2, latent_channels=16)


@dataclass(frozen=True)
class Architecture:
    """One real model: its transformer and the parts around it, and how a round calls it."""

    family: str  # "sd3" | "flux"
    transformer_class: str
    transformer_config: Callable[[], dict]
    text_tokens: int  # prompt_embeds length in the recipe (SD3: 77 CLIP + T5 tokens; FLUX: T5 tokens)
    cfg: bool  # the student's guidance is CFG (two rows per image) rather than an embedding
    text_encoders: Callable[[], list] = field(default=lambda: [])  # (class, config) pairs


ARCHITECTURES = {
    "sd3.5-medium": Architecture("sd3", "SD3Transformer2DModel", sd35_medium_transformer_config, 77 + 256, True,
                                 lambda: [_t5_xxl(), _clip(768, 12, 12, True), _clip(1280, 32, 20, True)]),
    "sd3.5-large": Architecture("sd3", "SD3Transformer2DModel", sd35_large_transformer_config, 77 + 256, True,
                                lambda: [_t5_xxl(), _clip(768, 12, 12, True), _clip(1280, 32, 20, True)]),
    "flux.1-dev": Architecture("flux", "FluxTransformer2DModel", flux1_dev_transformer_config, 512, False,
                               lambda: [_t5_xxl(), _clip(768, 12, 12, False)]),
}


@lru_cache(maxsize=2)
def meta_student(name: str, rank: int, dtype=torch.bfloat16) -> torch.nn.Module:
    """The transformer of ``name`` on the meta device, frozen, with a trainable student LoRA of
    ``rank`` (alpha 2 rank) on the family's default targets (cached: building FLUX.1-dev's 57
    blocks takes ~10 s of CPU even without memory)."""
    import diffusers
    from peft import LoraConfig

    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        model = getattr(diffusers, arch.transformer_class)(**arch.transformer_config()).to(dtype)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_LORA_TARGETS[arch.family])),
                          adapter_name="student")
    for n, p in model.named_parameters():
        p.requires_grad_(".student." in n)
        if p.requires_grad:
            p.data = p.data.float()  # the policy trains the LoRA in fp32
    return model


def meta_inputs(name: str, rows: int, resolution: int, dtype=torch.bfloat16) -> dict:
    """Keyword arguments of one transformer forward over ``rows`` images of ``resolution`` px,
    shaped as the policy builds them (FLUX: packed 2x2 tokens, position ids, guidance)."""
    arch = ARCHITECTURES[name]
    cfg = arch.transformer_config()
    side = resolution // 8

    def z(*shape):
        return torch.zeros(*shape, device="meta", dtype=dtype)

    text = z(rows, arch.text_tokens, cfg["joint_attention_dim"])
    if arch.family == "flux":
        tokens = (side // 2) ** 2
        return dict(hidden_states=z(rows, tokens, cfg["in_channels"]), timestep=z(rows), guidance=z(rows).float(),
                    pooled_projections=z(rows, cfg["pooled_projection_dim"]), encoder_hidden_states=text,
                    txt_ids=z(arch.text_tokens, 3), img_ids=z(tokens, 3), return_dict=False)
    return dict(hidden_states=z(rows, cfg["in_channels"], side, side), timestep=z(rows),
                encoder_hidden_states=text, pooled_projections=z(rows, cfg["pooled_projection_dim"]),
                return_dict=False)
