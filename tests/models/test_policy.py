"""The policy contract on every model family's tiny random pipeline (CPU, fp32): tests that take
``tiny_family`` run once per family: SD3, FLUX.1, Qwen-Image, FLUX.2, Wan 2.1 (tests/conftest.py);
the rest check family-independent argument handling on SD3."""
import os
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_opd.models import BASE, STUDENT, PromptEmbeds, build_policy
from diffusion_opd.models.hub import HubUnavailableError
from diffusion_opd.models.lora import AdapterMismatchError

PROMPTS = ["a photo of a cat", "a red car", "a sign that says \"hello\""]


def _teachers(dirs):
    return [dict(name="gen", path=dirs["peft"]), dict(name="ocr", path=dirs["diffusers"])]


def _perturb_student(policy, seed=0, std=0.1):
    """Give the student non-zero LoRA weights (a fresh one equals the base model: B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def policy(tiny_family):
    """Read-only policy: perturbed student + PEFT teacher 'gen' + diffusers teacher 'ocr'."""
    pol = tiny_family.build(teachers=_teachers(tiny_family.teachers))
    _perturb_student(pol)
    return pol


@pytest.fixture(scope="module")
def batch(policy):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, *policy.latent_shape(64), generator=gen), policy.encode_prompts(PROMPTS)


# ------------------------------------------------------------------ building and errors
@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="fp64"), "unknown dtype 'fp64'; valid: ['fp32', 'fp16', 'bf16']"),
    (dict(lora=dict(rnk=8)), "unknown student LoRA option(s) ['rnk']"),
    (dict(lora=dict(init="pissa")), "LoRA init must be one of"),
    (dict(teachers=[dict(name="student", path="x")]), "teacher name 'student' is reserved"),
    (dict(teachers=[dict(name="base", path="x")]), "teacher name 'base' is reserved"),
    (dict(teachers=[dict(name="a", path="x"), dict(name="a", path="y")]), "duplicate teacher name 'a'"),
    (dict(teachers=[dict(name="a", path="x", kind="full")]), "unknown kind 'full'; valid: ['lora', 'transformer']"),
    (dict(teachers=[dict(name="a", path="x", scale=2)]), "teacher #0: unknown key(s) ['scale']"),
    (dict(teachers=[dict(name="a")]), "teacher 'a': 'path'"),
])
def test_bad_arguments_fail_before_any_loading(kwargs, message):
    # The model path does not exist: the argument error must come first, before any loading.
    with pytest.raises((ValueError, TypeError)) as err:
        build_policy("/nonexistent/sd3-folder", **kwargs)
    assert message in str(err.value)


def test_unreachable_hub_model_says_which_id_and_how_to_fix():
    with pytest.raises(HubUnavailableError) as err:
        build_policy("diffusion-opd-tests/no-such-sd3-model", revision="v1")
    msg = str(err.value)
    assert "'diffusion-opd-tests/no-such-sd3-model'" in msg and "revision v1" in msg
    assert "no weights could be fetched" in msg and "local folder" in msg


def test_missing_local_folder_is_not_mistaken_for_a_hub_id():
    with pytest.raises(FileNotFoundError, match="neither an existing local folder nor a valid Hub id"):
        build_policy("/nonexistent/sd3-folder")


def test_unreachable_hub_teacher_names_the_teacher(tiny_sd3_dir):
    teacher = dict(name="geneval", path="quanhaol/DiffusionOPD", subfolder="GenEvalTeacher/lora")
    with pytest.raises(HubUnavailableError) as err:
        build_policy(tiny_sd3_dir, teachers=[teacher])
    assert "teacher 'geneval'" in str(err.value) and "'quanhaol/DiffusionOPD'" in str(err.value)


def _broken_copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)  # (Wan 2.2: with the second expert's adapter in transformer_2/)
    path = os.path.join(dst, "adapter_model.safetensors")
    save_file(edit(load_file(path)), path)
    return str(dst)


def test_mismatched_teacher_adapter_names_teacher_and_module(tiny_family, tmp_path):
    teacher = load_file(os.path.join(tiny_family.teachers["peft"], "adapter_model.safetensors"))
    # the last adapted block's key projection (image stream, or text stream for Qwen-Image's teachers)
    key = sorted(k for k in teacher if re.search(r"\.(to_k|add_k_proj)\.lora_A", k))[-1]
    module = key[len("base_model.model."):-len(".lora_A.weight")]
    missing = re.sub(r"\.\d+\.", ".7.", module, count=1)  # a block the tiny transformer does not have
    linear = f"Linear({teacher[key].shape[1]} -> {teacher[key.replace('lora_A', 'lora_B')].shape[0]})"

    def rename(sd):
        sd = dict(sd)
        for ab in ("lora_A", "lora_B"):
            sd[f"base_model.model.{missing}.{ab}.weight"] = sd.pop(key.replace("lora_A", ab))
        return sd

    def widen(sd):  # an adapter made for a wider backbone
        sd = dict(sd)
        sd[key] = torch.zeros(sd[key].shape[0], 48)
        return sd

    prefix = tiny_family.module_prefix  # the top-level file adapts the (first) transformer
    for name, edit, detail in [("missing", rename, f"{prefix}{missing}' does not exist"),
                               ("wide", widen, f"{prefix}{module}' is {linear}")]:
        folder = _broken_copy(tiny_family.teachers["peft"], tmp_path / name, edit)
        with pytest.raises(AdapterMismatchError) as err:
            tiny_family.build(teachers=[dict(name=f"t_{name}", path=folder)])
        assert f"teacher 't_{name}'" in str(err.value) and detail in str(err.value)


def test_folder_without_adapter_weights_lists_what_it_expected(tiny_sd3_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*pytorch_lora_weights.safetensors"):
        build_policy(tiny_sd3_dir, teachers=[dict(name="t", path=str(tmp_path))])


# ------------------------------------------------------------------ prompts
def test_prompt_embeddings_are_cached_and_match_the_pipeline(tiny_family):
    import logging

    pol = tiny_family.build(max_sequence_length=32, max_cached_prompts=2)
    records = []
    listener = logging.Handler()
    listener.emit = records.append
    logging.getLogger("transformers").addHandler(listener)
    t5_calls = []
    getattr(pol._text_pipeline(), tiny_family.t5).register_forward_hook(
        lambda m, a, k, o: t5_calls.append((a[0] if a else k["input_ids"]).shape[0]), with_kwargs=True)
    first = pol.encode_prompts(PROMPTS[:2])
    # the two prompts and the empty prompt, each in its own forward (batch-invariant embeddings)
    assert t5_calls == [1, 1, 1]
    again = pol.encode_prompts([PROMPTS[1], PROMPTS[2], PROMPTS[1]])
    assert t5_calls == [1] * 4  # only the new prompt is encoded
    assert torch.equal(again.cond["prompt_embeds"][0], first.cond["prompt_embeds"][1])
    assert torch.equal(again.cond["prompt_embeds"][2], first.cond["prompt_embeds"][1])
    pol.encode_prompts([PROMPTS[1]])
    assert t5_calls == [1] * 4  # still cached
    evicted = pol.encode_prompts([PROMPTS[0]])
    assert t5_calls == [1] * 5  # the least recently used prompt was evicted (cache of 2)
    # re-encoded in another company, the embedding is bit-identical (what exact resume relies on)
    assert torch.equal(evicted.cond["prompt_embeds"][0], first.cond["prompt_embeds"][0])
    # FLUX.2's processor: transformers' warning about the pipeline's legacy keyword arguments is
    # dropped (models/flux2.py), not printed at every encode
    logging.getLogger("transformers").removeHandler(listener)
    assert not [r for r in records if "processor_kwargs" in r.getMessage()]
    tokens = 77 + 32 if tiny_family.name == "sd3" else 32  # SD3 puts CLIP's 77 tokens before T5's; the others one encoder
    assert first.cond["prompt_embeds"].shape[:2] == (2, tokens) and first.uncond["prompt_embeds"].shape[:2] == (1, tokens)

    pipe = tiny_family.pipeline_class.from_pretrained(tiny_family.dir, transformer=None, vae=None)
    ref = tiny_family.reference_encode(pipe, PROMPTS[:2], 32)
    neg = tiny_family.reference_encode(pipe, [""], 32)
    # The pipeline encodes 2 rows in one batch where we encoded 1 at a time: the encoders' fp32
    # GEMMs may sum in another order, ~1e-7 relative on values of order 1.
    tol = dict(rtol=0, atol=1e-5)
    assert set(ref) == set(first.cond) == set(first.uncond)
    for key in ref:
        torch.testing.assert_close(first.cond[key], ref[key].to(first.cond[key].dtype), **tol)
        torch.testing.assert_close(first.uncond[key], neg[key][:1].to(first.cond[key].dtype), **tol)
    assert pol._vae is None  # no image was needed, so the VAE was never loaded


# ------------------------------------------------------------------ velocities
def test_velocity_is_the_transformer_called_as_the_pipeline_calls_it(policy, batch, tiny_family):
    x, embeds = batch
    g = tiny_family.guidance  # SD3: 1 (no CFG); FLUX: 3.5 into the guidance embedding, one forward
    v = policy.velocity(x, 0.6, embeds, STUDENT, guidance_scale=g)
    with torch.no_grad():
        ref = tiny_family.reference_forward(policy.transformer, x, 0.6, embeds.cond, g)
    assert torch.equal(v, ref)
    if tiny_family.name in ("flux", "flux2"):  # the embedding really gets the scale
        assert _rel(policy.velocity(x, 0.6, embeds, STUDENT, 1.0), v) > 0.01
    # a per-sample sigma tensor: row i equals the call with that row's float sigma
    sig = torch.tensor([0.9, 0.5, 0.1])
    v_rows = policy.velocity(x, sig, embeds, STUDENT, 4.5)
    for i in range(3):
        vi = policy.velocity(x[i:i + 1], sig[i].item(), embeds.select([i]), STUDENT, 4.5)
        # batch 1 vs batch 3 GEMMs may sum in another order: fp32 round-off only (|v| ~ 3)
        torch.testing.assert_close(v_rows[i:i + 1], vi, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def cfg_policy(policy, tiny_family):
    """The policy with classifier-free guidance (FLUX: true CFG, embedding fixed at 1)."""
    if tiny_family.name == "sd3":
        return policy
    pol = tiny_family.build(teachers=_teachers(tiny_family.teachers), guidance="true_cfg")
    pol.load_student_state_dict(policy.student_state_dict())
    return pol


def test_batched_cfg_equals_two_separate_forwards(cfg_policy, batch):
    policy, (x, embeds) = cfg_policy, batch
    g = 4.5
    uncond = PromptEmbeds(PROMPTS, {k: v.expand(3, *v.shape[1:]) for k, v in embeds.uncond.items()}, embeds.uncond)
    for adapter in (STUDENT, "gen", "ocr", BASE):
        v = policy.velocity(x, 0.7, embeds, adapter, guidance_scale=g)
        v_c = policy.velocity(x, 0.7, embeds, adapter, guidance_scale=1.0)
        v_u = policy.velocity(x, 0.7, uncond, adapter, guidance_scale=1.0)
        # fp32: one batch of 6 vs two of 3 may change GEMM summation order (~1e-7 relative per
        # GEMM; through a whole denoiser up to ~1e-6 relative, i.e. ~3e-6 on |v| <= 3);
        # v_u + g (v_c - v_u) amplifies that by at most 2g + 1 = 10 -> 3e-5. (Wan's 3-D stack
        # reached 1.3e-5 in a full-suite run; a wrong combine is off by >= 1% of |v|, ~1e-2.)
        # (Qwen-Image rescales v_u + g (v_c - v_u) per token to |v_c|: its pipeline's combination,
        # checked against QwenImagePipeline in test_rollout)
        # (Wan 2.2: rows of the low-noise expert at its own scale, guidance_scale_2)
        scale = policy._cfg_scale(g, torch.full((3,), 0.7))
        torch.testing.assert_close(v, policy._guided(v_u, v_c, scale), rtol=0, atol=3e-5)
        assert _rel(v, v_c) > 0.01  # guidance really changes the velocity


def test_student_and_teachers_predict_different_velocities(tiny_family, batch):
    x, _ = batch
    pol = tiny_family.build(teachers=_teachers(tiny_family.teachers))
    embeds = batch[1]  # same pipeline folder, same text embeddings
    v = {a: pol.velocity(x, 0.5, embeds, a, 1.0) for a in (STUDENT, BASE, "gen", "ocr")}
    assert torch.equal(v[STUDENT], v[BASE])  # fresh student LoRA: B = 0, exactly the base model
    for t in ("gen", "ocr"):
        # the random teachers move the velocity by ~30% (Qwen-Image's, on its text stream only, by
        # ~8%: models/tiny.py, _TEACHER_TARGETS); a teacher that is not applied moves it by 0
        assert _rel(v[t], v[BASE]) > 0.05, t
    assert _rel(v["gen"], v["ocr"]) > 0.05


def test_teacher_formats_match_reference_loaders(policy, batch, tiny_family):
    """Our PEFT / diffusers readers give the velocities of peft's and diffusers' own loaders."""
    x, embeds = batch
    g = tiny_family.guidance
    pipe = tiny_family.pipeline_class.from_pretrained(tiny_family.dir, **tiny_family.no_text_kwargs())
    peft_ref = tiny_family.peft_reference(tiny_family.teachers["peft"])
    tiny_family.load_lora(pipe, tiny_family.teachers["diffusers"])
    with torch.no_grad():
        refs = {name: tiny_family.reference_forward(model, x, 0.3, embeds.cond, g)
                for name, model in (("gen", peft_ref), ("ocr", tiny_family.reference_holder(pipe)))}
    for name, ref in refs.items():
        # same modules and weights; only the order of a few fp32 additions may differ
        torch.testing.assert_close(policy.velocity(x, 0.3, embeds, name, g), ref, rtol=0, atol=1e-5)


def test_full_transformer_teacher(tiny_family, tmp_path, batch):
    import diffusers

    if tiny_family.name == "wan22":
        pytest.skip("refused for two experts in one line (test_wan.py::test_wan22_only_settings_are_refused_in_one_line)")
    x, _ = batch
    cls = getattr(diffusers, tiny_family.transformer_class)
    full = cls.from_pretrained(tiny_family.dir, subfolder="transformer")
    with torch.no_grad():
        for p in full.parameters():
            p.mul_(1.05)
    full.save_pretrained(tmp_path / "full")
    pol = tiny_family.build(teachers=[dict(name="aes", path=str(tmp_path / "full"), kind="transformer")])
    embeds, g = batch[1], tiny_family.guidance  # same pipeline folder, same text embeddings
    v = pol.velocity(x, 0.4, embeds, "aes", g)
    with torch.no_grad():
        ref = tiny_family.reference_forward(full, x, 0.4, embeds.cond, g)
    assert torch.equal(v, ref) and _rel(v, pol.velocity(x, 0.4, embeds, BASE, g)) > 0.01
    trainable = {id(p) for p in pol.trainable_parameters()}
    assert trainable == {id(p) for m in (pol.transformer,) for p in m.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in pol._full_teachers["aes"].parameters())

    narrow = cls.from_config({**full.config, tiny_family.text_width_key: 40})
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(AdapterMismatchError, match=f"teacher 'bad'.*{tiny_family.text_width_key}=40"):
        tiny_family.build(teachers=[dict(name="bad", path=str(tmp_path / "narrow"), kind="transformer")])


def test_velocity_rejects_unknown_adapter(policy, batch):
    x, embeds = batch
    with pytest.raises(ValueError, match=r"unknown adapter 'aesthetic'; valid: \['student', 'base', 'gen', 'ocr'\]"):
        policy.velocity(x, 0.5, embeds, "aesthetic")


# ------------------------------------------------------------------ training invariants
def _student_names(pol):
    return {n for n, p in pol.transformer.named_parameters() if p.requires_grad}


def test_random_adapter_switches_leave_only_the_student_trainable(policy, batch):
    x, embeds = batch
    expected = {n for n, _ in policy.transformer.named_parameters()
                if ".lora_A.student." in n or ".lora_B.student." in n}
    assert _student_names(policy) == expected and len(expected) == len(policy.trainable_parameters())
    # 100 switches through the public velocity(); a 2x2 latent (one patch) and 8 text tokens keep
    # each forward cheap; the adapter machinery is the same at any size.
    small = embeds.select([0])
    tokens = ("prompt_embeds", "prompt_embeds_mask")  # per-token tensors (Qwen-Image has a token mask)
    small = PromptEmbeds(small.prompts, {k: v[:, :8] if k in tokens else v for k, v in small.cond.items()},
                         {k: v[:, :8] if k in tokens else v for k, v in small.uncond.items()})
    rng = random.Random(0)
    for _ in range(100):
        adapter = rng.choice([STUDENT, BASE, "gen", "ocr"])
        with torch.set_grad_enabled(rng.random() < 0.5):
            policy.velocity(x[:1, ..., :2, :2], rng.random(), small, adapter, rng.choice([1.0, 4.5]))
    assert _student_names(policy) == expected
    requiring_grad = {id(p) for p in policy.transformer.parameters() if p.requires_grad}
    assert {id(p) for p in policy.trainable_parameters()} == requiring_grad
    layers = policy._switch.layers
    assert all(layer.active_adapters == [STUDENT] and not layer.disable_adapters for layer in layers)
    # the student is active again: a plain transformer call is the student
    v = policy.velocity(x, 0.5, embeds, STUDENT, 1.0)
    assert _rel(v, policy.velocity(x, 0.5, embeds, BASE, 1.0)) > 1e-3


def _grad(p):
    """A parameter's gradient (zeros when no graph reached it: a LoRA on an output nothing uses)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_teacher_forward_leaves_student_grad_bit_identical(tiny_family, batch, checkpointing):
    x = batch[0][..., :4, :4]  # 32 px: the gradient bookkeeping does not depend on the size
    pol = tiny_family.build(teachers=_teachers(tiny_family.teachers), gradient_checkpointing=checkpointing)
    _perturb_student(pol)
    embeds = batch[1]  # same pipeline folder, same text embeddings
    params = pol.trainable_parameters()

    def student_loss():
        return pol.velocity(x, 0.5, embeds, STUDENT, 4.5).square().mean()

    student_loss().backward()
    grads = [_grad(p) for p in params]
    # every LoRA matrix gets a gradient except, in SD3, the last block's add_q_proj A and B: that
    # block is context_pre_only, so its text-token queries feed no output; Qwen-Image: the last
    # block's text-stream output (to_add_out) feeds nothing, nor its text queries (add_q_proj);
    # FLUX / FLUX.2 / Wan: none unused
    assert sum(bool(g.abs().sum() > 0) for g in grads) == len(grads) - tiny_family.dead_lora_matrices
    with torch.no_grad():
        for adapter in ("gen", "ocr", BASE):
            pol.velocity(x, 0.5, embeds, adapter, 4.5)
    assert all(torch.equal(_grad(p), g) for p, g in zip(params, grads))

    # A teacher forward between the student's forward and its backward (the fused training step;
    # with checkpointing the backward re-runs the student forward) gives the same gradient.
    for p in params:
        p.grad = None
    loss = student_loss()
    with torch.no_grad():
        pol.velocity(x, 0.5, embeds, "gen", 4.5)
    loss.backward()
    assert all(torch.equal(_grad(p), g) for p, g in zip(params, grads))


def test_grad_forwards_go_through_the_wrapped_student_module(tiny_family, batch):
    class Wrapper(torch.nn.Module):  # stands in for DDP: a module that forwards to the transformer
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.inner(**kwargs)

    x = batch[0][..., :4, :4]
    pol = tiny_family.build()
    embeds = batch[1]  # same pipeline folder, same text embeddings
    wrapper = Wrapper(pol.transformer)
    pol.set_student_module(wrapper)
    pol.velocity(x, 0.5, embeds, STUDENT, 4.5).sum().backward()
    assert wrapper.calls == 1
    with torch.no_grad():
        pol.velocity(x, 0.5, embeds, STUDENT, 4.5)
    pol.velocity(x, 0.5, embeds, BASE, 4.5)
    assert wrapper.calls == 1  # no-grad and non-student forwards use the raw module


# ------------------------------------------------------------------ saving
def _images(pipe, family, seeds=(1, 2, 3)):
    """The family pipeline's images (Wan: videos) for PROMPTS, 4 steps at guidance 4.5."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt=PROMPTS, height=64, width=64, num_inference_steps=4, max_sequence_length=128, generator=gens,
               output_type="np", **family.pipeline_kwargs(4.5))
    return out.frames if family.num_frames else out.images


def test_saved_student_loads_in_a_fresh_pipeline_with_identical_images(policy, tiny_family, tmp_path):
    pipeline, folder = tiny_family.pipeline_class, tiny_family.dir
    policy.save_student(str(tmp_path / "lora"))
    assert sorted(os.listdir(tmp_path / "lora")) == tiny_family.lora_files()
    fresh = pipeline.from_pretrained(folder)
    tiny_family.load_lora(fresh, str(tmp_path / "lora"))  # StableDiffusion3Pipeline / FluxPipeline's own loader
    ours = pipeline.from_pretrained(folder, **tiny_family.denoisers(policy.transformer))
    expected = _images(ours, tiny_family)
    assert np.array_equal(_images(fresh, tiny_family), expected)
    fresh.disable_lora()  # the LoRA really matters: without it the images differ (pixels in [0, 1];
    assert np.abs(_images(fresh, tiny_family) - expected).max() > 0.01  # measured 0.02 (Qwen-Image) to > 0.05)

    # An explicit state (e.g. the EMA) is what gets written.
    state = {k: v * 0.5 for k, v in policy.student_state_dict().items()}
    policy.save_student(str(tmp_path / "ema"), state=state)
    other = pipeline.from_pretrained(folder, **tiny_family.no_text_kwargs())
    tiny_family.load_lora(other, str(tmp_path / "ema"), adapter_name="ema")
    loaded = tiny_family.lora_state(other, "ema")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    for name in tiny_family.experts:  # every expert: alpha travels in the metadata
        assert getattr(other, name).peft_config["ema"].lora_alpha == 64

    # Merged into a full pipeline folder: the same images up to the round-off of W + s B A.
    policy.save_merged_pipeline(str(tmp_path / "merged"))
    merged = pipeline.from_pretrained(str(tmp_path / "merged"))
    np.testing.assert_allclose(_images(merged, tiny_family), expected, rtol=0, atol=1e-4)


def test_student_state_dict_round_trip(tiny_family, batch):
    x, _ = batch
    pol = tiny_family.build(lora=dict(rank=4, alpha=8))
    embeds = batch[1]  # same pipeline folder, same text embeddings
    state = pol.student_state_dict()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert all(v.shape[0] == 4 for k, v in state.items() if "lora_A" in k)
    v0 = pol.velocity(x, 0.5, embeds)
    for v in state.values():
        v.add_(1.0)  # clones: editing them does not touch the model
    assert torch.equal(pol.velocity(x, 0.5, embeds), v0)
    params = pol.trainable_parameters()
    pol.load_student_state_dict(state)
    assert pol.trainable_parameters() == params  # loaded in place: optimizers keep their tensors
    assert _rel(pol.velocity(x, 0.5, embeds), v0) > 0.01
    assert all(torch.equal(pol.student_state_dict()[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="student state dict mismatch: missing"):
        pol.load_student_state_dict({k: v for k, v in list(state.items())[1:]})


def test_latent_shape_and_decode(policy, tiny_family):
    latent = tiny_family.latent
    assert policy.latent_shape(64) == latent and policy.latent_shape(512) == (*latent[:-2], latent[-2] * 8, latent[-1] * 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        policy.latent_shape(72)
    if tiny_family.name == "sd3":
        with pytest.raises(ValueError, match="exceeds"):
            policy.latent_shape(1024)  # pos_embed_max_size 32 patches x 2 x 8 = 512 px
    else:  # rotary positions: any size
        assert policy.latent_shape(1024)[-2:] == (latent[-2] * 16, latent[-1] * 16)
    latents = torch.randn(2, *latent, generator=torch.Generator().manual_seed(0))
    images = policy.decode(latents)
    pt = policy.decode(latents, output_type="pt")
    if tiny_family.num_frames:  # a video: one list of frames per sample, (B, F, 3, H, W) tensors
        assert len(images) == 2 and len(images[0]) == tiny_family.num_frames and images[0][0].size == (64, 64)
        assert pt.shape == (2, tiny_family.num_frames, 3, 64, 64)
        images, pt = images[0], pt[0]
    else:
        assert len(images) == 2 and images[0].size == (64, 64)
        assert pt.shape == (2, 3, 64, 64)
    assert 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_allclose(np.asarray(images[0]) / 255.0, pt[0].permute(1, 2, 0).numpy(), atol=1 / 255 + 1e-6)


def test_teacher_from_a_repo_layout_subfolder_and_weight_name(tiny_family, tmp_path, batch):
    import shutil

    x, _ = batch
    # The layout of quanhaol/DiffusionOPD: <repo>/GenEvalTeacher/lora/<PEFT files>
    shutil.copytree(tiny_family.teachers["peft"], tmp_path / "repo" / "GenEvalTeacher" / "lora")
    for sub in ("", *tiny_family.experts[1:]):  # Wan 2.2: the low-noise expert's file under the same name
        os.makedirs(tmp_path / "repo" / sub, exist_ok=True)
        shutil.copy(os.path.join(tiny_family.teachers["diffusers"], sub, "pytorch_lora_weights.safetensors"),
                    tmp_path / "repo" / sub / "ocr_step_900.safetensors")
    pol = tiny_family.build(teachers=[
        dict(name="gen", path=str(tmp_path / "repo"), subfolder="GenEvalTeacher/lora"),
        dict(name="ocr", path=str(tmp_path / "repo"), weight_name="ocr_step_900.safetensors")])
    ref = tiny_family.build(teachers=_teachers(tiny_family.teachers))
    embeds = batch[1]
    for name in ("gen", "ocr"):
        assert torch.equal(pol.velocity(x, 0.5, embeds, name), ref.velocity(x, 0.5, embeds, name))
    with pytest.raises(FileNotFoundError, match="has no subfolder 'AesTeacher/lora'"):
        build_policy(tiny_family.dir,
                     teachers=[dict(name="aes", path=str(tmp_path / "repo"), subfolder="AesTeacher/lora")])


def test_half_precision_backbone_keeps_an_fp32_student(tiny_family, batch):
    x, _ = batch
    velocities = {}
    for dtype in ("fp32", "bf16"):
        pol = tiny_family.build(dtype=dtype, teachers=_teachers(tiny_family.teachers))
        _perturb_student(pol)
        embeds = pol.encode_prompts(PROMPTS)
        assert embeds.cond["prompt_embeds"].dtype == pol.dtype
        assert {p.dtype for p in pol.trainable_parameters()} == {torch.float32}  # AdamW needs fp32 weights
        v = pol.velocity(x, 0.5, embeds, STUDENT, 4.5)
        v.square().mean().backward()
        assert v.dtype == torch.float32 and all(_grad(p).dtype == torch.float32 for p in pol.trainable_parameters())
        velocities[dtype] = (v.detach(), pol.velocity(x, 0.5, embeds, "gen", 4.5))
    for i in range(2):
        # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); through two blocks and CFG (x 8)
        # the error is a few percent (measured 3%), far below the ~30% student / teacher gap.
        assert _rel(velocities["bf16"][i], velocities["fp32"][i]) < 0.08
