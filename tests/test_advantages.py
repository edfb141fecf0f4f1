"""advantages.py against hand-computed group statistics."""
import numpy as np
import pytest
import torch

from diffusion_opd.advantages import group_advantages, group_ids, nonzero_advantage_mask

# Two prompts, k = 3, interleaved (groups need not be contiguous), plus a constant group.
REWARDS = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 0.5, 0.5, 0.5]
GROUPS = ["a", "b", "a", "b", "a", "b", "c", "c", "c"]


def test_group_ids_first_appearance_order():
    assert group_ids(["x", "y", "x", "z"]).tolist() == [0, 1, 0, 2]
    assert group_ids(torch.tensor([7, 3, 7])).tolist() == [0, 1, 0]


def test_per_group_std():
    adv = group_advantages(REWARDS, GROUPS, std="group", eps=1e-4)
    sd_a, sd_b = np.std([1, 2, 3]), np.std([10, 20, 30])  # population std, as the peers
    expected = [-1 / (sd_a + 1e-4), -10 / (sd_b + 1e-4), 0.0, 0.0, 1 / (sd_a + 1e-4), 10 / (sd_b + 1e-4), 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    # Per-group std makes the scale of each prompt's rewards irrelevant.
    torch.testing.assert_close(adv[[0, 2, 4]], adv[[1, 3, 5]], atol=1e-4, rtol=1e-4)


def test_global_std_divides_by_the_whole_batch():
    adv = group_advantages(REWARDS, GROUPS, std="global")
    sd = np.std(REWARDS) + 1e-4
    expected = [-1 / sd, -10 / sd, 0, 0, 1 / sd, 10 / sd, 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32))
    centred = group_advantages(REWARDS, GROUPS, std="none")
    torch.testing.assert_close(centred, torch.tensor([-1, -10, 0, 0, 1, 10, 0, 0, 0], dtype=torch.float32))


def test_clip_and_invariances():
    rng = np.random.default_rng(0)
    r = rng.normal(size=24)
    groups = np.repeat(np.arange(6), 4)
    adv = group_advantages(r, groups, eps=0.0)
    # Affine invariance of per-group standardisation (eps = 0): (a r + b) gives the same A.
    torch.testing.assert_close(group_advantages(3 * r + 7, groups, eps=0.0), adv, atol=1e-5, rtol=1e-5)
    # Each group's advantages sum to 0 and have unit population std.
    per_group = adv.reshape(6, 4).double()
    torch.testing.assert_close(per_group.sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_group.std(1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    clipped = group_advantages([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], clip=1.0)  # unclipped: -0.577, 1.732
    assert clipped.max().item() == 1.0 and clipped.min().item() == pytest.approx(-1 / np.sqrt(3), rel=1e-3)


def test_constant_group_is_exactly_zero_and_masked():
    # 0.1 three times: the float mean is not 0.1 bit for bit, the advantage must still be 0.
    adv = group_advantages([0.1, 0.1, 0.1, 0.3, 0.7, 0.9], [0, 0, 0, 1, 1, 1])
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert nonzero_advantage_mask(adv).tolist() == [False, False, False, True, True, True]
    # A group of one has nothing to compare with: advantage 0.
    assert group_advantages([5.0, 1.0, 2.0], ["solo", "g", "g"])[0].item() == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN reward at sample"):
        group_advantages([1.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="3 rewards but 2 group labels"):
        group_advantages([1.0, 2.0, 3.0], [0, 0])
    with pytest.raises(ValueError, match="std must be"):
        group_advantages([1.0], [0], std="batch")
