"""The real-size architectures (public configs, no weights) built on the ``meta`` device: what
the benchmark's expected FLOPs and the round budget (``diffusion_opd/budget.py``) count.

Nothing here allocates memory or downloads anything: a meta tensor has a shape and a dtype only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch

from .specs import DEFAULT_LORA_TARGETS
from .tiny import sd35_medium_transformer_config

__all__ = ["Architecture", "ARCHITECTURES", "flux1_dev_transformer_config", "sd35_large_transformer_config",
           "wan21_t2v_13b_transformer_config", "wan21_t2v_14b_transformer_config",
           "meta_student", "meta_inputs", "architecture_of"]


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


def _vae_of(class_name: str):
    """A diffusers VAE class with its default (= released) config: the 3-D / FLUX.2 VAEs."""
    def build():
        import diffusers

        return getattr(diffusers, class_name), {}
    return build


def _qwen25_vl_7b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
        vocab_size=152064)


def _mistral_small_31():
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration, Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072),
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540))


def _umt5_xxl():
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel, UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                        num_heads=64, feed_forward_proj="gated-gelu")


def wan21_t2v_13b_transformer_config() -> dict:
    """The transformer config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers (the 14B: 40 heads, 40 layers, ffn 13824)."""
    return dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def wan21_t2v_14b_transformer_config() -> dict:
    """The transformer config of Wan-AI/Wan2.1-T2V-14B-Diffusers (dim 5120: 40 heads of 128, 40 layers)."""
    return {**wan21_t2v_13b_transformer_config(), "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


@dataclass(frozen=True)
class Architecture:
    """One real model: its transformer and the parts around it, and how a round calls it."""

    family: str  # "sd3" | "flux" | "qwen_image" | "flux2" | "wan"
    transformer_class: str
    transformer_config: Callable[[], dict]
    text_tokens: int  # prompt_embeds length in the recipe (SD3: 77 CLIP + T5 tokens; FLUX: T5 tokens)
    cfg: bool  # the student's guidance is CFG (two rows per image) rather than an embedding
    text_encoders: Callable[[], list] = field(default=lambda: [])  # (class, config) pairs
    vae: Callable[[], tuple] = field(default=lambda: _vae())  # (class, config kwargs)
    frames: int = 0  # video: frames per sample (its latent has (frames - 1) / 4 + 1 frames)
    experts: int = 1  # transformers of this config in the pipeline, one running per step (Wan 2.2 A14B: 2)


ARCHITECTURES = {
    "sd3.5-medium": Architecture("sd3", "SD3Transformer2DModel", sd35_medium_transformer_config, 77 + 256, True,
                                 lambda: [_t5_xxl(), _clip(768, 12, 12, True), _clip(1280, 32, 20, True)]),
    "sd3.5-large": Architecture("sd3", "SD3Transformer2DModel", sd35_large_transformer_config, 77 + 256, True,
                                lambda: [_t5_xxl(), _clip(768, 12, 12, True), _clip(1280, 32, 20, True)]),
    "flux.1-dev": Architecture("flux", "FluxTransformer2DModel", flux1_dev_transformer_config, 512, False,
                               lambda: [_t5_xxl(), _clip(768, 12, 12, False)]),
    # The diffusers classes' default configs are the released models' (Qwen/Qwen-Image 20 B,
    # black-forest-labs/FLUX.2-dev 32 B); text lengths as the recipes set them (512 tokens).
    "qwen-image": Architecture("qwen_image", "QwenImageTransformer2DModel", dict, 512, True,
                               lambda: [_qwen25_vl_7b()], _vae_of("AutoencoderKLQwenImage")),
    "flux.2-dev": Architecture("flux2", "Flux2Transformer2DModel", dict, 512, False,
                               lambda: [_mistral_small_31()], _vae_of("AutoencoderKLFlux2")),
    "wan2.1-t2v-1.3b": Architecture("wan", "WanTransformer3DModel", wan21_t2v_13b_transformer_config, 512, True,
                                    lambda: [_umt5_xxl()], _vae_of("AutoencoderKLWan"), frames=81),
    "wan2.1-t2v-14b": Architecture("wan", "WanTransformer3DModel", wan21_t2v_14b_transformer_config, 512, True,
                                   lambda: [_umt5_xxl()], _vae_of("AutoencoderKLWan"), frames=81),
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts of the 14B's config (high / low noise)
    "wan2.2-t2v-a14b": Architecture("wan", "WanTransformer3DModel", wan21_t2v_14b_transformer_config, 512, True,
                                    lambda: [_umt5_xxl()], _vae_of("AutoencoderKLWan"), frames=81, experts=2),
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
        # nn.Module.to: diffusers' own .to() warns about fp32-kept modules, of which none matter on meta
        model = torch.nn.Module.to(getattr(diffusers, arch.transformer_class)(**arch.transformer_config()), dtype)
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_LORA_TARGETS[arch.family])),
                          adapter_name="student")
    for n, p in model.named_parameters():
        p.requires_grad_(".student." in n)
        if p.requires_grad:
            p.data = p.data.float()  # the policy trains the LoRA in fp32
    return model


def _class_defaults(class_name: str) -> dict:
    """The keyword defaults of a diffusers model class's constructor (its released config)."""
    import inspect

    import diffusers

    params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _full_config(arch: Architecture) -> dict:
    """The architecture's transformer config with its class defaults filled in (JSON-normalised)."""
    import json

    return json.loads(json.dumps({**_class_defaults(arch.transformer_class), **arch.transformer_config()}))


def architecture_of(transformer_config: dict, experts: int = 1) -> Optional[str]:
    """The name in ARCHITECTURES whose transformer a folder's ``transformer/config.json`` describes
    (same diffusers class, every constructor argument equal; ``experts``: 2 when the folder also
    has a ``transformer_2``), else None: the budget counts only architectures it knows, whatever
    path or Hub id they were loaded from."""
    import json

    given = json.loads(json.dumps({k: v for k, v in transformer_config.items() if not k.startswith("_")}))
    for name, arch in ARCHITECTURES.items():
        if transformer_config.get("_class_name") != arch.transformer_class or arch.experts != experts:
            continue
        full = _full_config(arch)
        if all(given.get(k, v) == v for k, v in full.items()):
            return name
    return None


def meta_inputs(name: str, rows: int, resolution: int, dtype=torch.bfloat16, frames: int = 0,
                text_tokens: int = 0) -> dict:
    """Keyword arguments of one transformer forward over ``rows`` images of ``resolution`` px,
    shaped as the policy builds them (FLUX: packed 2x2 tokens, position ids, guidance). A video
    has ``frames`` frames (0: the architecture's); ``text_tokens`` 0: the architecture's length."""
    arch = ARCHITECTURES[name]
    frames, n_text = frames or arch.frames, text_tokens or arch.text_tokens
    cfg = arch.transformer_config()
    side = resolution // 8

    def z(*shape):
        return torch.zeros(*shape, device="meta", dtype=dtype)

    if arch.family == "wan":  # video: (rows, 16, F', h, w), UMT5 states
        return dict(hidden_states=z(rows, cfg.get("in_channels", 16), (frames - 1) // 4 + 1, side, side),
                    timestep=z(rows), encoder_hidden_states=z(rows, n_text, cfg["text_dim"]), return_dict=False)
    defaults = _class_defaults(arch.transformer_class) if arch.family in ("qwen_image", "flux2") else {}
    cfg = {**defaults, **cfg}
    text = z(rows, n_text, cfg["joint_attention_dim"])
    tokens = (side // 2) ** 2
    if arch.family == "qwen_image":  # packed 2x2 tokens; no mask (every text token real)
        return dict(hidden_states=z(rows, tokens, cfg["in_channels"]), timestep=z(rows), encoder_hidden_states=text,
                    img_shapes=[[(1, side // 2, side // 2)]] * rows, return_dict=False)
    if arch.family == "flux2":  # the patchified latent, one token per position; 4-axis ids
        return dict(hidden_states=z(rows, tokens, cfg["in_channels"]), timestep=z(rows), guidance=z(rows).float(),
                    encoder_hidden_states=text, txt_ids=z(rows, n_text, 4), img_ids=z(rows, tokens, 4),
                    return_dict=False)
    if arch.family == "flux":
        tokens = (side // 2) ** 2
        return dict(hidden_states=z(rows, tokens, cfg["in_channels"]), timestep=z(rows), guidance=z(rows).float(),
                    pooled_projections=z(rows, cfg["pooled_projection_dim"]), encoder_hidden_states=text,
                    txt_ids=z(n_text, 3), img_ids=z(tokens, 3), return_dict=False)
    return dict(hidden_states=z(rows, cfg["in_channels"], side, side), timestep=z(rows),
                encoder_hidden_states=text, pooled_projections=z(rows, cfg["pooled_projection_dim"]),
                return_dict=False)
