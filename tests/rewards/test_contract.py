"""The contract every model-based reward keeps, one parametrised test per clause (they were
copied per reward): image i is scored against prompt i only, whatever the batching; the dtype
option runs the backbone in bf16 and still returns float32 scores; a missing checkpoint names
the path looked at and the command that fetches it."""
import numpy as np
import pytest
import torch

from diffusion_opd.rewards import MissingCheckpointError, reward_class

# name -> (batch size, float32 tolerance of the comparisons: rounding only)
PAIRING = {"clipscore": (3, 1e-5), "hpsv2": (2, 1e-5), "imagereward": (2, 2e-5), "pickscore": (2, 1e-4)}


@pytest.mark.parametrize("name", sorted(PAIRING))
def test_image_i_is_scored_against_prompt_i_only(name, tiny_reward_options, test_images, test_prompts):
    batch, atol = PAIRING[name]
    scorer = reward_class(name)(batch_size=batch, **tiny_reward_options[name])
    base = scorer(test_images, test_prompts)[name]
    perm = [3, 0, 4, 1, 2]
    joint = scorer([test_images[i] for i in perm], [test_prompts[i] for i in perm])[name]
    np.testing.assert_allclose(joint, base[perm], atol=atol)  # batch order does not matter
    one_by_one = [scorer([im], [p])[name][0] for im, p in zip(test_images, test_prompts)]
    np.testing.assert_allclose(one_by_one, base, atol=atol)  # nor batch size
    shuffled = scorer(test_images, [test_prompts[i] for i in perm])[name]
    assert not np.allclose(shuffled, base, atol=atol)  # the prompt matters
    same_prompt = scorer(test_images, [test_prompts[0]] * len(test_images))[name]
    assert not np.allclose(same_prompt, same_prompt[0], atol=atol)  # and so does the image


# name -> (the part that runs in bf16, the part kept in float32 or None, tolerance). bf16 keeps
# 8 mantissa bits (rel. 4e-3 per op): through the tiny models' 2 layers the embeddings move by
# ~1e-2, scaled by each score's gain (PickScore's exp(scale)/26 ~ 3.8; ImageReward's 4 blocks ~2%).
DTYPE = {
    "aesthetic": (lambda s: s.clip.model, lambda s: s.head, 0.05),
    "clipscore": (lambda s: s.clip.model, None, 0.02),
    "hpsv2": (lambda s: s.model, None, 0.02),
    "imagereward": (lambda s: s.model.vision, lambda s: s.model.head, 0.1),
    "pickscore": (lambda s: s.clip.model, None, 0.08),
}


@pytest.mark.parametrize("name", sorted(DTYPE))
def test_dtype_option(name, tiny_reward_options, test_images, test_prompts):
    half_part, fp32_part, atol = DTYPE[name]
    cls = reward_class(name)
    a = cls(**tiny_reward_options[name])(test_images, test_prompts)[name]
    half = cls(dtype="bfloat16", **tiny_reward_options[name])
    b = half(test_images, test_prompts)[name]
    assert next(half_part(half).parameters()).dtype == torch.bfloat16 and b.dtype == np.float32
    if fp32_part is not None:
        assert next(fp32_part(half).parameters()).dtype == torch.float32
    np.testing.assert_allclose(b, a, atol=atol)
    with pytest.raises(ValueError, match="unknown dtype"):
        cls(dtype="float8", **tiny_reward_options[name])


# name -> (paths under the checkpoint root the message names, the download command it gives)
MISSING = {
    "aesthetic": (["aesthetic/sac+logos+ava1-l14-linearMSE.pth", "aesthetic/aesthetic-model.pth"], None),
    "clipscore": (["clip-vit-large-patch14"], "hf download openai/clip-vit-large-patch14"),
    "hpsv2": (["hpsv2/HPS_v2.1_compressed.pt"], "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
    "imagereward": (["imagereward/ImageReward.pt"], "hf download THUDM/ImageReward ImageReward.pt med_config.json"),
    "pickscore": (["pickscore/PickScore_v1"], "hf download yuvalkirstain/PickScore_v1"),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_checkpoint_names_path_and_command(name, tmp_path):
    paths, hub = MISSING[name]
    with pytest.raises(MissingCheckpointError) as err:
        reward_class(name)(ckpt_root=str(tmp_path)).load()
    msg = str(err.value)
    for rel in paths:
        assert str(tmp_path.joinpath(*rel.split("/"))) in msg
    assert f"python scripts/download_reward_ckpts.py --only {name}" in msg
    if hub:
        assert hub in msg
