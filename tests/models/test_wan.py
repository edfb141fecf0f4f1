"""What only the video family has: frames the VAE can encode, the Wan 2.2 folders that are
refused (the policy contract itself runs for Wan with every other family in test_policy.py, the
pipeline parity in test_rollout.py, a video config's one-line errors in tests/test_bad_inputs.py)."""
import json
import os

import pytest

from diffusion_opd.errors import ConfigError
from diffusion_opd.models import build_policy



@pytest.mark.parametrize("edit, message", [
    ({"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875},
     "is a Wan 2.2 A14B folder with two experts (transformer_2, boundary_ratio 0.875); the two-expert policy is "
     "not built: use a Wan 2.1 T2V folder"),
    ({"expand_timesteps": True}, "is a Wan 2.2 TI2V folder (per-token timesteps, expand_timesteps); not built"),
])
def test_wan22_folders_are_refused_in_one_line_before_any_weight(tiny_wan_dir, tmp_path, edit, message):
    folder = tmp_path / "wan22"
    folder.mkdir()
    index = json.loads(open(os.path.join(tiny_wan_dir, "model_index.json")).read())
    (folder / "model_index.json").write_text(json.dumps({**index, **edit}))  # no weights at all: refused first
    with pytest.raises(ConfigError) as err:
        build_policy(str(folder), num_frames=5)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_frames_the_vae_cannot_encode_and_image_models_refuse_frames(tiny_wan_dir, tiny_sd3_dir):
    with pytest.raises(ConfigError, match=r"sample.num_frames: 6 frames cannot be encoded by the video VAE .* "
                                          r"use 1 \+ a multiple of 4, e.g. 5"):
        build_policy(tiny_wan_dir, num_frames=6)
    with pytest.raises(ConfigError, match="sample.num_frames: 5 frames but .* is an image model \\(sd3\\)"):
        build_policy(tiny_sd3_dir, num_frames=5)
    pol = build_policy(tiny_wan_dir, num_frames=9)
    assert pol.latent_shape(64) == (16, 3, 8, 8)  # 1 + 8 frames -> 1 + 2 latent frames
