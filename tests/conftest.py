"""Shared fixtures: a tiny random SD3 pipeline folder and random teacher adapters for it.

Built once per test session in a temporary folder (about a second), offline. Other test files
reuse them:

- ``tiny_sd3_dir``: path of a complete StableDiffusion3Pipeline folder
  (:func:`diffusion_opd.models.tiny.build_tiny_sd3`, seed 0; 64 px images -> 16x8x8 latents).
- ``tiny_teacher_dirs``: ``{"peft": dir, "diffusers": dir}``, two different random teacher
  LoRAs for it, one per on-disk format (:func:`~diffusion_opd.models.tiny.write_random_teacher_lora`).
- ``tiny_flux_dir`` / ``tiny_flux_teacher_dirs``: the same for a tiny random FluxPipeline.
- ``tiny_family``: parametrised over the model families ("sd3", "flux", "qwen_image", "flux2",
  "wan", and "wan22": Wan 2.2 A14B's two experts, for the contracts listed in
  :data:`WAN22_CONTRACTS`): a :class:`TinyFamily`
  with the folder, its teachers and how the family's own pipeline calls its transformer, so
  one test states a contract for every family.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

# Nothing in the test suite may reach the Hub (set before huggingface_hub reads it at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _teacher_dirs(pipeline_dir: str, root) -> dict:
    """Random teacher LoRA folders for a tiny pipeline, in both formats: {"peft": ..., "diffusers": ...}."""
    from diffusion_opd.models.tiny import write_random_teacher_lora

    return {
        fmt: write_random_teacher_lora(pipeline_dir, str(root / fmt), seed=seed, fmt=fmt)
        for seed, fmt in enumerate(("peft", "diffusers"), start=1)
    }


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> str:
    """A random tiny SD3 pipeline folder (every component of the real pipeline)."""
    from diffusion_opd.models.tiny import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")), seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dirs(tiny_sd3_dir, tmp_path_factory) -> dict:
    return _teacher_dirs(tiny_sd3_dir, tmp_path_factory.mktemp("tiny_teachers"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    """A random tiny FLUX.1 pipeline folder (CLIP + T5, guidance embedding, dynamic shift)."""
    from diffusion_opd.models.tiny import build_tiny_flux

    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")), seed=0)


@pytest.fixture(scope="session")
def tiny_flux_teacher_dirs(tiny_flux_dir, tmp_path_factory) -> dict:
    return _teacher_dirs(tiny_flux_dir, tmp_path_factory.mktemp("tiny_flux_teachers"))


def _tiny_family_dir(name: str, tmp_path_factory) -> str:
    from diffusion_opd.models.tiny import TINY_BUILDERS

    return TINY_BUILDERS[name](str(tmp_path_factory.mktemp(name)), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_image_dir(tmp_path_factory) -> str:
    """A random tiny Qwen-Image pipeline folder (Qwen2.5-VL text encoder, 3-D VAE, true CFG)."""
    return _tiny_family_dir("tiny-qwen-image", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux2_dir(tmp_path_factory) -> str:
    """A random tiny FLUX.2 pipeline folder (Mistral3 text encoder, guidance embedding, BN-normalised VAE)."""
    return _tiny_family_dir("tiny-flux2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> str:
    """A random tiny Wan 2.1 text-to-video pipeline folder (UMT5, 3-D DiT, video VAE)."""
    return _tiny_family_dir("tiny-wan", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_wan22_dir(tmp_path_factory) -> str:
    """A random tiny Wan 2.2 A14B pipeline folder (two experts switched at boundary_ratio 0.875)."""
    return _tiny_family_dir("tiny-wan22", tmp_path_factory)


@dataclass
class TinyFamily:
    """One model family's tiny pipeline and the facts a shared test needs about it."""

    name: str
    dir: str
    teachers: dict
    pipeline: str  # diffusers pipeline class name
    t5: str  # the pipeline attribute holding the T5 encoder
    guidance: float  # a guidance scale at which velocity() is ONE forward (no CFG branch)
    dead_lora_matrices: int  # student LoRA matrices that get no gradient at one sigma (outputs unused / expert idle)
    latent: tuple = (16, 8, 8)  # latent_shape(64)
    text_width_key: str = "joint_attention_dim"  # transformer config key of the text width (full-teacher check)
    num_frames: int = 0  # video families: frames of the policy (build_policy's num_frames)
    guidance_scale_2: float = 0.0  # Wan 2.2 A14B: the low-noise expert's CFG scale (0: the same)

    def build(self, **kwargs):
        """``build_policy`` of this family's folder (video families at ``num_frames``)."""
        from diffusion_opd.models import build_policy

        extra = {"num_frames": self.num_frames} if self.num_frames else {}
        if self.guidance_scale_2:
            extra["guidance_scale_2"] = self.guidance_scale_2
        return build_policy(self.dir, **extra, **kwargs)

    @property
    def family(self) -> str:
        """The policy family (models/specs.py): Wan 2.1 and Wan 2.2 A14B are both "wan"."""
        return "wan" if self.name == "wan22" else self.name

    @property
    def experts(self) -> tuple:
        """The pipeline's denoiser components (Wan 2.2 A14B: the high- and the low-noise expert)."""
        return ("transformer", "transformer_2") if self.name == "wan22" else ("transformer",)

    def denoisers(self, module) -> dict:
        """The pipeline's denoiser components for the policy's ``transformer`` (Wan 2.2: its two experts)."""
        return {name: getattr(module, name) for name in self.experts} if self.name == "wan22" else dict(transformer=module)

    def lora_files(self) -> list:
        """What ``save_student`` writes (Wan 2.2: the low-noise expert's adapter in a subfolder)."""
        return ["pytorch_lora_weights.safetensors"] + (["transformer_2"] if self.name == "wan22" else [])

    @property
    def module_prefix(self) -> str:
        """How the policy names a module of the (first) transformer: Wan 2.2's adapters span two experts."""
        return "transformer." if self.name == "wan22" else ""

    def reference_holder(self, pipe):
        """What :meth:`reference_forward` takes for a pipeline's denoiser(s): the transformer, or
        (Wan 2.2) the pipeline itself, whose ``transformer`` / ``transformer_2`` it picks from."""
        return pipe if self.name == "wan22" else pipe.transformer

    def peft_reference(self, adapter_dir: str):
        """peft's own loader on fresh transformer(s) of the folder (Wan 2.2: one PeftModel per expert)."""
        import types

        import diffusers
        from peft import PeftModel

        cls = getattr(diffusers, self.transformer_class)
        models = {name: PeftModel.from_pretrained(cls.from_pretrained(self.dir, subfolder=name), adapter_dir,
                                                  subfolder=None if name == "transformer" else name)
                  for name in self.experts}
        return types.SimpleNamespace(**models) if self.name == "wan22" else models["transformer"]

    def load_lora(self, pipe, folder: str, **kwargs) -> None:
        """The pipeline's own loader on a saved student (Wan 2.2: once more into ``transformer_2``)."""
        pipe.load_lora_weights(folder, **kwargs)
        if self.name == "wan22":
            pipe.load_lora_weights(folder, weight_name="transformer_2/pytorch_lora_weights.safetensors",
                                   load_into_transformer_2=True, **kwargs)

    def lora_state(self, pipe, adapter_name: str) -> dict:
        """The pipeline's LoRA weights of ``adapter_name``, named as the policy's student state."""
        from peft.utils import get_peft_model_state_dict

        if self.name != "wan22":
            return get_peft_model_state_dict(pipe.transformer, adapter_name=adapter_name)
        return {f"{expert}.{k}": v for expert in self.experts
                for k, v in get_peft_model_state_dict(getattr(pipe, expert), adapter_name=adapter_name).items()}

    def pipeline_kwargs(self, guidance: float) -> dict:
        """Keyword arguments of the family's pipeline call at ``guidance`` (CFG families: CFG with
        the empty negative prompt; guidance-distilled ones: the embedded guidance)."""
        if self.name == "qwen_image":
            return dict(true_cfg_scale=guidance, negative_prompt="")
        if self.family == "wan":
            return dict(guidance_scale=guidance, num_frames=self.num_frames,
                        **({"guidance_scale_2": self.guidance_scale_2} if self.guidance_scale_2 else {}))
        return dict(guidance_scale=guidance)

    def to_pipeline_latents(self, x):
        """Rollout latents in the layout the family's pipeline returns with output_type="latent"."""
        from diffusers import Flux2Pipeline, QwenImagePipeline

        b, c = x.shape[:2]
        if self.name in ("flux", "qwen_image"):  # packed 2x2 tokens
            return QwenImagePipeline._pack_latents(x, b, c, *x.shape[-2:])
        if self.name == "flux2":
            return Flux2Pipeline._pack_latents(x)
        return x

    @property
    def transformer_class(self) -> str:
        """The diffusers transformer class named in the folder's model_index.json."""
        import json

        with open(os.path.join(self.dir, "model_index.json")) as f:
            return json.load(f)["transformer"][1]

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    def no_text_kwargs(self) -> dict:
        """from_pretrained kwargs that skip the text encoders and the VAE."""
        names = {"sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
                 "flux": ("text_encoder", "text_encoder_2")}.get(self.name, ("text_encoder",))
        return {n: None for n in names + ("vae",)}

    def reference_encode(self, pipe, prompts, max_sequence_length) -> dict:
        """The text conditioning exactly as the family's pipeline computes it, keyed as the policy's
        (Qwen-Image: the pipeline's embeddings zero-padded to ``max_sequence_length`` with its token mask)."""
        if self.name == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=max_sequence_length)
            return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}
        if self.name == "flux":
            emb, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=max_sequence_length)
            return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}
        if self.name == "qwen_image":
            emb, mask = pipe.encode_prompt(prompts, max_sequence_length=max_sequence_length)
            mask = torch.ones(emb.shape[:2]) if mask is None else mask.float()
            pad = max_sequence_length - emb.shape[1]
            return {"prompt_embeds": torch.nn.functional.pad(emb, (0, 0, 0, pad)),
                    "prompt_embeds_mask": torch.nn.functional.pad(mask, (0, pad))}
        if self.name == "flux2":
            return {"prompt_embeds": pipe.encode_prompt(prompts, max_sequence_length=max_sequence_length)[0]}
        return {"prompt_embeds": pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                    max_sequence_length=max_sequence_length)[0]}

    def reference_forward(self, transformer, x, sigma: float, cond: dict, guidance: float):
        """The transformer called the way the family's pipeline calls it (SD3: timestep 1000 sigma;
        FLUX: diffusers' own packing and position ids, timestep sigma, guidance embedding)."""
        b = x.shape[0]
        if self.name == "sd3":
            return transformer(hidden_states=x, timestep=torch.full((b,), 1000.0 * sigma),
                               encoder_hidden_states=cond["prompt_embeds"],
                               pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        if self.name == "wan22":  # the expert WanPipeline runs at this timestep
            from diffusion_opd.models.tiny import WAN22_BOUNDARY_RATIO

            expert = "transformer" if sigma >= WAN22_BOUNDARY_RATIO else "transformer_2"
            transformer = getattr(transformer, expert, transformer)
        if self.family == "wan":
            return transformer(hidden_states=x, timestep=torch.full((b,), 1000.0 * sigma),
                               encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]
        from diffusers import Flux2Pipeline, FluxPipeline, QwenImagePipeline

        _, c, h, w = x.shape
        text = cond["prompt_embeds"]
        if self.name == "qwen_image":
            out = transformer(hidden_states=QwenImagePipeline._pack_latents(x, b, c, h, w),
                              timestep=torch.full((b,), sigma), encoder_hidden_states=text,
                              encoder_hidden_states_mask=cond["prompt_embeds_mask"].long(),
                              img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
            return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]
        if self.name == "flux2":
            ids = Flux2Pipeline._prepare_latent_ids(x)
            out = transformer(hidden_states=Flux2Pipeline._pack_latents(x), timestep=torch.full((b,), sigma),
                              guidance=torch.full((b,), guidance), encoder_hidden_states=text,
                              txt_ids=Flux2Pipeline._prepare_text_ids(text), img_ids=ids, return_dict=False)[0]
            return Flux2Pipeline._unpack_latents_with_ids(out, ids)
        out = transformer(
            hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=torch.full((b,), sigma),
            guidance=torch.full((b,), guidance) if transformer.config.guidance_embeds else None,
            pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3), img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
            return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


FAMILY_NAMES = ["sd3", "flux", "qwen_image", "flux2", "wan", "wan22"]


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def tiny_family(request, tmp_path_factory) -> TinyFamily:
    """The tiny pipeline of each model family in turn (shared, built once per session)."""
    name = request.param
    if name == "sd3":
        return TinyFamily("sd3", request.getfixturevalue("tiny_sd3_dir"), request.getfixturevalue("tiny_teacher_dirs"),
                          "StableDiffusion3Pipeline", "text_encoder_3", guidance=1.0, dead_lora_matrices=2)
    if name == "flux":
        return TinyFamily("flux", request.getfixturevalue("tiny_flux_dir"),
                          request.getfixturevalue("tiny_flux_teacher_dirs"), "FluxPipeline", "text_encoder_2",
                          guidance=3.5, dead_lora_matrices=0)
    folder = request.getfixturevalue(f"tiny_{name}_dir")
    teachers = _teacher_dirs(folder, tmp_path_factory.mktemp(f"tiny_{name}_teachers"))
    if name == "qwen_image":
        # the last block's text-stream output is unused: its to_add_out and (text queries feed only
        # text outputs) add_q_proj get no gradient, A and B each
        return TinyFamily(name, folder, teachers, "QwenImagePipeline", "text_encoder", guidance=1.0,
                          dead_lora_matrices=4)
    if name == "flux2":
        return TinyFamily(name, folder, teachers, "Flux2Pipeline", "text_encoder", guidance=2.5, dead_lora_matrices=0,
                          latent=(128, 4, 4))
    # Wan 2.2 A14B at its card's guidance pair: 4.0 (high noise) / 3.0 (low noise, guidance_scale_2);
    # at one sigma one expert runs: the other's 16 adapted layers (A and B each) get no gradient
    return TinyFamily(name, folder, teachers, "WanPipeline", "text_encoder", guidance=1.0,
                      dead_lora_matrices=32 if name == "wan22" else 0,
                      latent=(16, 2, 8, 8), text_width_key="text_dim", num_frames=5,
                      guidance_scale_2=3.0 if name == "wan22" else 0.0)


# The contracts Wan 2.2 A14B's two experts are held to in `make test` (schedule + rollout parity
# with WanPipeline, velocity = the expert the pipeline runs, save -> load_lora_weights, state
# round trip, mixed-teacher batches); every other family contract runs for it in `make test-slow`.
WAN22_CONTRACTS = {"test_ode_rollout_reproduces_the_diffusers_pipeline",
                   "test_velocity_is_the_transformer_called_as_the_pipeline_calls_it",
                   "test_saved_student_loads_in_a_fresh_pipeline_with_identical_images",
                   "test_mixed_adapter_batch_equals_one_forward_per_teacher"}


# Contract tests that build several policies (or copies of the backbone) per family: for the newer
# families they run in `make test-slow` only, to keep `make test` within its time budget (the cheaper
# contract tests, parity, saving and training run for every family in `make test`).
_SLOW_FOR_NEWER_FAMILIES = {
    "test_half_precision_backbone_keeps_an_fp32_student", "test_teacher_from_a_repo_layout_subfolder_and_weight_name",
    "test_full_transformer_teacher", "test_mismatched_teacher_adapter_names_teacher_and_module",
    "test_merged_teachers_match_adapter_teachers_and_print_their_memory",
    "test_teacher_forward_leaves_student_grad_bit_identical", "test_random_adapter_switches_leave_only_the_student_trainable"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        spec = getattr(item, "callspec", None)
        family = spec.params.get("tiny_family") if spec is not None else None
        if family in FAMILY_NAMES[2:] and item.originalname in _SLOW_FOR_NEWER_FAMILIES \
                or family == "wan22" and item.originalname not in WAN22_CONTRACTS:
            item.add_marker(pytest.mark.slow)
