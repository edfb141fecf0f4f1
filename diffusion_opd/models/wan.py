"""Wan 2.1 / 2.2 text-to-video back end of :class:`~diffusion_opd.models.base.Policy` (diffusers' WanPipeline parts).

The same policy for video: the rollout state is the 5-D video latent (B, 16, F', H / 8, W / 8)
with ``F' = (num_frames - 1) / 4 + 1`` (the causal VAE keeps the first frame and compresses the
rest 4x); every per-step Gaussian kernel, loss and checkpoint is shape-agnostic, so frames are
just one more latent dimension. What differs from SD3, each as ``WanPipeline`` runs it:

* Text: UMT5's last hidden state of the cleaned prompt (ftfy + whitespace, the pipeline's own
  ``encode_prompt``), zero after the prompt's tokens up to ``max_sequence_length``, no mask and
  no pooled embedding.
* Guidance: CFG against the empty negative prompt (``guidance_scale``), one batched forward.
* Schedule: the folder's own scheduler's sigmas for N steps (the released folders ship UniPC
  with ``flow_shift`` 3.0 for 480p / 5.0 for 720p; FlowMatchEuler with ``shift`` works alike); the
  model timestep is the scheduler's own timestep at that sigma (UniPC: an integer). The rollout
  takes Euler / Euler-Maruyama steps on that grid (the per-step Gaussian kernels OPD needs),
  not UniPC's multistep corrector; with FlowMatchEuler it is exactly the pipeline's update.
* Decode: ``z = latents * latents_std + latents_mean`` (per channel) through the video VAE.

The frame count is a property of the policy (``num_frames``, ``sample.num_frames`` in a config):
``latent_shape(resolution)`` is (16, F', h, w).

Wan 2.2 A14B (``transformer_2`` and ``boundary_ratio`` in ``model_index.json``): two experts, as
WanPipeline runs them: ``transformer`` (high noise) at model timesteps >= ``boundary_ratio`` x
``num_train_timesteps``, ``transformer_2`` (low noise) below, each with its own CFG scale
(``guidance_scale`` / ``guidance_scale_2``, the policy's ``guidance_scale_2``: None = the same, the
pipeline's default). Both experts sit in ONE module (:class:`WanExperts`), so the student LoRA spans
both (one optimizer over both experts' LoRA), every teacher is one adapter on both, and adapter
switching, mixed-teacher batches and merged teachers work unchanged. The student is saved as one
adapter per expert: the high-noise expert's in the folder (``pipe.load_lora_weights(folder)``), the
low-noise expert's in ``folder/transformer_2`` (``pipe.load_lora_weights(folder,
weight_name="transformer_2/pytorch_lora_weights.safetensors", load_into_transformer_2=True)``), the
same layout for the PEFT folder (``PeftModel.from_pretrained(pipe.transformer_2, folder,
subfolder="transformer_2")``); teachers and
``model.student_init`` are read from that layout (models/lora.py). Teachers given as full
transformers are refused for two experts. TI2V-5B (per-token timesteps) is refused in one line:
not built here.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch

from ..errors import ConfigError
from .base import STUDENT
from .diffusers_policy import DiffusersPolicy
from .lora import FIRST_EXPERT, SECOND_EXPERT, save_peft_adapter
from .specs import check_num_frames

__all__ = ["WanPolicy", "WanExperts", "two_experts", "refuse_unbuilt_wan"]


def two_experts(model_dir: str) -> bool:
    """Whether the pipeline folder is Wan 2.2 A14B's two-expert layout (``transformer_2`` named)."""
    with open(os.path.join(model_dir, "model_index.json")) as f:
        return bool((json.load(f).get(SECOND_EXPERT) or [None])[-1])


def refuse_unbuilt_wan(model_dir: str) -> None:
    """One line for the Wan folders this back end does not run (Wan 2.2 TI2V-5B's per-token timesteps)."""
    with open(os.path.join(model_dir, "model_index.json")) as f:
        index = json.load(f)
    if index.get("expand_timesteps"):
        raise ConfigError(f"model.path: {model_dir} is a Wan 2.2 TI2V folder (per-token timesteps, expand_timesteps); "
                          "not built: use a Wan 2.1 T2V or Wan 2.2 T2V A14B folder")
    if two_experts(model_dir) and index.get("boundary_ratio") is None:
        raise ConfigError(f"model.path: {model_dir} names a transformer_2 but no boundary_ratio in model_index.json: "
                          "WanPipeline would never run the second expert; set boundary_ratio (A14B T2V: 0.875)")


class WanExperts(torch.nn.Module):
    """Wan 2.2 A14B's two experts as one denoiser: row by row, ``transformer`` (high noise) at
    model timesteps >= ``boundary_timestep`` and ``transformer_2`` (low noise) below, the switch
    WanPipeline makes per step. Called like one WanTransformer3DModel."""

    _repeated_blocks = ("WanTransformerBlock",)  # regional compilation / FSDP: both experts' blocks

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_timestep = float(boundary_timestep)

    @property
    def config(self):
        """The experts' shared config (patch size, channels, text width)."""
        return self.transformer.config

    @property
    def experts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.transformer, self.transformer_2

    def add_adapter(self, config, adapter_name: str) -> None:
        """A LoRA on both experts (``config.target_modules`` matched in each; diffusers' ``add_adapter``)."""
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, self, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.enable_gradient_checkpointing()

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = False):
        high = timestep >= self.boundary_timestep
        # One host sync per forward to pick the expert(s). A batch straddling the boundary (per-row
        # sigmas on both sides) runs BOTH experts on every row and keeps each row's own: the
        # adapter spans of a mixed-teacher forward address rows of the whole batch, so a sub-batch
        # per expert would shift them.
        n_high = int(high.sum())
        kwargs = dict(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                      return_dict=False)
        if n_high == high.numel():
            return self.transformer(**kwargs)
        if n_high == 0:
            return self.transformer_2(**kwargs)
        v_high, v_low = self.transformer(**kwargs)[0], self.transformer_2(**kwargs)[0]
        return (torch.where(high.view(-1, *([1] * (v_high.ndim - 1))), v_high, v_low),)


class WanPolicy(DiffusersPolicy):
    """Student LoRA + frozen teachers on a Wan 2.1 video transformer or Wan 2.2 A14B's two experts
    (use ``models.build_policy``)."""

    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    vae_class = "AutoencoderKLWan"
    embed_keys = ("prompt_embeds",)
    teacher_config_keys = ("in_channels", "out_channels", "patch_size", "text_dim", "num_attention_heads",
                           "attention_head_dim")
    text_pipeline_skips = ("transformer", SECOND_EXPERT, "vae")

    def __init__(self, model_dir: str, *, num_frames: int = 81, guidance_scale_2: Optional[float] = None,
                 **kwargs):
        refuse_unbuilt_wan(model_dir)
        self.two_experts = two_experts(model_dir)
        if guidance_scale_2 is not None and not self.two_experts:
            raise ConfigError(f"model.guidance_scale_2: {guidance_scale_2} but {model_dir} has one transformer (only "
                              "Wan 2.2 A14B's low-noise expert takes its own scale); leave it unset")
        if self.two_experts:
            full = [t.name for t in kwargs.get("teachers", ()) if t.kind != "lora"]
            if full:
                raise ConfigError(f"teachers.{full[0]}.kind: full-transformer teachers are not built for Wan 2.2 "
                                  "A14B's two experts; give the teacher as a LoRA folder (the low-noise expert's "
                                  "adapter in its subfolder transformer_2)")
        self.guidance_scale_2 = guidance_scale_2
        with open(os.path.join(model_dir, "model_index.json")) as f:
            self.boundary_ratio = json.load(f).get("boundary_ratio") if self.two_experts else None
        super().__init__(model_dir, **kwargs)
        self.temporal_factor = int(self._vae_config.get("scale_factor_temporal") or 4)
        self.num_frames = check_num_frames(num_frames, self.temporal_factor)
        self.scheduler_shift = float(self.scheduler_config.get("flow_shift") or self.scheduler_config.get("shift", 1.0))

    @property
    def boundary_timestep(self) -> Optional[float]:
        """WanPipeline's switch: ``boundary_ratio x num_train_timesteps`` (None: one transformer)."""
        if self.boundary_ratio is None:
            return None
        return float(self.boundary_ratio) * float(self.scheduler_config.get("num_train_timesteps", 1000))

    def _load_denoiser(self) -> torch.nn.Module:
        if not self.two_experts:
            return super()._load_denoiser()
        from diffusers import WanTransformer3DModel

        experts = [WanTransformer3DModel.from_pretrained(self.model_dir, subfolder=name, torch_dtype=self.dtype)
                   for name in (FIRST_EXPERT, SECOND_EXPERT)]
        return WanExperts(*experts, self.boundary_timestep)

    def _encode_texts(self, pipe, texts):
        emb, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False,
                                    max_sequence_length=self.max_sequence_length, device=self.device)
        return (emb,)

    def _cfg_scale(self, guidance_scale, sigma):
        """The low-noise expert's rows take ``guidance_scale_2`` when it is set (WanPipeline's
        ``guidance_scale_2``; whether CFG runs at all follows ``guidance_scale``, as there)."""
        if self.guidance_scale_2 is None:
            return guidance_scale
        high = self._scheduler_timesteps(sigma) >= self.boundary_timestep
        scale = torch.where(high, float(guidance_scale), float(self.guidance_scale_2))
        return scale.view(-1, 1, 1, 1, 1)

    def sigmas(self, num_steps: int, resolution: int, shift: Optional[float] = None) -> torch.Tensor:
        """WanPipeline's sigmas: its scheduler after ``set_timesteps(N)`` (or with a static ``shift``)."""
        return self._scheduler_sigmas(num_steps, shift)

    def latent_shape(self, resolution: int) -> tuple[int, int, int, int]:
        """(16, (num_frames - 1) / 4 + 1, resolution / 8, resolution / 8)."""
        cfg = self.transformer.config
        step = self.vae_scale_factor * cfg.patch_size[-1]
        if resolution <= 0 or resolution % step:
            raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
        side = resolution // self.vae_scale_factor
        return (cfg.in_channels, (self.num_frames - 1) // self.temporal_factor + 1, side, side)

    def _forward(self, module, x, sigma, cond, guidance_scale):
        return module(hidden_states=x, timestep=self._scheduler_timesteps(sigma), encoder_hidden_states=cond["prompt_embeds"],
                      return_dict=False)[0]

    def compile_blocks(self, backend: str = "inductor", dynamic: bool = False) -> int:
        """Regional compilation of each expert's blocks (the two-expert module itself is only a switch)."""
        if not self.two_experts:
            return super().compile_blocks(backend, dynamic)
        from .compile import compile_repeated_blocks

        return sum(compile_repeated_blocks(expert, backend, dynamic) for expert in self.transformer.experts)

    # ---------------------------------------------------------------- two experts' files
    def _expert_parts(self, state: dict) -> dict:
        """``{expert: (its peft-named weights, its LoraConfig)}`` of a two-expert student state."""
        import copy

        config = self.student_lora_config()
        parts = {}
        for expert in (FIRST_EXPERT, SECOND_EXPERT):
            prefix, other = expert + ".", (SECOND_EXPERT if expert == FIRST_EXPERT else FIRST_EXPERT) + "."

            def own(names):  # the expert's full names unprefixed, suffix patterns kept, the other's dropped
                return {n.removeprefix(prefix): v for n, v in names.items() if not n.startswith(other)}

            cfg = copy.deepcopy(config)
            cfg.target_modules = sorted(own(dict.fromkeys(config.target_modules)))
            cfg.rank_pattern, cfg.alpha_pattern = own(config.rank_pattern or {}), own(config.alpha_pattern or {})
            parts[expert] = ({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, cfg)
        return parts

    def save_student(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Wan 2.1: ``pytorch_lora_weights.safetensors`` (``WanPipeline.load_lora_weights(directory)``).
        Wan 2.2 A14B: the same for the high-noise expert, and ``directory/transformer_2`` for the
        low-noise one (``load_lora_weights(directory, weight_name="transformer_2/pytorch_lora_weights.safetensors",
        load_into_transformer_2=True)``)."""
        if not self.two_experts:
            return super().save_student(directory, state)
        from diffusers import WanPipeline

        state = self.student_state_dict() if state is None else state
        self._check_state(state)
        for expert, (weights, config) in self._expert_parts(state).items():
            WanPipeline.save_lora_weights(
                directory if expert == FIRST_EXPERT else os.path.join(directory, SECOND_EXPERT),
                transformer_lora_layers={k: v.detach().cpu().contiguous() for k, v in weights.items()},
                transformer_lora_adapter_metadata=config.to_dict())

    def save_student_peft(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """PEFT folders; two experts: the high-noise expert's in ``directory``, the low-noise one's in
        ``directory/transformer_2`` (``PeftModel.from_pretrained(pipe.transformer_2, ...)``)."""
        if not self.two_experts:
            return super().save_student_peft(directory, state)
        state = self.student_state_dict() if state is None else state
        self._check_state(state)
        for expert, (weights, config) in self._expert_parts(state).items():
            save_peft_adapter(directory if expert == FIRST_EXPERT else os.path.join(directory, SECOND_EXPERT),
                              weights, config, self.model_dir)

    def save_merged_pipeline(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """A full pipeline folder with the student merged into its transformer(s)."""
        if not self.two_experts:
            return super().save_merged_pipeline(directory, state)
        from diffusers import WanPipeline

        with tempfile.TemporaryDirectory() as tmp:
            self.save_student(tmp, state)
            pipe = WanPipeline.from_pretrained(self.model_dir, torch_dtype=self.dtype)
            pipe.load_lora_weights(tmp, adapter_name=STUDENT)
            pipe.load_lora_weights(os.path.join(tmp, SECOND_EXPERT), adapter_name=STUDENT, load_into_transformer_2=True)
        pipe.fuse_lora(components=[FIRST_EXPERT, SECOND_EXPERT], lora_scale=1.0)
        pipe.unload_lora_weights()
        pipe.save_pretrained(directory)

    def _vae_decode(self, latents):
        vae = self._vae_model()
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        return vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Video latents -> "pil": one list of PIL frames per video; "pt": float (B, F, 3, H, W) in [0, 1]."""
        from diffusers.image_processor import VaeImageProcessor

        video = self._vae_decode(latents.to(self.device, self.dtype))
        b, _, f, h, w = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
        out = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(frames, output_type=output_type)
        if output_type == "pt":
            return out.reshape(b, f, 3, h, w)
        return [out[i * f:(i + 1) * f] for i in range(b)]
