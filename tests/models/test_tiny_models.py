"""The tiny random SD3 builder, the teacher-adapter writer and the SD3.5-Medium preset."""
import json
import os

import numpy as np
import torch
from safetensors import safe_open

from diffusion_opd.models.tiny import build_random_transformer, sd35_medium_transformer_config


def test_tiny_pipeline_folder_loads_offline_and_samples(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                "tokenizer_2", "tokenizer_3", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_sd3_dir, sub)), sub
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # Real CLIP BPE: the ids openai/clip-vit-large-patch14 gives (bos, a, photo, of, a, cat, eos).
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # The in-code T5 vocabulary knows these words; unknown words fall back to characters, not <unk>.
    t5 = pipe.tokenizer_3
    tokens = t5.convert_ids_to_tokens(t5("a photo of a cat").input_ids)
    assert tokens == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"]
    assert t5.unk_token_id not in t5("Zebra 42!").input_ids


def test_tiny_builder_is_seeded(tmp_path):
    from diffusion_opd.models.tiny import build_tiny_sd3
    from safetensors.torch import load_file

    def weights(seed, name):
        path = build_tiny_sd3(str(tmp_path / name), seed=seed)
        return load_file(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"))

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_adapter_files_in_both_formats(tiny_teacher_dirs):
    peft_dir, diff_dir = tiny_teacher_dirs["peft"], tiny_teacher_dirs["diffusers"]
    with open(os.path.join(peft_dir, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    with safe_open(os.path.join(peft_dir, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.transformer_blocks.") for k in keys)
    with safe_open(os.path.join(diff_dir, "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    # 2 blocks x 4 projections (attn.to_q/k/v/out.0) x (A, B)
    assert len(keys) == 16


def test_sd35_medium_preset_has_the_real_architecture():
    cfg = sd35_medium_transformer_config()
    assert cfg["num_layers"] == 24 and cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1536
    model = build_random_transformer(cfg, device="meta")  # shapes only, no memory
    assert len(model.transformer_blocks) == 24
    assert [i for i, b in enumerate(model.transformer_blocks) if b.attn2 is not None] == list(range(13))
    assert model.context_embedder.in_features == 4096 and model.context_embedder.out_features == 1536
    assert model.pos_embed.proj.out_channels == 1536 and model.pos_embed.pos_embed_max_size == 384
    assert model.time_text_embed.text_embedder.linear_1.in_features == 2048
    assert model.proj_out.out_features == 2 * 2 * 16
    assert type(model.transformer_blocks[0].attn.norm_q).__name__ == "RMSNorm"


def test_tiny_flux_folder_has_the_flux_dev_layout(tiny_flux_dir, tiny_flux_teacher_dirs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_opd.models import pipeline_family

    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_flux_dir, sub)), sub
    assert pipeline_family(tiny_flux_dir) == "flux"
    with open(os.path.join(tiny_flux_dir, "transformer", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["guidance_embeds"] and cfg["in_channels"] == 4 * 16 and sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    with open(os.path.join(tiny_flux_dir, "vae", "config.json")) as f:
        vae = json.load(f)
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (0.3611, 0.1159, 16)
    sched = FlowMatchEulerDiscreteScheduler.load_config(tiny_flux_dir, subfolder="scheduler")
    assert sched["use_dynamic_shifting"] and (sched["base_shift"], sched["max_shift"]) == (0.5, 1.15)
    # teachers adapt the double-stream block and the single-stream blocks' q/k/v
    with safe_open(os.path.join(tiny_flux_teacher_dirs["diffusers"], "pytorch_lora_weights.safetensors"), "pt") as f:
        modules = {k.rsplit(".lora_", 1)[0] for k in f.keys()}
    assert "transformer.transformer_blocks.0.attn.to_out.0" in modules
    assert "transformer.single_transformer_blocks.1.attn.to_v" in modules and len(modules) == 4 + 2 * 3
