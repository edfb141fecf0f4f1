"""What only the video family has: frames the VAE can encode, the Wan folders that are refused,
Wan 2.2 A14B's two experts under one student (the policy contract itself runs for Wan 2.1 and
Wan 2.2 with every other family in test_policy.py, the pipeline parity in test_rollout.py, a video
config's one-line errors in tests/test_bad_inputs.py)."""
import json
import os

import pytest
import torch

from diffusion_opd.errors import ConfigError
from diffusion_opd.models import STUDENT, build_policy


@pytest.mark.parametrize("edit, message", [
    ({"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": None},
     "names a transformer_2 but no boundary_ratio in model_index.json: WanPipeline would never run the second expert"),
    ({"expand_timesteps": True}, "is a Wan 2.2 TI2V folder (per-token timesteps, expand_timesteps); not built"),
])
def test_unbuilt_wan_folders_are_refused_in_one_line_before_any_weight(tiny_wan_dir, tmp_path, edit, message):
    folder = tmp_path / "wan22"
    folder.mkdir()
    index = json.loads(open(os.path.join(tiny_wan_dir, "model_index.json")).read())
    (folder / "model_index.json").write_text(json.dumps({**index, **edit}))  # no weights at all: refused first
    with pytest.raises(ConfigError) as err:
        build_policy(str(folder), num_frames=5)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wan22_student_spans_both_experts_and_each_row_runs_its_expert(tiny_wan22_dir, tmp_path):
    from diffusion_opd.models.tiny import write_random_teacher_lora

    teacher = write_random_teacher_lora(tiny_wan22_dir, str(tmp_path / "teacher"), seed=1)
    pol = build_policy(tiny_wan22_dir, num_frames=5, guidance_scale_2=3.0, teachers=[dict(name="t", path=teacher)])
    named = {n: p for n, p in pol.transformer.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in named} == {"transformer", "transformer_2"}  # one student over both experts
    assert set(map(id, named.values())) == set(map(id, pol.trainable_parameters()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in named.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.randn(2, *pol.latent_shape(64), generator=gen)
    embeds = pol.encode_prompts(["a red car", "a photo of a cat"])
    # timestep 950 >= 875: the high-noise expert alone (its LoRA alone gets gradients); 500: the low-noise one
    for sigma, expert in ((0.95, "transformer"), (0.5, "transformer_2")):
        for p in named.values():
            p.grad = None
        pol.velocity(x, sigma, embeds, STUDENT, 4.0).square().sum().backward()
        assert {n.split(".")[0] for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0} == {expert}
    with torch.no_grad():
        # a batch straddling the boundary: each row is its own call (its expert, its CFG scale);
        # batch 2 vs 1 may sum GEMMs in another order: fp32 round-off only (|v| ~ 3)
        sig = torch.tensor([0.95, 0.5])
        both = pol.velocity(x, sig, embeds, STUDENT, 4.0)
        for i in range(2):
            alone = pol.velocity(x[i:i + 1], sig[i].item(), embeds.select([i]), STUDENT, 4.0)
            torch.testing.assert_close(both[i:i + 1], alone, rtol=0, atol=1e-5)
        # teacher rows in one mixed forward (adapter spans) straddling the boundary: each row its own call
        mixed = pol.velocity_mixed(x, sig, embeds, ["t", "base"], [4.0, 4.0])
        for i, adapter in enumerate(("t", "base")):
            alone = pol.velocity(x[i:i + 1], sig[i].item(), embeds.select([i]), adapter, 4.0)
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-5)
        # guidance_scale_2 applies below the boundary only (WanPipeline's guidance_scale_2)
        pol.guidance_scale_2 = None
        same = pol.velocity(x, sig, embeds, STUDENT, 4.0)
    torch.testing.assert_close(same[0], both[0], rtol=0, atol=1e-5)
    assert (same[1] - both[1]).abs().max() > 0.01


def test_wan22_only_settings_are_refused_in_one_line(tiny_wan_dir, tiny_wan22_dir, tiny_sd3_dir):
    for folder, family in ((tiny_wan_dir, "one transformer"), (tiny_sd3_dir, "is a sd3 model")):
        with pytest.raises(ConfigError, match=f"model.guidance_scale_2: 3.0 but .* {family}"):
            build_policy(folder, guidance_scale_2=3.0)
    with pytest.raises(ConfigError, match="teachers.full.kind: full-transformer teachers are not built for Wan 2.2 "
                                          "A14B's two experts; give the teacher as a LoRA folder"):
        build_policy(tiny_wan22_dir, num_frames=5, teachers=[dict(name="full", path=tiny_wan22_dir, kind="transformer")])


def test_frames_the_vae_cannot_encode_and_image_models_refuse_frames(tiny_wan_dir, tiny_sd3_dir):
    with pytest.raises(ConfigError, match=r"sample.num_frames: 6 frames cannot be encoded by the video VAE .* "
                                          r"use 1 \+ a multiple of 4, e.g. 5"):
        build_policy(tiny_wan_dir, num_frames=6)
    with pytest.raises(ConfigError, match="sample.num_frames: 5 frames but .* is an image model \\(sd3\\)"):
        build_policy(tiny_sd3_dir, num_frames=5)
    pol = build_policy(tiny_wan_dir, num_frames=9)
    assert pol.latent_shape(64) == (16, 3, 8, 8)  # 1 + 8 frames -> 1 + 2 latent frames
