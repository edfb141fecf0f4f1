"""What only the video family has: frames the VAE can encode, the Wan 2.2 folders that are
refused, and a video config's one-line errors (the policy contract itself runs for Wan with every
other family in test_policy.py, the pipeline parity in test_rollout.py)."""
import importlib.util
import json
import os
import shutil

import pytest

from diffusion_opd.errors import ConfigError
from diffusion_opd.models import build_policy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_video_config_errors_are_one_line_before_any_weight(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_opd_script", os.path.join(ROOT, "scripts", "train_opd.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--config", "config/opd.py:tiny_wan_t2v_mopd", "--validate_only", f"output_dir={tmp_path}/run"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cases = {
            "sample.num_frames=6": "error: sample.num_frames: 6 frames cannot be encoded by the video VAE (it keeps "
                                   "the first frame and compresses the rest 4x): use 1 + a multiple of 4, e.g. 5",
            "tasks.objects.reward=toy_colour": "error: tasks.objects.reward: reward 'toy_colour' scores only images "
                                               "of its own kind and cannot score video frames; use an image reward "
                                               "that reads natural images (e.g. brightness, ocr, pickscore)",
            "sample.reward_frames=some": "error: sample.reward_frames: unknown frame key 'some'; valid: all, first, "
                                         "middle, last, count:<k>, stride:<k>",
        }
        for override, line in cases.items():
            assert script.main(args + [override]) == 2, override
            assert capsys.readouterr().err.strip().splitlines() == [line]
        assert script.main(args) == 0
    finally:
        os.chdir(cwd)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
