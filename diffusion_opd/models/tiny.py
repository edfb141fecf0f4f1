"""Random models of the real architectures (SD3, FLUX.1, Qwen-Image, FLUX.2, Wan 2.1 / 2.2), built
offline in code (tests, CPU smoke runs, GPU benchmarks). Nothing here downloads anything.

* :func:`build_tiny_sd3` / :func:`build_tiny_flux` write a complete ``StableDiffusion3Pipeline`` /
  ``FluxPipeline`` folder (every component of the real pipeline, a few hundred kB of random
  weights) in about a second; :func:`build_tiny_qwen_image`, :func:`build_tiny_flux2` and
  :func:`build_tiny_wan` the same for the newer families (a few seconds each);
  :func:`build_tiny_wan22` Wan 2.2 A14B's two-expert layout.
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

from .lora import SECOND_EXPERT

__all__ = [
    "TINY_TRANSFORMER_CONFIG",
    "TINY_SD35_TRANSFORMER_CONFIG",
    "TINY_FLUX_TRANSFORMER_CONFIG",
    "FLUX_SCHEDULER_CONFIG",
    "TINY_TRANSFORMER_CONFIGS",
    "build_tiny_sd3",
    "build_tiny_flux",
    "build_tiny_qwen_image",
    "build_tiny_flux2",
    "build_tiny_wan",
    "build_tiny_wan22",
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


# What a random teacher of each newer family adapts (a family not named here: the image stream's
# attention, as SD3 / FLUX.1). A tiny task teacher must change the velocity mostly the same way
# for every noise draw (as a task fine-tune does: for a prompt, toward other images), or a student
# that sees 2 draws per task and round cannot learn it in 40 rounds. In the rotary-position
# families (no additive position embedding) a random change of the image stream or of the
# single-stream MLP inputs re-routes the 16 image tokens differently for every draw: measured on
# the CPU, the share of the teacher's velocity change that is the same over 16 noise draws
# (sigma 1) is 0.24 for Qwen-Image with all 8 projections adapted and 0.21 for FLUX.2 with its
# single-stream to_qkv_mlp_proj too (SD3's default teacher: 0.59, FLUX.1's at 128 tokens: 0.63),
# and tiny_qwen_image_mopd / tiny_flux2_mopd fell only 30% / 50% in 40 rounds (Qwen-Image: 30%
# after 80 rounds too, whatever the learning rate, batch or student targets). Qwen-Image masks
# its padding, so its text stream is what carries a prompt-level change to the image (share
# 0.70, velocity moved by ~8-14%). FLUX.2 keeps the default (with 128 text tokens, config/opd.py);
# adapting its text stream too distils faster but makes the teacher's bf16 velocity 17% off fp32.
_TEACHER_TARGETS = {
    "WanTransformer3DModel": ("to_q", "to_k", "to_v", "to_out.0"),
    "QwenImageTransformer2DModel": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
}


def write_random_teacher_lora(
    pipeline_dir: str,
    out_dir: str,
    seed: int,
    fmt: str = "peft",
    rank: int = 4,
    scale: float = 1.5,
    target_modules: Optional[tuple[str, ...]] = None,
    shared_seed: Optional[int] = None,
    specific_scale: float = 0.5,
) -> str:
    """Write a random LoRA adapter for the transformer in ``pipeline_dir``; return ``out_dir``.

    ``shared_seed``: the adapter is ``shared + specific`` (concatenated along the rank, so it is
    one LoRA of rank 2 x ``rank``): a component drawn from ``shared_seed`` that every teacher
    with that seed has, plus this teacher's own component drawn from ``seed`` at
    ``specific_scale`` times the scale. ``target_modules``: default the image stream's attention
    projections (``attn.to_q / to_k / to_v / to_out.0``), for the newer families
    :data:`_TEACHER_TARGETS` (why there). Real task teachers are fine-tunes of one base toward
    better images and share much of their change; the tiny multi-task config mimics that.

    ``fmt="peft"``: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
    ``base_model.model.<module>.lora_A.weight`` (what ``PeftModel.save_pretrained`` writes; alpha
    = 2 x rank, so a loader that ignores the config is off by 2x). ``fmt="diffusers"``:
    ``pytorch_lora_weights.safetensors`` with keys ``transformer.<module>.lora_A.weight`` and no
    metadata (alpha = rank, as loaders assume). A and B are N(0, scale^2 / fan_in), so the update
    ``B A x`` is of the order of ``scale^2 * |x|``; on the tiny model the default scale 1.5 moves
    the velocity by about 30% of its norm (scale 1: ~12%, 0.5: ~3%).

    A two-expert pipeline (Wan 2.2 A14B: ``transformer_2`` in its ``model_index.json``) gets one
    adapter per expert: the low-noise expert's in ``out_dir/transformer_2`` in the same format
    (drawn from ``seed + 1000`` / ``shared_seed + 1000``; the layout models/lora.py reads).
    """
    if fmt not in ("peft", "diffusers"):
        raise ValueError(f"fmt must be 'peft' or 'diffusers', got {fmt!r}")
    from .wan import two_experts

    if two_experts(pipeline_dir):
        _write_random_lora(pipeline_dir, os.path.join(out_dir, SECOND_EXPERT), seed + 1000, fmt, rank, scale,
                           target_modules, None if shared_seed is None else shared_seed + 1000, specific_scale)
    return _write_random_lora(pipeline_dir, out_dir, seed, fmt, rank, scale, target_modules, shared_seed, specific_scale)


def _write_random_lora(pipeline_dir, out_dir, seed, fmt, rank, scale, target_modules, shared_seed, specific_scale):
    import diffusers
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = getattr(diffusers, _transformer_class(pipeline_dir)).load_config(pipeline_dir, subfolder="transformer")
    if target_modules is None:
        target_modules = _TEACHER_TARGETS.get(config["_class_name"], ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"))
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


# ---------------------------------------------------------------- Qwen-Image, FLUX.2, Wan 2.1
# The same idea for the three newer families: each pipeline's real components (its text encoder
# class, transformer, VAE and scheduler settings) at tiny widths, written with save_pretrained so
# every loading path of the real model runs. 64 px images; Wan adds frames (4k + 1).

# Words of the tiny byte-level BPE vocabulary (the rest is spelled byte by byte). Qwen-Image's
# prompt template is built from them so that its system prefix is 34 tokens, as with the real
# tokenizer: the pipeline drops exactly that many tokens (prompt_template_encode_start_idx).
_BPE_WORDS = ("system user Describe Ġthe Ġimage Ġby Ġdetailing Ġcolor Ġshape Ġsize Ġtexture Ġquantity Ġtext "
              "Ġspatial Ġrelationships Ġof Ġobjects Ġand Ġbackground Ġa Ġphoto Ġsign Ġthat Ġsays Ġred Ġblue Ġgreen "
              "Ġyellow Ġcat Ġdog Ġcar Ġcup Ġbird Ġvideo").split()


def _byte_bpe(specials: list[str], extra_tokens: tuple[str, ...] = ()):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 / Qwen / Mistral style) over the 256 byte
    symbols plus :data:`_BPE_WORDS` (merges built letter by letter), then ``specials``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(_bytes_to_unicode().values())}
    merges = []
    for word in _BPE_WORDS:
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[:k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, normalized=False) for s in extra_tokens])
    return tok


def build_tiny_qwen_image(directory: str, seed: int = 0) -> str:
    """Write a random tiny ``QwenImagePipeline`` to ``directory`` and return the path.

    Qwen/Qwen-Image's parts: a Qwen2.5-VL text encoder (its last hidden state, the pipeline's
    prompt template and dropped prefix), the MMDiT with 3-axis rotary positions and no guidance
    embedding (true CFG), the causal 3-D VAE with per-channel latent mean / std, and the
    scheduler settings of the Hub repo (dynamic exponential shift, base 0.5 / max 0.9 over
    256..8192 tokens, shift_terminal 0.02). 64 px images: 16 x 8 x 8 latents, 16 packed tokens.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tokenizer = Qwen2TokenizerFast(tokenizer_object=_byte_bpe(specials), eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials}
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rope_scaling={"mrope_section": [2, 1, 1], "rope_type": "default", "type": "default"},
                         bos_token_id=None, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        vocab_size=len(tokenizer), image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=None, eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    pipe = QwenImagePipeline(
        transformer=QwenImageTransformer2DModel(**TINY_QWEN_IMAGE_TRANSFORMER_CONFIG),
        vae=AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], latents_mean=_latent_stats(seed)[0],
                                   latents_std=_latent_stats(seed)[1]),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
    )
    return _save(pipe, directory)


def _latent_stats(seed: int, channels: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel latent mean / std of a tiny 3-D VAE: away from (0, 1), so decode() really applies them."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return ((torch.randn(channels, generator=gen) * 0.5).tolist(),
            (1.0 + torch.rand(channels, generator=gen)).tolist())


TINY_QWEN_IMAGE_TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          guidance_embeds=False, axes_dims_rope=(4, 6, 6))
# Qwen/Qwen-Image's scheduler/scheduler_config.json.
QWEN_IMAGE_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                                   shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                   time_shift_type="exponential")

# FLUX.2-dev's structure at tiny widths: 128 input channels (2x2 patches of the 32-channel latent),
# double- then single-stream blocks, the guidance embedding, 4 rotary axes (t, h, w, l) adding up
# to the head dim; joint_attention_dim = 3 stacked hidden layers of the text encoder.
_MISTRAL_WIDTH = 16
TINY_FLUX2_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * _MISTRAL_WIDTH,
                                     timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
                                     guidance_embeds=True)
# black-forest-labs/FLUX.2-dev's scheduler/scheduler_config.json (the pipeline computes mu itself).
FLUX2_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                              shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
# A Mistral-style chat template: system message and user prompt in their markers (the real
# template comes with the model's processor; the pipeline only relies on apply_chat_template).
_MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                     "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{{ m['content'][0]['text'] }}"
                     "[/INST]{% endif %}{% endfor %}")


def build_tiny_flux2(directory: str, seed: int = 0) -> str:
    """Write a random tiny ``Flux2Pipeline`` to ``directory`` and return the path.

    black-forest-labs/FLUX.2-dev's parts: a Mistral3 text encoder read at hidden layers 10, 20
    and 30 (so 30 tiny layers) through a Pixtral processor's chat template with the pipeline's
    system message (one token here), the FLUX.2 transformer (guidance embedding, 4-axis
    positions), and the FLUX.2 VAE whose batch-norm statistics normalise the patchified latent
    (random non-trivial statistics here). 64 px images: 128 x 4 x 4 latents, 16 tokens.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import (LlamaTokenizerFast, Mistral3Config, Mistral3ForConditionalGeneration,
                              PixtralImageProcessor, PixtralProcessor)

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
                "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = LlamaTokenizerFast(tokenizer_object=_byte_bpe(specials, (SYSTEM_MESSAGE,)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<unk>", add_bos_token=False)
    processor = PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=16,
                                 chat_template=_MISTRAL_TEMPLATE)
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=_MISTRAL_WIDTH, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=len(tokenizer),
                         max_position_embeddings=1024, pad_token_id=0),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=16, image_size=64),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                             latent_channels=32, sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
    gen = torch.Generator().manual_seed(seed + 1000)
    vae.bn.running_mean.copy_(torch.randn(128, generator=gen) * 0.3)
    vae.bn.running_var.copy_(0.5 + torch.rand(128, generator=gen))
    pipe = Flux2Pipeline(transformer=Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER_CONFIG), vae=vae,
                         text_encoder=Mistral3ForConditionalGeneration(config), tokenizer=processor,
                         scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG))
    return _save(pipe, directory)


# Wan 2.1's DiT at tiny widths: patches (1, 2, 2) of the 16-channel video latent, text cross-attention
# on UMT5 states; the head dim splits into rotary t / h / w parts (12 -> 4 / 4 / 4).
TINY_WAN_TRANSFORMER_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                   out_channels=16, text_dim=64, freq_dim=32, ffn_dim=32, num_layers=2,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
# The tiny Wan runs the flow-matching Euler scheduler with Wan 2.1's flow shift 3.0 (480p); the
# released folders ship UniPC on the same shift (the policy reads either, see models/wan.py).
WAN_SCHEDULER_CONFIG = dict(shift=3.0)


def build_tiny_wan(directory: str, seed: int = 0) -> str:
    """Write a random tiny ``WanPipeline`` (Wan 2.1 text-to-video) to ``directory``; return the path.

    Wan-AI/Wan2.1-T2V's parts: a UMT5 text encoder (states zero-padded after the prompt, no
    mask), the 3-D DiT, and the causal video VAE (8x spatial, 4x temporal compression, per-channel
    latent mean / std). 64 px, 5 frames: 16 x 2 x 8 x 8 latents.
    """
    return _save(_tiny_wan_pipeline(seed, WAN_SCHEDULER_CONFIG), directory)


# Wan 2.2 T2V A14B's inference settings (the Wan team's t2v_A14B config): the high-noise expert
# runs timesteps >= 0.875 x 1000, flow shift 12 (so at 4 steps, 1000 / 973 / 923 go to the
# high-noise expert and 800 to the low-noise one: both experts run in every tiny rollout).
WAN22_BOUNDARY_RATIO = 0.875
WAN22_SCHEDULER_CONFIG = dict(shift=12.0)


def build_tiny_wan22(directory: str, seed: int = 0) -> str:
    """Write a random tiny two-expert ``WanPipeline`` (Wan 2.2 T2V A14B's layout) to ``directory``.

    The Wan 2.1 parts of :func:`build_tiny_wan` plus ``transformer_2`` (the low-noise expert, a
    second DiT of the same shape with its own random weights) and ``boundary_ratio`` in
    ``model_index.json``: ``transformer`` denoises timesteps >= boundary x 1000, ``transformer_2``
    the rest, as WanPipeline switches them.
    """
    return _save(_tiny_wan_pipeline(seed, WAN22_SCHEDULER_CONFIG, two_experts=True), directory)


def _tiny_wan_pipeline(seed: int, scheduler: dict, two_experts: bool = False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    t5 = _t5_config(tokenizer, TINY_WAN_TRANSFORMER_CONFIG["text_dim"]).to_dict()
    mean, std = _latent_stats(seed)
    experts = {}
    if two_experts:
        experts = dict(transformer_2=WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG),
                       boundary_ratio=WAN22_BOUNDARY_RATIO)
    return WanPipeline(
        transformer=WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG),
        vae=AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std),
        text_encoder=UMT5EncoderModel(UMT5Config(**{k: v for k, v in t5.items() if k in UMT5Config().to_dict()})),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        **experts,
    )


TINY_BUILDERS.update({"tiny-qwen-image": build_tiny_qwen_image, "tiny-flux2": build_tiny_flux2,
                      "tiny-wan": build_tiny_wan, "tiny-wan22": build_tiny_wan22})
TINY_TRANSFORMER_CONFIGS.update({
    "tiny-qwen-image": {"_class_name": "QwenImageTransformer2DModel", **TINY_QWEN_IMAGE_TRANSFORMER_CONFIG},
    "tiny-flux2": {"_class_name": "Flux2Transformer2DModel", **TINY_FLUX2_TRANSFORMER_CONFIG},
    "tiny-wan": {"_class_name": "WanTransformer3DModel", **TINY_WAN_TRANSFORMER_CONFIG},
    "tiny-wan22": {"_class_name": "WanTransformer3DModel", **TINY_WAN_TRANSFORMER_CONFIG}})
