"""Rollouts on the tiny random SD3 pipeline (CPU, fp32); pipeline parity for every family."""
import pytest
import torch

from diffusion_opd.models import STUDENT, build_policy
from diffusion_opd.rollout import Sampling, Trajectory, replay_steps, rollout_steps, sample
from diffusion_opd.sampling import gaussian_log_prob, sd3_sigmas, transition_mean_std

PROMPTS = ["a photo of a cat", "a red car", "a sign that says \"hello\""]
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir, tiny_teacher_dirs):
    pol = build_policy(tiny_sd3_dir, teachers=[dict(name="gen", path=tiny_teacher_dirs["peft"])])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial student (a fresh LoRA equals the base model)
        for p in pol.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pol


@pytest.fixture(scope="module")
def embeds(policy):
    return policy.encode_prompts(PROMPTS)


def _run(policy, embeds, seeds, eta, adapter="student", keep_states=True, **kw):
    spec = Sampling(**{"num_steps": 6, "guidance_scale": 4.5, "resolution": 64, **kw}, noise_level=eta)
    return sample(policy, embeds, seeds, spec, adapter=adapter, keep_states=keep_states)


def _same(a, b):
    return torch.equal(a.latents, b.latents) and all(torch.equal(x, y) for x, y in zip(a.states, b.states))


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_rollout_is_deterministic_under_seeds(policy, embeds, eta):
    a, b = _run(policy, embeds, SEEDS, eta), _run(policy, embeds, SEEDS, eta)
    assert _same(a, b)
    assert len(a.states) == len(a.means) == len(a.stds) == len(a.log_probs) == 6 and a.sigmas.shape == (7,)
    if eta:
        assert all(torch.equal(x, y) for x, y in zip(a.log_probs, b.log_probs))
    else:
        assert all(lp is None for lp in a.log_probs)
    other = _run(policy, embeds, [11, 22, 34], eta)
    assert torch.equal(other.states[0][:2], a.states[0][:2]) and not torch.equal(other.latents[2], a.latents[2])


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_a_prompts_trajectory_does_not_depend_on_its_batch(policy, embeds, eta):
    batch = _run(policy, embeds, SEEDS, eta)
    alone = _run(policy, embeds.select([1]), SEEDS[1:2], eta)
    # The randomness is bit-identical: same initial noise...
    assert torch.equal(alone.states[0], batch.states[0][1:2])
    # ...and the rest differs only by fp32 round-off: a batch of 1 vs 3 may sum the GEMMs in
    # another order (~1e-7 relative per op); over 6 steps the drift on states of order 1-5 stays
    # below 1e-5 (measured ~1e-6), while a seeding error would show as O(1) differences.
    for x, y in zip(alone.states + [alone.latents], batch.states + [batch.latents]):
        torch.testing.assert_close(x, y[1:2], rtol=0, atol=1e-4)
    if eta:
        # log-densities sum ~1000 terms of order 1: relative round-off ~1e-6
        for x, y in zip(alone.log_probs, batch.log_probs):
            torch.testing.assert_close(x, y[1:2], rtol=1e-5, atol=1e-3)


def test_sde_noise_comes_from_each_samples_cpu_generator(policy, embeds):
    traj = _run(policy, embeds, SEEDS, 0.7)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    draw = lambda: torch.stack([torch.randn(16, 8, 8, generator=g) for g in gens])  # noqa: E731
    assert torch.equal(traj.states[0], draw())  # x_1 = pure noise
    sigmas = sd3_sigmas(6, policy.scheduler_shift)
    for j in range(6):
        eps = draw()
        nxt = traj.states[j + 1] if j + 1 < 6 else traj.latents
        # std_j = eta sqrt(sigma / (1 - sigma)) sqrt(-dt); at sigma = 1 the fraction uses sigma_next
        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        std = 0.7 * (s / (1 - (s_next if j == 0 else s))) ** 0.5 * (s - s_next) ** 0.5
        torch.testing.assert_close(traj.stds[j].flatten(), torch.tensor([std]), rtol=1e-5, atol=0)
        torch.testing.assert_close(nxt, traj.means[j] + traj.stds[j] * eps, rtol=0, atol=1e-6)
        torch.testing.assert_close(traj.log_probs[j], gaussian_log_prob(nxt, traj.means[j], traj.stds[j]),
                                   rtol=1e-6, atol=1e-4)


def _family_policy(tiny_family, **kwargs):
    pol = tiny_family.build(teachers=[dict(name="gen", path=tiny_family.teachers["peft"])], **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial student (a fresh LoRA equals the base model)
        for p in pol.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return pol


# SD3: 10 steps with CFG 4.5; FLUX: 4 steps with the guidance embedding at 3.5 (FluxPipeline's
# guidance_scale), and true CFG 4.5 against the empty prompt (its true_cfg_scale) with the embedding at 1.
# Qwen-Image: 4 steps of true CFG 4.5 (true_cfg_scale, its norm rescale) against the empty negative
# prompt; FLUX.2: 4 steps, embedded guidance 2.5; Wan: 4 steps, CFG 4.5, 5 frames.
@pytest.mark.parametrize("true_cfg", [False, True])
def test_ode_rollout_reproduces_the_diffusers_pipeline(tiny_family, true_cfg):
    cfg_only = tiny_family.family in ("sd3", "qwen_image", "wan")
    if true_cfg != cfg_only and tiny_family.name != "flux":
        pytest.skip("one guidance kind per family; FLUX.1 is checked with both")
    policy = _family_policy(tiny_family, **({"guidance": "true_cfg"} if tiny_family.name == "flux" and true_cfg else {}))
    steps, g = (10, 4.5) if tiny_family.name == "sd3" else (4, 4.5 if true_cfg else 3.5)
    g = 2.5 if tiny_family.name == "flux2" else g
    embeds = policy.encode_prompts(PROMPTS)
    traj = _run(policy, embeds, SEEDS, 0.0, num_steps=steps, guidance_scale=g)
    assert torch.equal(traj.sigmas, policy.sigmas(steps, 64).float())
    pipe = tiny_family.pipeline_class.from_pretrained(tiny_family.dir, **tiny_family.denoisers(policy.transformer))
    pipe.set_progress_bar_config(disable=True)
    kw = tiny_family.pipeline_kwargs(g)
    if tiny_family.name == "flux" and true_cfg:
        kw = dict(true_cfg_scale=g, negative_prompt="", guidance_scale=1.0)
    out = pipe(prompt=PROMPTS, height=64, width=64, num_inference_steps=steps, max_sequence_length=128,
               generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent", **kw)
    latents = out.frames if tiny_family.num_frames else out.images
    ours = tiny_family.to_pipeline_latents(traj.latents)  # FLUX / Qwen-Image / FLUX.2 return packed tokens
    # Same noise, schedule, guidance and Euler update; only float32 rounding differs (the
    # pipeline's float32 sigmas vs our float64 ones cast to float32, and FLUX's timestep
    # 1000 sigma / 1000) and the order of a few fp32 sums (CFG batches, Qwen-Image's masked padding):
    # measured max |diff| 1.2e-6 (SD3, CFG), 3.6e-7 (FLUX, embedded guidance), 2.6e-6 (FLUX,
    # true CFG x 4.5), 1.4e-6 (Qwen-Image), 0 (FLUX.2), 2.9e-6 (Wan), 2.3e-6 (Wan 2.2's two experts,
    # CFG 4.5 / guidance_scale_2 3.0) on latents of order 1-5; a wrong shift, packing or guidance
    # shows as O(0.1-1) (Wan 2.2: guidance_scale_2 ignored 0.025, the high-noise expert throughout 3.1).
    print(f"{tiny_family.name} true_cfg={true_cfg}: max |rollout - pipeline| = {(ours - latents).abs().max():.3g}")
    torch.testing.assert_close(ours, latents, rtol=0, atol=1e-5)
    teacher = _run(policy, embeds, SEEDS, 0.0, num_steps=steps, guidance_scale=g, adapter="gen")
    assert (teacher.latents - traj.latents).abs().max() > 0.1


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_rollout_yields_its_grad_steps(policy, embeds, eta):
    """The fused training loop: the caller's body (loss + backward) runs at each yielded step."""
    params = policy.trainable_parameters()
    spec = Sampling(num_steps=6, noise_level=eta, guidance_scale=4.5, resolution=64)

    def loss_fn(step):
        """Paper eq. 11/12: per-step KL between the student's and the teacher's Gaussian kernels."""
        v_t = policy.velocity(step.x, step.sigma, embeds, "gen", 1.0)
        mean_t, std = transition_mean_std(v_t, step.x, step.sigma, step.sigma_next, eta)
        diff = (step.result.mean - mean_t).square().flatten(1).sum(1)
        return (diff / (2 * std.flatten() ** 2) if eta else 0.5 * diff).mean()

    for p in params:
        p.grad = None
    steps = (1, 3, 4)
    traj, calls = Trajectory(), []
    for step in rollout_steps(policy, embeds, SEEDS, spec, grad_steps=steps, out=traj):
        calls.append(step.index)
        assert step.result.mean.requires_grad and not step.x.requires_grad
        loss_fn(step).backward()
    assert calls == list(steps)
    online = [p.grad.clone() for p in params]
    assert sum(g.abs().sum() for g in online) > 0
    # The loop body changes nothing in the trajectory (no optimizer step in between)...
    assert torch.equal(traj.latents, _run(policy, embeds, SEEDS, eta).latents)
    # ...and its gradient equals replaying the steps afterwards on the stored states.
    for p in params:
        p.grad = None
    stored = sample(policy, embeds, SEEDS, spec, keep_states=True)
    replayed = []
    for step in replay_steps(policy, stored, embeds, spec, steps):
        replayed.append(step.index)
        torch.testing.assert_close(step.result.prev_sample, stored.next_state(step.index), rtol=0, atol=0)
        loss_fn(step).backward()
    assert replayed == list(steps)
    for g_online, p in zip(online, params):
        torch.testing.assert_close(p.grad, g_online, rtol=1e-6, atol=1e-9)
    # Without grad steps the rollout runs fully without grad.
    for p in params:
        p.grad = None
    sample(policy, embeds, SEEDS, spec)
    assert all(p.grad is None for p in params)


def test_rollout_options_and_errors(policy, embeds):
    traj = _run(policy, embeds, SEEDS, 0.7, keep_states=False, shift=1.0)
    assert traj.states == [] and len(traj.means) == 6
    assert torch.allclose(traj.sigmas, sd3_sigmas(6, 1.0).float())
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        _run(policy, embeds, SEEDS[:2], 0.0)
    spec = Sampling(num_steps=6, noise_level=0.0, guidance_scale=4.5, resolution=64)
    with pytest.raises(ValueError, match=r"train_steps must lie in \[0, 6\)"):
        next(rollout_steps(policy, embeds, SEEDS, spec, grad_steps=[6]))
    with pytest.raises(ValueError, match="need the student"):
        next(rollout_steps(policy, embeds, SEEDS, spec, adapter="gen", grad_steps=[0]))
