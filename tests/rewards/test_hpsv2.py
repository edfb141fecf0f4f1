"""HPSv2.1 on a tiny open_clip ViT: full path, formula, pairing, dtype, checkpoints."""
import numpy as np
import pytest
import torch

from diffusion_opd.rewards import load_reward
from diffusion_opd.rewards.clip_common import to_pil
from diffusion_opd.rewards.hpsv2 import HPSv2Scorer

ATOL = 1e-5  # dot products of float32 unit vectors: rounding ~1e-7, score spread ~1e-1


def reference_hps(arch, checkpoint, images, prompts):
    """hpsv2's img_score: create_model_and_transforms -> load_state_dict(ckpt['state_dict']) ->
    model(preprocess_val(image), tokenizer(prompt)) -> diag(image_features @ text_features.T)."""
    import open_clip

    model, _, preprocess_val = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    pixels = torch.stack([preprocess_val(to_pil(i)) for i in images])
    with torch.no_grad():
        out = model(pixels, open_clip.get_tokenizer(arch)(prompts))
    image_features, text_features = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    return torch.diagonal(image_features @ text_features.T).numpy()


def test_full_path_matches_hpsv2_formula(tiny_reward_ckpt_root, tiny_reward_options, tiny_hps_arch,
                                         test_images, test_prompts):
    scorer = load_reward("hpsv2", cache=False, **tiny_reward_options["hpsv2"])
    score = scorer(test_images, test_prompts)["hpsv2"]
    assert score.shape == (5,) and score.dtype == np.float32 and np.isfinite(score).all()
    assert next(scorer.model.parameters()).device.type == "cpu"
    ref = reference_hps(tiny_hps_arch, tiny_reward_ckpt_root / "hpsv2" / "HPS_v2.1_compressed.pt",
                        test_images, test_prompts)
    np.testing.assert_allclose(score, ref, atol=ATOL)
    assert np.ptp(score) > 100 * ATOL


def test_checkpoint_layouts(tiny_reward_ckpt_root, tiny_hps_arch, tmp_path, test_images, test_prompts):
    state = torch.load(tiny_reward_ckpt_root / "hpsv2" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")  # bare + DDP prefix
    ref = HPSv2Scorer(**{"ckpt_root": str(tiny_reward_ckpt_root), "arch": tiny_hps_arch})(test_images, test_prompts)
    got = HPSv2Scorer(checkpoint=str(tmp_path / "ddp.pt"), arch=tiny_hps_arch)(test_images, test_prompts)
    np.testing.assert_array_equal(got["hpsv2"], ref["hpsv2"])
    torch.save({"state_dict": {k: v for k, v in state.items() if "ln_final" not in k}}, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="does not fit open_clip"):
        HPSv2Scorer(checkpoint=str(tmp_path / "cut.pt"), arch=tiny_hps_arch).load()
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        HPSv2Scorer(checkpoint=str(tmp_path / "cut.pt"), arch="ViT-Q-99").load()
