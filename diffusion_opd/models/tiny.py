"""Random SD3 and FLUX models of the real architectures, built offline in code (tests, CPU smoke
runs, GPU benchmarks). Nothing here downloads anything.

* :func:`build_tiny_sd3` / :func:`build_tiny_flux` write a complete ``StableDiffusion3Pipeline`` /
  ``FluxPipeline`` folder (every component of the real pipeline, a few hundred kB of random
  weights) in about a second.
* :func:`write_random_teacher_lora` writes a random LoRA adapter for such a folder, in PEFT or
  diffusers format, strong enough that its velocities clearly differ from the base model's.
* :func:`sd35_medium_transformer_config` / :func:`build_random_transformer`: the SD3.5-Medium
  transformer with random weights (about 2.2 B parameters) for GPU benchmarks; never built in CI.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Optional

import torch

__all__ = [
    "TINY_TRANSFORMER_CONFIG",
    "TINY_SD35_TRANSFORMER_CONFIG",
    "TINY_FLUX_TRANSFORMER_CONFIG",
    "FLUX_SCHEDULER_CONFIG",
    "TINY_TRANSFORMER_CONFIGS",
    "build_tiny_sd3",
    "build_tiny_flux",
    "write_random_teacher_lora",
    "TINY_BUILDERS",
    "sd35_medium_transformer_config",
    "build_random_transformer",
]

# Same block structure as SD3.5 (dual attention in the first block, RMS qk-norm), tiny widths.
# caption_projection_dim must equal heads x head_dim; joint_attention_dim is the T5 width and
# must be >= the two CLIP widths side by side (the pipeline zero-pads CLIP up to T5's width).
TINY_TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    out_channels=16,
    pos_embed_max_size=32,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
# The 4 block variants of SD3.5-Medium at tiny widths (compile tests): dual attention (blocks
# 0-12 there; the first block's inputs need no grad), plain joint blocks, and the last block,
# whose text stream is context_pre_only (no text output).
TINY_SD35_TRANSFORMER_CONFIG = dict(TINY_TRANSFORMER_CONFIG, num_layers=4, dual_attention_layers=(0, 1))
_CLIP_WIDTH = 32  # hidden and projection width of each tiny CLIP; 2 x 32 = pooled_projection_dim

# FLUX.1-dev's structure at tiny widths: 64 input channels (2x2 patches of the 16-channel latent),
# a double-stream then two single-stream blocks, the guidance embedding of the distilled model;
# the rotary axes (index, row, column) must add up to the head dim. pooled_projection_dim is the
# CLIP width, joint_attention_dim the T5 width.
TINY_FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=_CLIP_WIDTH,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
# black-forest-labs/FLUX.1-dev's scheduler/scheduler_config.json (the dynamic, resolution-dependent shift).
FLUX_SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                             base_image_seq_len=256, max_image_seq_len=4096)

# Word pieces of the tiny T5 vocabulary: letters and digits make every ASCII prompt encodable,
# a few whole words make common prompts short. Scores are Unigram log-probabilities.
_T5_WORDS = (
    "a an the of and with on in to photo image picture text sign that says red green blue yellow "
    "black white orange purple pink brown cat dog car bird person table chair cup clock apple"
).split()
_T5_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&")


def sd35_medium_transformer_config() -> dict:
    """The transformer config of stabilityai/stable-diffusion-3.5-medium (architecture only)."""
    return dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )


def build_random_transformer(config: Optional[dict] = None, *, dtype=torch.float32, device="cpu", seed: int = 0):
    """An ``SD3Transformer2DModel`` with random weights, built directly on ``device``.

    ``config`` defaults to :func:`sd35_medium_transformer_config` (about 9 GB in fp32: build it on
    a GPU, or on ``"meta"`` to inspect shapes without allocating memory).
    """
    from diffusers import SD3Transformer2DModel

    config = dict(sd35_medium_transformer_config() if config is None else config)
    if str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**config)
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def _clip_tokenizer():
    """A CLIPTokenizer with the real CLIP BPE vocabulary, from the file open_clip ships."""
    from transformers import CLIPTokenizer

    # find_spec locates the package without importing it (importing open_clip takes seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tiny CLIP tokenizer needs the BPE file of open-clip-torch: pip install open-clip-torch")
    bpe = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    # CLIP uses the first 48894 merges (vocab 49408 = 2 x 256 byte symbols + merges + 2 specials).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode symbol table (the BPE works on these symbols)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over a small in-code vocabulary."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in _T5_WORDS]
    vocab += [(c, -5.0) for c in _T5_CHARS] + [("▁" + c, -5.5) for c in _T5_CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _tiny_vae(scaling_factor: float, shift_factor: float):
    """A 4-level (x8) AutoencoderKL with 16 latent channels and the family's latent constants,
    so decode() applies the real transform."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _clip_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_WIDTH,
        intermediate_size=2 * _CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=_CLIP_WIDTH,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer, width: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _save(pipe, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    pipe.save_pretrained(directory)
    return str(directory)


def build_tiny_sd3(directory: str, seed: int = 0, transformer_config: Optional[dict] = None) -> str:
    """Write a random tiny ``StableDiffusion3Pipeline`` to ``directory`` and return the path
    (``transformer_config``: e.g. :data:`TINY_SD35_TRANSFORMER_CONFIG`; default the 2-block one).

    The folder has the layout of the Hub repo (model_index.json, transformer/, vae/, three text
    encoders and tokenizers, scheduler/), so every loading path of the real model runs on it.
    64 px images give 8x8 latents; ``pos_embed_max_size`` allows up to 512 px.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**(transformer_config or TINY_TRANSFORMER_CONFIG))
    vae = _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE constants
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    clip_cfg = _clip_config(clip_tok)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip_cfg),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_cfg),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=T5EncoderModel(_t5_config(t5_tok, TINY_TRANSFORMER_CONFIG["joint_attention_dim"])),
        tokenizer_3=t5_tok,
    )
    return _save(pipe, directory)


def build_tiny_flux(directory: str, seed: int = 0) -> str:
    """Write a random tiny ``FluxPipeline`` to ``directory`` and return the path.

    The layout of black-forest-labs/FLUX.1-dev (transformer/, vae/, CLIP text_encoder + T5
    text_encoder_2 and their tokenizers, scheduler/ with FLUX.1-dev's dynamic-shift settings),
    FLUX.1-dev's block structure (double- then single-stream blocks, guidance embedding, rotary
    positions) and its VAE constants, at tiny widths. 64 px images: 16x8x8 latents, 16 tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER_CONFIG)
    vae = _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE constants
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=CLIPTextModel(_clip_config(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=T5EncoderModel(_t5_config(t5_tok, TINY_FLUX_TRANSFORMER_CONFIG["joint_attention_dim"])),
        tokenizer_2=t5_tok,
    )
    return _save(pipe, directory)


def _transformer_class(pipeline_dir: str) -> str:
    import json

    with open(os.path.join(pipeline_dir, "model_index.json")) as f:
        return json.load(f)["transformer"][1]


def write_random_teacher_lora(
    pipeline_dir: str,
    out_dir: str,
    seed: int,
    fmt: str = "peft",
    rank: int = 4,
    scale: float = 1.5,
    target_modules: tuple[str, ...] = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"),
    shared_seed: Optional[int] = None,
    specific_scale: float = 0.5,
) -> str:
    """Write a random LoRA adapter for the transformer in ``pipeline_dir``; return ``out_dir``.

    ``shared_seed``: the adapter is ``shared + specific`` (concatenated along the rank, so it is
    one LoRA of rank 2 x ``rank``): a component drawn from ``shared_seed`` that every teacher
    with that seed has, plus this teacher's own component drawn from ``seed`` at
    ``specific_scale`` times the scale. Real task teachers are fine-tunes of one base toward
    better images and share much of their change; the tiny multi-task config mimics that.

    ``fmt="peft"``: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight`` (what ``PeftModel.save_pretrained`` writes; alpha
    = 2 x rank, so a loader that ignores the config is off by 2x). ``fmt="diffusers"``:
    ``pytorch_lora_weights.safetensors`` with keys ``transformer.<module>.lora_A.weight`` and no
    metadata (alpha = rank, as loaders assume). A and B are N(0, scale^2 / fan_in), so the update
    ``B A x`` is of the order of ``scale^2 * |x|``; on the tiny model the default scale 1.5 moves
    the velocity by about 30% of its norm (scale 1: ~12%, 0.5: ~3%).
    """
    import diffusers
    from peft import LoraConfig
    from safetensors.torch import save_file

    if fmt not in ("peft", "diffusers"):
        raise ValueError(f"fmt must be 'peft' or 'diffusers', got {fmt!r}")
    config = getattr(diffusers, _transformer_class(pipeline_dir)).load_config(pipeline_dir, subfolder="transformer")
    with torch.device("meta"):  # shapes only: the weights are never read
        transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    parts = [(torch.Generator().manual_seed(seed), 1.0)]
    if shared_seed is not None:
        parts = [(torch.Generator().manual_seed(shared_seed), 1.0), (parts[0][0], specific_scale)]
    total_rank = rank * len(parts)
    alpha = 2 * total_rank if fmt == "peft" else total_rank
    weights = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.endswith(tuple("." + t for t in target_modules)):
            continue
        a_parts, b_parts = [], []
        for gen, rel in parts:
            a_parts.append(torch.randn(rank, module.in_features, generator=gen) * scale / module.in_features**0.5)
            b_parts.append(torch.randn(module.out_features, rank, generator=gen) * rel * scale / rank**0.5
                           * (total_rank / alpha))
        weights[f"{name}.lora_A.weight"] = torch.cat(a_parts, 0)
        weights[f"{name}.lora_B.weight"] = torch.cat(b_parts, 1)
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "peft":
        config = LoraConfig(r=total_rank, lora_alpha=alpha, target_modules=list(target_modules))
        config.save_pretrained(out_dir)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in weights.items()},
                  os.path.join(out_dir, "adapter_model.safetensors"))
    else:
        save_file({f"transformer.{k}": v.contiguous() for k, v in weights.items()},
                  os.path.join(out_dir, "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


# ``builtin:<name>`` model paths of the configs -> the builder of that tiny pipeline folder.
def _build_random_toy(directory: str, seed: int = 0) -> str:
    from .toy import build_random_toy

    return build_random_toy(directory, seed=seed)


TINY_BUILDERS = {"tiny-sd3": build_tiny_sd3, "tiny-flux": build_tiny_flux, "toy": _build_random_toy}
# Their diffusers denoiser configs, readable before anything is built (lora.target_modules is
# checked against them); a builtin missing here is built in a temporary folder to read its config.
TINY_TRANSFORMER_CONFIGS = {"tiny-sd3": {"_class_name": "SD3Transformer2DModel", **TINY_TRANSFORMER_CONFIG},
                            "tiny-flux": {"_class_name": "FluxTransformer2DModel", **TINY_FLUX_TRANSFORMER_CONFIG}}
