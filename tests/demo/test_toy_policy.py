"""The toy flow-matching policy honours the Policy contract the trainers rely on: velocity and
CFG, real peft adapters (student trainable, teachers frozen, switching), rollouts through
diffusion_opd.rollout, save -> load-as-teacher with no conversion, family dispatch."""
import os

import pytest
import torch

from diffusion_opd.models import BASE, STUDENT, build_policy
from diffusion_opd.models.toy import ToyPolicy, build_random_toy
from diffusion_opd.rollout import Sampling, sample

PROMPTS = ["a red square", 'a sign that says "T"', "a ring, masterpiece"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return build_random_toy(str(tmp_path_factory.mktemp("toy") / "base"), seed=0)


@pytest.fixture(scope="module")
def teacher_dir(toy_dir, tmp_path_factory):
    """A student with random (non-zero) LoRA weights, saved: a teacher for the other tests."""
    policy = build_policy(toy_dir, lora=dict(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = str(tmp_path_factory.mktemp("teacher"))
    policy.save_student(out)
    return out, policy.student_state_dict()


def _x(n=3, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_family_dispatch_and_shapes(toy_dir):
    policy = build_policy(toy_dir, lora=dict(rank=4, alpha=8))
    assert isinstance(policy, ToyPolicy)
    assert policy.latent_shape(16) == (3, 8, 8)
    with pytest.raises(ValueError, match="draws 16 px images only"):
        policy.latent_shape(32)
    # only LoRA weights train; default targets are the toy family's
    names = {n for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n and ".student." in n for n in names)
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == {"cond_proj", "in_proj", "mod", "fc1", "fc2",
                                                                    "out_proj"}
    with pytest.raises(ValueError, match="do not exist in the toy model"):
        build_policy(toy_dir, lora=dict(target_modules=("attn.to_q",)))


def test_velocity_cfg_and_fresh_student_equals_base(toy_dir):
    policy = build_policy(toy_dir, lora=dict(rank=4, alpha=8))
    embeds, x, sigma = policy.encode_prompts(PROMPTS), _x(), torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        v_c = policy.velocity(x, sigma, embeds, STUDENT, 1.0)
        assert torch.equal(v_c, policy.velocity(x, sigma, embeds, BASE, 1.0))  # B = 0 at init
        empty = policy.encode_prompts([""] * 3)
        v_u = policy.velocity(x, sigma, empty, STUDENT, 1.0)
        torch.testing.assert_close(policy.velocity(x, sigma, embeds, STUDENT, 3.0), v_u + 3.0 * (v_c - v_u))
    assert not torch.allclose(v_c[0], v_c[1])  # the prompt conditions the velocity


def test_saved_student_loads_as_teacher_unchanged(toy_dir, teacher_dir):
    folder, state = teacher_dir
    assert os.path.isfile(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    policy = build_policy(toy_dir, lora=dict(rank=4, alpha=8), teachers=[dict(name="t", path=folder)])
    assert policy.teacher_names == ["t"]
    embeds, x = policy.encode_prompts(PROMPTS), _x()
    with torch.no_grad():
        v_teacher = policy.velocity(x, 0.7, embeds, "t", 2.0)
        v_base = policy.velocity(x, 0.7, embeds, BASE, 2.0)
        assert not torch.allclose(v_teacher, v_base)
        policy.load_student_state_dict(state)  # the same weights in the student adapter
        torch.testing.assert_close(policy.velocity(x, 0.7, embeds, STUDENT, 2.0), v_teacher)
    # a teacher forward leaves the student active and the only trainable adapter
    v = policy.velocity(x, 0.7, embeds, STUDENT, 2.0)
    v.square().sum().backward()
    trainable = [p for p in policy.transformer.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in policy.trainable_parameters()}
    assert all(p.grad is not None for p in policy.trainable_parameters())
    with pytest.raises(ValueError, match="student state dict mismatch"):
        policy.load_student_state_dict({"x.lora_A.weight": torch.zeros(1)})


def test_rollout_is_per_sample_seeded_and_decodes(toy_dir):
    policy = build_policy(toy_dir, lora=dict(rank=4, alpha=8))
    embeds = policy.encode_prompts(PROMPTS)
    spec = Sampling(num_steps=6, noise_level=0.7, guidance_scale=2.0, resolution=16)
    batch = sample(policy, embeds, [5, 6, 7], spec, keep_states=True)
    alone = sample(policy, embeds.select([1]), [6], spec, keep_states=True)
    torch.testing.assert_close(batch.latents[1:2], alone.latents)  # a sample ignores its batch mates
    assert batch.log_probs[0].shape == (3,) and len(batch.states) == 6
    images = policy.decode(batch.latents)
    assert len(images) == 3 and images[0].size == (16, 16) and images[0].mode == "RGB"
    pt = policy.decode(batch.latents, output_type="pt")
    assert pt.shape == (3, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1


def test_student_init_starts_from_a_saved_adapter(toy_dir, teacher_dir):
    """model.student_init (cascade stages): the student is exactly the saved adapter, and trains."""
    folder, state = teacher_dir
    policy = build_policy(toy_dir, student_init=dict(path=folder))
    assert {k: v.shape for k, v in policy.student_state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(policy.student_state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in policy.trainable_parameters())
    out = os.path.join(folder, "again")
    policy.save_student(out)  # round trip keeps rank and alpha
    again = build_policy(toy_dir, student_init=dict(path=out))
    x, embeds = _x(), policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(again.velocity(x, 0.5, embeds), policy.velocity(x, 0.5, embeds))
