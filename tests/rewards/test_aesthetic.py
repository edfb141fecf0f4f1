"""Aesthetic predictor on a tiny random CLIP + MLP: full path, formula, dtype, checkpoints."""
import numpy as np
import pytest
import torch
from torch import nn

from diffusion_opd.rewards import load_reward
from diffusion_opd.rewards.aesthetic import AestheticScorer
from diffusion_opd.rewards.clip_common import to_pil

ATOL = 1e-5  # float32 path on both sides; MLP outputs are O(0.1-1), rounding ~1e-7


def reference_aesthetic(model_dir, mlp_file, images):
    """The peers' recipe: CLIPProcessor -> get_image_features -> L2 normalise -> the LAION MLP
    (Linear 768-1024, Dropout, Linear -128, Dropout, Linear -64, Dropout, Linear -16, Linear -1)."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    state = torch.load(mlp_file, weights_only=True)
    d = state["layers.0.weight"].shape[1]
    mlp = nn.Sequential(nn.Linear(d, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    pixels = CLIPImageProcessorPil.from_pretrained(model_dir)(images=[to_pil(i) for i in images],
                                                             return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embed = model.get_image_features(pixel_values=pixels).pooler_output
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return mlp.eval()(embed).squeeze(1).numpy()


def test_full_path_matches_peers_formula(tiny_reward_ckpt_root, tiny_reward_options, test_images, test_prompts):
    scorer = load_reward("aesthetic", cache=False, **tiny_reward_options["aesthetic"])
    score = scorer(test_images, test_prompts)["aesthetic"]
    assert score.shape == (5,) and score.dtype == np.float32 and np.isfinite(score).all()
    assert next(scorer.clip.model.parameters()).device.type == "cpu"
    ref = reference_aesthetic(tiny_reward_ckpt_root / "clip-vit-large-patch14",
                              tiny_reward_ckpt_root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", test_images)
    np.testing.assert_allclose(score, ref, atol=ATOL)
    assert np.ptp(score) > 100 * ATOL
    # Per image: the prompt is ignored, the image order is kept.
    perm = [2, 4, 1, 0, 3]
    np.testing.assert_allclose(scorer([test_images[i] for i in perm], ["x"] * 5)["aesthetic"], score[perm], atol=ATOL)


def test_hub_mirror_file_name_and_explicit_checkpoint(tiny_reward_ckpt_root, tmp_path, test_images, test_prompts):
    # The Hub mirror's name (trl-lib/ddpo-aesthetic-predictor :: aesthetic-model.pth) is accepted.
    (tmp_path / "aesthetic").mkdir()
    src = tiny_reward_ckpt_root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    (tmp_path / "aesthetic" / "aesthetic-model.pth").write_bytes(src.read_bytes())
    clip = str(tiny_reward_ckpt_root / "clip-vit-large-patch14")
    a = AestheticScorer(ckpt_root=str(tmp_path), model_path=clip)(test_images, test_prompts)["aesthetic"]
    b = AestheticScorer(ckpt_root=str(tmp_path), model_path=clip, checkpoint=str(src))(test_images, test_prompts)
    np.testing.assert_array_equal(a, b["aesthetic"])


def test_head_that_does_not_fit_the_clip_width_is_rejected(tiny_reward_ckpt_root, tmp_path):
    from diffusion_opd.rewards.clip_common import ScoreMLP

    torch.save(ScoreMLP(768).state_dict(), tmp_path / "head.pth")
    scorer = AestheticScorer(checkpoint=str(tmp_path / "head.pth"),
                             model_path=str(tiny_reward_ckpt_root / "clip-vit-large-patch14"))
    with pytest.raises(ValueError, match="expects 768-d features but the CLIP model gives 16-d"):
        scorer.load()
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a 768-1024-128-64-16-1 head"):
        AestheticScorer(checkpoint=str(tmp_path / "other.pth"),
                        model_path=str(tiny_reward_ckpt_root / "clip-vit-large-patch14")).load()
