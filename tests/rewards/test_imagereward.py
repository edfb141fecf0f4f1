"""ImageReward: the original checkpoint layout -> transformers BLIP, verified on tiny weights.

``reference_imagereward`` below re-implements the ORIGINAL forward pass in plain torch, reading
the original-layout state dict directly (BLIP's timm-style ViT with LayerNorm eps 1e-6 and exact
GELU; med.py's BERT with post-LayerNorm residual blocks, the -10000 additive padding mask and a
cross-attention to all image tokens in every layer; the MLP without activations on the [CLS]
token; (r - mean) / std). The scorer must agree with it: that checks the key map, the configs
inferred from shapes, the masks and the pairing all at once.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_opd.rewards import load_reward
from diffusion_opd.rewards.clip_common import to_pil
from diffusion_opd.rewards.imagereward import (REWARD_MEAN, REWARD_STD, ImageRewardModel, ImageRewardScorer,
                                               convert_checkpoint, text_config_from, vision_config_from)

# Both sides compute in float32 with different op orders through 2+2 layers and a 1024-wide
# head: measured differences ~3e-7. 2e-5 leaves a wide margin for rounding yet still catches a
# tanh-approximated GELU (~7e-5 here); a wrong mask or pooling moves scores by > 0.1.
ATOL = 2e-5


def reference_imagereward(state, med, vision_heads, images, prompts, tokenizer_dir):
    """The original ImageReward.score(prompt, image), one pair at a time, from the raw state."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    from transformers import BertTokenizer

    g = state.__getitem__
    tok = BertTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    W = g(v + "cls_token").shape[-1]
    P = g(v + "patch_embed.proj.weight").shape[-1]
    size = int(math.isqrt(g(v + "pos_embed").shape[1] - 1)) * P
    transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    depth = len({k.split(".")[3] for k in state if k.startswith(v + "blocks.")})
    H, heads_t, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]

    def vit(x):
        x = F.conv2d(x, g(v + "patch_embed.proj.weight"), g(v + "patch_embed.proj.bias"), stride=P)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([g(v + "cls_token").expand(x.shape[0], -1, -1), x], dim=1)
        x = x + g(v + "pos_embed")[:, : x.shape[1]]
        B, N, _ = x.shape
        for i in range(depth):
            b = f"{v}blocks.{i}."
            h = F.layer_norm(x, (W,), g(b + "norm1.weight"), g(b + "norm1.bias"), eps=1e-6)
            qkv = F.linear(h, g(b + "attn.qkv.weight"), g(b + "attn.qkv.bias"))
            q, k, val = qkv.reshape(B, N, 3, vision_heads, W // vision_heads).permute(2, 0, 3, 1, 4)
            attn = ((q @ k.transpose(-2, -1)) * (W // vision_heads) ** -0.5).softmax(-1)
            h = (attn @ val).transpose(1, 2).reshape(B, N, W)
            x = x + F.linear(h, g(b + "attn.proj.weight"), g(b + "attn.proj.bias"))
            h = F.layer_norm(x, (W,), g(b + "norm2.weight"), g(b + "norm2.bias"), eps=1e-6)
            h = F.linear(F.gelu(F.linear(h, g(b + "mlp.fc1.weight"), g(b + "mlp.fc1.bias"))),
                         g(b + "mlp.fc2.weight"), g(b + "mlp.fc2.bias"))
            x = x + h
        return F.layer_norm(x, (W,), g(v + "norm.weight"), g(v + "norm.bias"), eps=1e-6)

    def ln(x, p):
        return F.layer_norm(x, (H,), g(p + ".weight"), g(p + ".bias"), eps=eps)

    def attention(x, kv, p, mask):
        def heads(y):
            return y.reshape(y.shape[0], y.shape[1], heads_t, H // heads_t).transpose(1, 2)

        q = heads(F.linear(x, g(p + "self.query.weight"), g(p + "self.query.bias")))
        k = heads(F.linear(kv, g(p + "self.key.weight"), g(p + "self.key.bias")))
        val = heads(F.linear(kv, g(p + "self.value.weight"), g(p + "self.value.bias")))
        probs = ((q @ k.transpose(-1, -2)) / math.sqrt(H // heads_t) + mask).softmax(-1)
        ctx = (probs @ val).transpose(1, 2).reshape(x.shape)
        return ln(F.linear(ctx, g(p + "output.dense.weight"), g(p + "output.dense.bias")) + x, p + "output.LayerNorm")

    scores = []
    for image, prompt in zip(images, prompts):
        text = tok(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        img = vit(transform(to_pil(image)).unsqueeze(0))
        ids, am = text["input_ids"], text["attention_mask"]
        x = F.embedding(ids, g(t + "embeddings.word_embeddings.weight"))
        x = ln(x + g(t + "embeddings.position_embeddings.weight")[: ids.shape[1]], t + "embeddings.LayerNorm")
        self_mask = (1.0 - am[:, None, None, :].float()) * -10000.0
        cross_mask = torch.zeros(1, 1, 1, img.shape[1])  # image_atts are all ones
        for i in range(med["num_hidden_layers"]):
            b = f"{t}encoder.layer.{i}."
            x = attention(x, x, b + "attention.", self_mask)
            x = attention(x, img, b + "crossattention.", cross_mask)
            h = F.gelu(F.linear(x, g(b + "intermediate.dense.weight"), g(b + "intermediate.dense.bias")))
            x = ln(F.linear(h, g(b + "output.dense.weight"), g(b + "output.dense.bias")) + x, b + "output.LayerNorm")
        r = x[:, 0]
        for idx in (0, 2, 4, 6, 7):
            r = F.linear(r, g(f"mlp.layers.{idx}.weight"), g(f"mlp.layers.{idx}.bias"))
        scores.append(((r - REWARD_MEAN) / REWARD_STD).item())
    return np.asarray(scores, dtype=np.float32)


def test_every_original_key_is_consumed_with_matching_shapes(tiny_imagereward_files):
    from transformers import BlipTextModel, BlipVisionModel

    state, med, heads = tiny_imagereward_files["state"], tiny_imagereward_files["med"], tiny_imagereward_files["vision"]["heads"]
    vision, text, head = convert_checkpoint(state)
    ignored = {k for k in state if k.startswith(("blip.vision_proj.", "blip.text_proj."))}
    ignored.add("blip.text_encoder.embeddings.position_ids")
    assert len(vision) + len(text) + len(head) + len(ignored) == len(state)  # nothing dropped silently
    vcfg = vision_config_from(vision, heads)
    targets = {"vision": BlipVisionModel(vcfg).state_dict(),
               "text": BlipTextModel(text_config_from(med, vcfg.hidden_size), add_pooling_layer=False).state_dict()}
    for name, part in (("vision", vision), ("text", text)):
        assert set(part) == set(targets[name]), name
        assert all(part[k].shape == targets[name][k].shape for k in part), name
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    # the values travel unchanged (a rename, no reshaping)
    assert torch.equal(vision["encoder.layers.1.self_attn.qkv.weight"], state["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(text["encoder.layer.0.crossattention.self.key.weight"],
                       state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    assert (vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.num_attention_heads, vcfg.image_size, vcfg.patch_size,
            vcfg.layer_norm_eps, vcfg.hidden_act) == (32, 2, 4, 224, 16, 1e-6, "gelu")
    tcfg = text_config_from(med, vcfg.hidden_size)
    assert (tcfg.layer_norm_eps, tcfg.hidden_act, tcfg.encoder_hidden_size, tcfg.num_attention_heads) == (1e-12, "gelu", 32, 4)


def test_unknown_or_missing_keys_are_errors(tiny_imagereward_files):
    state, med = dict(tiny_imagereward_files["state"]), tiny_imagereward_files["med"]
    extra = dict(state, **{"blip.text_encoder.encoder.layer.0.adapter.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="no mapping.*adapter"):
        convert_checkpoint(extra)
    cut = {k: v for k, v in state.items() if "crossattention.self.value.bias" not in k}
    with pytest.raises(RuntimeError, match="Missing key"):
        ImageRewardModel.from_original(cut, med, vision_heads=4)
    with pytest.raises(ValueError, match="pass vision_heads"):
        ImageRewardModel.from_original(state, med)  # width 32 is neither BLIP base nor large
    with pytest.raises(ValueError, match="add_cross_attention"):
        ImageRewardModel.from_original(state, dict(med, add_cross_attention=False), vision_heads=4)


def test_full_path_matches_the_original_forward(tiny_reward_ckpt_root, tiny_reward_options, test_images, test_prompts):
    scorer = load_reward("imagereward", cache=False, **tiny_reward_options["imagereward"])
    score = scorer(test_images, test_prompts)["imagereward"]
    assert score.shape == (5,) and score.dtype == np.float32 and np.isfinite(score).all()
    assert next(scorer.model.parameters()).device.type == "cpu"
    files = tiny_reward_ckpt_root / "imagereward"
    ref = reference_imagereward(torch.load(files / "ImageReward.pt", weights_only=True),
                                json.loads((files / "med_config.json").read_text()), 4,
                                test_images, test_prompts, files / "bert-base-uncased")
    np.testing.assert_allclose(score, ref, atol=ATOL)
    assert np.ptp(score) > 100 * ATOL


def test_bad_options_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown imagereward backend 'blip2'; valid: transformers, official"):
        ImageRewardScorer(backend="blip2")


def test_official_backend_without_the_package_says_how_to_run_it(tiny_reward_options, test_images, test_prompts):
    try:  # the package cannot be installed next to transformers 5; skip where it is
        import ImageReward  # noqa: F401
        pytest.skip("image-reward is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="remote="):
        ImageRewardScorer(backend="official", **tiny_reward_options["imagereward"]).load()


# BLIP's configs/med_config.json as published next to ImageReward.pt (THUDM/ImageReward).
REAL_MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                   "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
                   "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                   "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
                   "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


def test_real_size_layout_maps_onto_transformers_blip(imagereward_layout):
    """The full-size original layout (ViT-L/16 at 224 px, BERT-base with cross-attention to
    1024-d tokens, 768-d MLP) against transformers models of the inferred configs, on the meta
    device (shapes only, nothing allocated)."""
    from transformers import BlipTextModel, BlipVisionModel

    shapes = imagereward_layout({"width": 1024, "depth": 24, "heads": 16, "mlp": 4096, "patch": 16, "image": 224},
                                REAL_MED_CONFIG)
    state = {k: (torch.arange(s[-1]).reshape(s) if k.endswith("position_ids") else torch.empty(s, device="meta"))
             for k, s in shapes.items()}
    vision, text, head = convert_checkpoint(state)
    vcfg = vision_config_from(vision)  # heads from BLIP's table: 1024 -> 16
    assert (vcfg.num_attention_heads, vcfg.num_hidden_layers, vcfg.image_size, vcfg.intermediate_size) == (16, 24, 224, 4096)
    with torch.device("meta"):
        targets = {"vision": BlipVisionModel(vcfg).state_dict(),
                   "text": BlipTextModel(text_config_from(REAL_MED_CONFIG, 1024), add_pooling_layer=False).state_dict()}
    for name, part in (("vision", vision), ("text", text)):
        assert set(part) == set(targets[name]), name
        assert all(part[k].shape == targets[name][k].shape for k in part), name
    assert head["layers.0.weight"].shape == (1024, 768)
    n_params = sum(v.numel() for p in (vision, text, head) for v in p.values())
    assert 440e6 < n_params < 480e6  # ViT-L (~303M) + BERT-base with cross-attention (~153M) + head (~0.9M)
