"""Policy.add_student_copy (DiffusionNFT's old policy) on every family: a frozen second adapter
that starts as the student, is queried by name, and moves only when the recipe moves it."""
import pytest
import torch

from diffusion_opd.models import STUDENT, build_policy
from diffusion_opd.models.toy import build_random_toy
from diffusion_opd.trainers.ema import ema_update_


@pytest.fixture(scope="module", params=["sd3", "toy"])
def policy_and_inputs(request, tiny_sd3_dir, tmp_path_factory):
    if request.param == "sd3":
        policy = build_policy(tiny_sd3_dir, lora=dict(rank=4, alpha=4), max_sequence_length=16)
        x = torch.randn(2, *policy.latent_shape(32), generator=torch.Generator().manual_seed(0))
    else:
        policy = build_policy(build_random_toy(str(tmp_path_factory.mktemp("toy") / "base"), seed=0),
                              lora=dict(rank=4, alpha=8))
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial student
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return policy, x, policy.encode_prompts(["a red square", "a blue ring"])


def test_student_copy_is_a_frozen_second_adapter(policy_and_inputs):
    policy, x, embeds = policy_and_inputs
    student = policy.trainable_parameters()
    old = policy.add_student_copy("old")
    assert len(old) == len(student) and all(o.shape == s.shape and not o.requires_grad for o, s in zip(old, student))
    assert policy.trainable_parameters() == student and all(p.requires_grad for p in student)
    with torch.no_grad():
        v_student = policy.velocity(x, 0.6, embeds, STUDENT, 2.0)
        assert torch.equal(policy.velocity(x, 0.6, embeds, "old", 2.0), v_student)
        for p in student:  # the student moves; the copy does not
            p.add_(0.05)
        v_moved = policy.velocity(x, 0.6, embeds, STUDENT, 2.0)
        assert torch.equal(policy.velocity(x, 0.6, embeds, "old", 2.0), v_student)
        assert not torch.equal(v_moved, v_student)
        ema_update_(old, student, 0.0)  # decay 0: the copy becomes the student exactly
        assert torch.equal(policy.velocity(x, 0.6, embeds, "old", 2.0), v_moved)
    # a query of the copy leaves the student the active, trainable adapter (gradients reach it only)
    v = policy.velocity(x, 0.6, embeds, STUDENT, 1.0)
    v.square().mean().backward()
    assert all(p.grad is not None for p in student) and all(o.grad is None for o in old)
    with pytest.raises(ValueError, match="taken"):
        policy.add_student_copy("old")
