"""Rewards on videos: image rewards frame by frame (sub-sampled by a key, mean / min per video),
the temporal consistency reward, the one-line refusals, and the video files (mp4, frame strip)."""
import numpy as np
import pytest
from PIL import Image

from diffusion_opd.rewards import load_reward
from diffusion_opd.rewards.multi import MultiReward
from diffusion_opd.rewards.video import check_video_rewards, score_frames
from diffusion_opd.video import frame_indices, frame_strip, write_mp4


def _grey(level: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (level, level, level))


def test_frame_keys_select_the_documented_frames():
    assert frame_indices(9, "all") == list(range(9))
    assert (frame_indices(9, "first"), frame_indices(9, "middle"), frame_indices(9, "last")) == ([0], [4], [8])
    assert frame_indices(9, "count:3") == [0, 4, 8] and frame_indices(5, "count:9") == list(range(5))
    assert frame_indices(9, "stride:4") == [0, 4, 8] and frame_indices(1, "count:4") == [0]
    for bad in ("some", "count:0", "stride:x", "first:2"):
        with pytest.raises(ValueError, match="unknown frame key"):
            frame_indices(9, bad)


def test_an_image_reward_scores_a_video_frame_by_frame():
    # brightness of a grey frame is its level / 255 exactly: a video of levels 0, 51, ..., 255
    levels = [0, 51, 102, 153, 204, 255]
    video, still = [_grey(v) for v in levels], [_grey(102)] * 3
    scorer = load_reward("brightness", cache=False)
    out = score_frames(scorer, [video, still], ["a", "b"])
    np.testing.assert_allclose(out["brightness"], [np.mean(levels) / 255, 0.4], rtol=1e-6)
    first = score_frames(scorer, [video, still], ["a", "b"], frames="first")
    np.testing.assert_allclose(first["brightness"], [0.0, 0.4], atol=1e-7)
    worst = score_frames(scorer, [video, still], ["a", "b"], frames="count:3", reduce="min")
    np.testing.assert_allclose(worst["brightness"], [0.0, 0.4], atol=1e-7)
    # called directly with videos, a scorer takes every frame and the mean
    np.testing.assert_allclose(scorer([video], ["a"])["brightness"], [np.mean(levels) / 255], rtol=1e-6)
    # in a multi-reward with the video-only temporal consistency, through the run's frame key
    multi = MultiReward({"brightness": 1.0, "temporal_consistency": 1.0}, frames="last")
    total = multi([video, still], ["a", "b"])
    np.testing.assert_allclose(total["brightness"], [1.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(total["temporal_consistency"], [1 - 51 / 255, 1.0], rtol=1e-6)
    np.testing.assert_allclose(total["total"], total["brightness"] + total["temporal_consistency"], rtol=1e-6)


def test_temporal_consistency_is_one_minus_the_mean_frame_change():
    scorer = load_reward("temporal_consistency", cache=False)
    flicker = [_grey(0), _grey(255)] * 2  # every pixel changes by 1 at every step
    out = scorer([[_grey(9)] * 4, flicker, [_grey(3)]], ["a", "b", "c"])["temporal_consistency"]
    np.testing.assert_allclose(out, [1.0, 0.0, 1.0], atol=1e-7)
    with pytest.raises(ValueError, match="temporal_consistency: scores videos"):
        scorer([_grey(0)], ["an image"])


def test_rewards_that_cannot_score_what_the_run_makes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="reward 'toy_colour' scores only images of its own kind and cannot score "
                                         "video frames"):
        check_video_rewards("brightness:1.0,toy_colour:0.5", video=True)
    with pytest.raises(ValueError, match="reward 'temporal_consistency' scores videos .* makes images"):
        check_video_rewards("temporal_consistency", video=False)
    check_video_rewards("brightness,temporal_consistency", video=True)  # fine
    check_video_rewards("toy_colour", video=False)


def test_mp4_and_frame_strip(tmp_path):
    av = pytest.importorskip("av")  # the optional extra "video"
    frames = [_grey(40 * i, size=32) for i in range(5)]
    path = write_mp4(frames, str(tmp_path / "v.mp4"), fps=8)
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5 and decoded[0].shape == (32, 32, 3)
    # lossy codec: the mean grey level of each frame survives to within a few levels
    np.testing.assert_allclose([d.mean() for d in decoded], [40 * i for i in range(5)], atol=4)
    strip = frame_strip(frames, max_frames=3)  # frames 0, 2, 4 side by side
    assert strip.size == (96, 32) and [strip.getpixel((32 * i + 5, 5))[0] for i in range(3)] == [0, 80, 160]
