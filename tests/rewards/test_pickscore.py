"""PickScore on a tiny random CLIP: full path, formula, pairing, dtype, missing checkpoints."""
import numpy as np
import torch

from diffusion_opd.rewards import load_reward
from diffusion_opd.rewards.clip_common import to_pil
from diffusion_opd.rewards.pickscore import PickScoreScorer

# float32 features of a 2-layer, 32-wide model: scores agree to float32 rounding (~1e-6 on a
# cosine, x exp(logit_scale)/26 ~ 4): 1e-4 absolute is a wide margin that still catches any
# preprocessing / pairing / formula difference (those move scores by > 1e-2 here).
ATOL = 1e-4


def reference_pickscore(model_dir, processor_dir, images, prompts):
    """The peers' recipe: CLIPProcessor features, logit_scale.exp() * diag(text @ image.T) / 26."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(processor_dir)(images=[to_pil(i) for i in images],
                                                                 return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(processor_dir)(prompts, padding=True, truncation=True, max_length=77,
                                                          return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**tokens).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (txt @ img.T)).diag().detach().numpy() / 26


def test_full_path_matches_peers_formula(tiny_reward_ckpt_root, tiny_reward_options, test_images, test_prompts):
    scorer = load_reward("pickscore", cache=False, **tiny_reward_options["pickscore"])
    out = scorer(test_images, test_prompts)
    score = out["pickscore"]
    assert score.shape == (5,) and score.dtype == np.float32 and np.isfinite(score).all()
    assert next(scorer.clip.model.parameters()).device.type == "cpu"
    ref = reference_pickscore(tiny_reward_ckpt_root / "pickscore" / "PickScore_v1",
                              tiny_reward_ckpt_root / "pickscore" / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                              test_images, test_prompts)
    np.testing.assert_allclose(score, ref, atol=ATOL)
    np.testing.assert_allclose(out["pickscore_raw"], score * 26, rtol=1e-6)
    assert np.ptp(score) > 10 * ATOL  # the comparison is not vacuous: scores differ across pairs


def test_local_folder_overrides(tiny_clip_model_dir, tiny_clip_processor_dir, tmp_path, test_images, test_prompts):
    scorer = PickScoreScorer(model_path=str(tiny_clip_model_dir), processor_path=str(tiny_clip_processor_dir),
                             ckpt_root=str(tmp_path))  # empty root: only the overrides can work
    ref = reference_pickscore(tiny_clip_model_dir, tiny_clip_processor_dir, test_images, test_prompts)
    np.testing.assert_allclose(scorer(test_images, test_prompts)["pickscore"], ref, atol=ATOL)
