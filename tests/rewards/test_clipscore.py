"""CLIPScore on a tiny random CLIP: full path, formula, pairing, dtype, missing checkpoints."""
import numpy as np
import pytest
import torch

from diffusion_opd.rewards import MissingCheckpointError, load_reward
from diffusion_opd.rewards.clip_common import to_pil
from diffusion_opd.rewards.clipscore import ClipScoreScorer

# Cosines of float32 features agree to ~1e-6 (the tiny model's logit_scale is ln 100 in float32,
# so logits/100 is the cosine to ~1e-7 relative; the real model's 4.6052 would add 3e-5 relative).
# 1e-5 absolute is above the rounding, far below the 1e-2 spread of the scores.
ATOL = 1e-5


def reference_clipscore(model_dir, images, prompts):
    """The peers' recipe: CLIPModel(...).logits_per_image, its diagonal, divided by 100."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(model_dir)(images=[to_pil(i) for i in images],
                                                             return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(model_dir)(prompts, padding="max_length", truncation=True, max_length=77,
                                                      return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=pixels, **tokens).logits_per_image
    return logits.diagonal().numpy() / 100


def test_full_path_matches_peers_formula(tiny_reward_ckpt_root, tiny_reward_options, test_images, test_prompts):
    scorer = load_reward("clipscore", cache=False, **tiny_reward_options["clipscore"])
    score = scorer(test_images, test_prompts)["clipscore"]
    assert score.shape == (5,) and score.dtype == np.float32 and np.isfinite(score).all()
    assert np.all(np.abs(score) <= 1 + 1e-6)  # a cosine
    assert next(scorer.clip.model.parameters()).device.type == "cpu"
    ref = reference_clipscore(tiny_reward_ckpt_root / "clip-vit-large-patch14", test_images, test_prompts)
    np.testing.assert_allclose(score, ref, atol=ATOL)
    assert np.ptp(score) > 100 * ATOL


def test_hub_id_override_is_looked_up_in_the_cache(tmp_path):
    with pytest.raises(MissingCheckpointError, match="no-such-org/no-such-clip"):
        ClipScoreScorer(model_path="no-such-org/no-such-clip", ckpt_root=str(tmp_path)).load()
