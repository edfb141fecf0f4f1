"""What every diffusers-transformer back end shares (SD3 / SD3.5, FLUX): one transformer carrying
the student LoRA and every LoRA teacher (adapter switching, no copies), teachers given as full
transformers as separate frozen modules, prompt embeddings cached per string, the VAE loaded
only when images are decoded, and the student saved in diffusers LoRA format.

A family subclass (models/sd3.py, models/flux.py) names its diffusers classes and writes the
four things that differ: how prompts are encoded, how one transformer forward is called, the
latent shape, and the sigma schedule.
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from .base import BASE, STUDENT, Policy, PromptEmbeds, check_prompts, guided
from .hub import resolve_adapter, resolve_folder
from .lora import (AdapterMismatchError, AdapterSwitch, LoraAdapter, add_lora_adapter, add_student_adapter,
                   merge_adapter_into_layers, read_lora_adapter)
from .specs import TeacherSpec

__all__ = ["DiffusersPolicy"]


def _runs(adapters: list[str], scales: list[float]) -> list[tuple[str, float, int, int]]:
    """Maximal runs of consecutive rows with the same (adapter, scale): (adapter, scale, start, stop)."""
    runs, start = [], 0
    for i in range(1, len(adapters) + 1):
        if i == len(adapters) or (adapters[i], scales[i]) != (adapters[start], scales[start]):
            runs.append((adapters[start], scales[start], start, i))
            start = i
    return runs


def _mixed_rows(embeds: PromptEmbeds, layout, dtype) -> dict[str, torch.Tensor]:
    """The conditioning of a mixed forward (uncond copies / cond rows in ``layout`` order), built
    once per embedding batch and layout: a lockstep round queries the same layout at every step."""
    cache = embeds.__dict__.setdefault("_mixed_rows", {})
    key = (tuple(layout), dtype)
    if key not in cache:
        def rows(k, r, uncond):
            v = embeds.cond[k]
            return embeds.uncond[k].expand(r[3] - r[2], *v.shape[1:]) if uncond else v[r[2]:r[3]]

        cache[key] = {k: torch.cat([rows(k, r, u) for r, u in layout]).to(dtype) for k in embeds.cond}
    return cache[key]

# Prompts are encoded ONE per text-encoder forward: a batched GEMM may sum in another order for
# another batch size, so an embedding would depend on which prompts shared its batch, and a
# resumed run (cold cache, other groupings) would drift from the uninterrupted one at fp32
# round-off (measured on the tiny SD3: LoRA weights no longer bit-identical after resume). Each
# prompt is encoded once per run (then cached), so the extra forwards cost little.
_ENCODE_CHUNK = 1
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# (texts, encode_here) -> one embedding row per text: how a process gets its prompts encoded
TextRoute = Callable[[list, Callable[[list], list]], list]


def _diffusers_class(name: str):
    import diffusers

    return getattr(diffusers, name)


class DiffusersPolicy(Policy):
    """Student LoRA + frozen teachers on one diffusers transformer (use ``models.build_policy``)."""

    pipeline_class: str = ""  # diffusers pipeline class name, e.g. "StableDiffusion3Pipeline"
    transformer_class: str = ""  # e.g. "SD3Transformer2DModel"
    vae_class: str = "AutoencoderKL"
    # transformer config keys a full-transformer teacher must share with the backbone
    teacher_config_keys: tuple[str, ...] = ("in_channels", "out_channels", "patch_size", "joint_attention_dim",
                                            "pooled_projection_dim")
    # the text conditioning tensors _encode_texts returns, in order (a family without a pooled
    # embedding names others, e.g. Qwen-Image's token mask)
    embed_keys: tuple[str, ...] = ("prompt_embeds", "pooled_prompt_embeds")
    # pipeline components the text-encoding pipeline is loaded without (the denoisers, the VAE)
    text_pipeline_skips: tuple[str, ...] = ("transformer", "vae")

    def __init__(self, model_dir: str, *, dtype: torch.dtype, device: torch.device, lora: dict,
                 teachers: Sequence[TeacherSpec] = (), gradient_checkpointing: bool = False,
                 max_sequence_length: int = 128, max_cached_prompts: Optional[int] = None,
                 offload_text_encoders: bool = False, guidance: str = "auto", embedded_guidance: float = 1.0,
                 student_init: Optional[LoraAdapter] = None, merge_teachers: bool = False):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        self.model_dir, self.dtype, self.device = model_dir, dtype, torch.device(device)
        self.max_sequence_length = max_sequence_length
        self.offload_text_encoders = offload_text_encoders
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(model_dir, subfolder="scheduler"))
        self.scheduler_shift = float(self.scheduler_config.get("shift", 1.0))
        self._vae_config = AutoencoderKL.load_config(model_dir, subfolder="vae")
        vae = self._vae_config  # 2-D VAEs: one halving per extra block; the 3-D (Wan / Qwen) VAEs: per temporal flag
        self.vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1 if "block_out_channels" in vae
                                      else len(vae["temperal_downsample"]))

        transformer = self._load_denoiser()
        transformer.requires_grad_(False)
        transformer.to(self.device)
        add_student_adapter(transformer, lora, STUDENT, student_init)
        self.transformer = transformer
        has_embedding = bool(transformer.config.get("guidance_embeds", False))
        if guidance == "embedded" and not has_embedding:
            raise ValueError(f"{model_dir}: guidance='embedded' but the {self.transformer_class} has no guidance "
                             "embedding (guidance_embeds false); use guidance='auto' or 'true_cfg'")
        # "embedded": guidance_scale feeds the guidance embedding; "true_cfg": it is classifier-free guidance
        self.guidance_mode = "embedded" if guidance == "embedded" or (guidance == "auto" and has_embedding) \
            else "true_cfg"
        self.embedded_guidance = embedded_guidance  # the embedding's value under true CFG
        self._full_teachers: dict[str, torch.nn.Module] = {}
        self._teacher_names = [t.name for t in teachers]
        self._merge_teachers = merge_teachers
        self.merged_teacher_bytes: dict[str, int] = {}  # teacher -> bytes of its merged layer weights
        for spec in teachers:
            self._load_teacher(spec)
        if self.merged_teacher_bytes:
            sizes = self.merged_teacher_bytes
            print(f"[policy] teacher fast path: {len(sizes)} merged teachers ({', '.join(sizes)}): each adapted "
                  f"layer keeps W + sBA beside W in {str(dtype).removeprefix('torch.')}, "
                  f"+{max(sizes.values()) / 1e9:.2f} GB each, +{sum(sizes.values()) / 1e9:.2f} GB in all", flush=True)
        self._switch = AdapterSwitch(transformer, default=STUDENT)
        self._switch.restore()
        self.rebind_student()
        for p in self._student_params:  # train LoRA in fp32 even when the backbone is fp16 / bf16
            p.data = p.data.float()
        self._student_keys = set(self.student_state_dict())
        if student_init is not None:  # again in fp32: exactly the saved weights, whatever the backbone dtype
            self.load_student_state_dict(student_init.state_dict)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self._student_module: torch.nn.Module = transformer
        self._text_pipe = None
        self._text_route: Optional[TextRoute] = None
        self._text_placed = False
        self._vae = None
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._max_cached = max_cached_prompts
        self._uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ---------------------------------------------------------------- what a family defines
    def _load_denoiser(self) -> torch.nn.Module:
        """The module every adapter goes on: the folder's ``transformer`` (Wan 2.2 A14B: both experts)."""
        return _diffusers_class(self.transformer_class).from_pretrained(self.model_dir, subfolder="transformer",
                                                                         torch_dtype=self.dtype)

    def _encode_texts(self, pipe, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """One batch-first tensor per :attr:`embed_keys` (SD3 / FLUX: prompt_embeds (B, L, D),
        pooled_prompt_embeds (B, P)) from the family's pipeline."""
        raise NotImplementedError

    def _guided(self, v_u: torch.Tensor, v_c: torch.Tensor, scale) -> torch.Tensor:
        """Classifier-free guidance from the uncond / cond velocities: ``base.guided``,
        ``v_u + g (v_c - v_u)`` in float32; Qwen-Image adds its pipeline's rescale."""
        return guided(v_u, v_c, scale)

    def _cfg_scale(self, guidance_scale: float, sigma: torch.Tensor):
        """The CFG scale of rows at per-sample ``sigma`` (B,) for a call at ``guidance_scale``:
        the same for every row; Wan 2.2 A14B's low-noise expert may take its own."""
        return guidance_scale

    def _uses_cfg(self, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` means classifier-free guidance (an uncond branch)."""
        return self.guidance_mode == "true_cfg" and guidance_scale > 1.0

    def _forward(self, module: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                 guidance_scale: float) -> torch.Tensor:
        """One transformer forward: latents (B, C, H, W), per-sample sigma (B,) -> velocity like x."""
        raise NotImplementedError

    def _scheduler_sigmas(self, num_steps: int, shift: Optional[float] = None, **set_timesteps) -> torch.Tensor:
        """The ``num_steps + 1`` sigmas (float64, last 0) of the folder's own diffusers scheduler,
        called as the family's pipeline calls it (``set_timesteps`` keyword arguments, e.g. the
        pipeline's ``sigmas`` and ``mu``). ``shift``: a static shift instead of the scheduler's own
        (dynamic shifting off). The scheduler's timestep at each sigma is remembered for
        :meth:`_scheduler_timesteps` (Wan's UniPC feeds integer timesteps, not 1000 sigma)."""
        import diffusers

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config = dict(self.scheduler_config)
        if shift is not None:
            if shift <= 0:
                raise ValueError(f"shift must be > 0, got {shift}")
            config.update(use_dynamic_shifting=False, shift=shift, flow_shift=shift)
            set_timesteps.pop("mu", None)
        scheduler = getattr(diffusers, config.get("_class_name") or "FlowMatchEulerDiscreteScheduler").from_config(config)
        if "sigmas" in set_timesteps:
            scheduler.set_timesteps(**set_timesteps)
        else:
            scheduler.set_timesteps(num_steps, **set_timesteps)
        sigmas = scheduler.sigmas.detach().to("cpu", torch.float64)
        if len(sigmas) != num_steps + 1 or sigmas[-1] != 0:
            raise ValueError(f"{self.model_dir}: the scheduler's {len(sigmas)} sigmas for {num_steps} steps do not end "
                             "in 0; rollouts need one sigma per step and a final 0")
        table = getattr(self, "_timestep_table", {})
        table.update(zip(sigmas[:-1].float().tolist(), scheduler.timesteps.detach().cpu().float().tolist()))
        self._timestep_table = table
        self._timestep_keys = None  # rebuilt on the device at the next forward
        return sigmas

    def _scheduler_timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep for each per-sample sigma (B,) of a grid :meth:`_scheduler_sigmas`
        produced, ``1000 sigma`` for any other sigma; on the device, without a host sync."""
        table = getattr(self, "_timestep_table", None)
        if not table:
            return sigma * 1000.0
        if self._timestep_keys is None:
            self._timestep_keys = (torch.tensor(list(table), device=sigma.device),
                                   torch.tensor(list(table.values()), device=sigma.device))
        keys, values = self._timestep_keys
        match = sigma.float()[:, None] == keys[None, :]
        return torch.where(match.any(1), (match * values).sum(1), sigma * 1000.0).to(sigma.dtype)

    # ---------------------------------------------------------------- teachers
    def _load_teacher(self, spec: TeacherSpec) -> None:
        if spec.kind == "lora":
            folder = resolve_adapter(spec.path, subfolder=spec.subfolder, revision=spec.revision,
                                     weight_name=spec.weight_name, what=f"teacher '{spec.name}'")
            adapter = read_lora_adapter(folder, spec.weight_name)
            if self._merge_teachers:
                self.merged_teacher_bytes[spec.name] = merge_adapter_into_layers(self.transformer, adapter, spec.name)
            else:
                add_lora_adapter(self.transformer, adapter, spec.name, label=f"teacher '{spec.name}'")
            return
        folder = resolve_folder(spec.path, subfolder=spec.subfolder, revision=spec.revision,
                                what=f"teacher '{spec.name}'")
        sub = "transformer" if os.path.isfile(os.path.join(folder, "transformer", "config.json")) else None
        model = _diffusers_class(self.transformer_class).from_pretrained(folder, subfolder=sub, torch_dtype=self.dtype)
        for key in self.teacher_config_keys:
            if model.config.get(key) != self.transformer.config.get(key):
                raise AdapterMismatchError(
                    f"teacher '{spec.name}' ({folder}) does not fit the backbone: transformer config "
                    f"{key}={model.config.get(key)} but the student has {self.transformer.config.get(key)}")
        self._full_teachers[spec.name] = model.requires_grad_(False).eval().to(self.device)

    def compile_blocks(self, backend: str = "inductor", dynamic: bool = False) -> int:
        """Regional compilation of every denoiser's repeated blocks and the modules around them
        (models/compile.py)."""
        from .compile import compile_repeated_blocks

        return sum(compile_repeated_blocks(m, backend, dynamic)
                   for m in (self.transformer, *self._full_teachers.values()))

    @property
    def teacher_names(self) -> list[str]:
        """Names of the loaded teachers, in the order given."""
        return list(self._teacher_names)

    def set_student_module(self, module: torch.nn.Module) -> None:
        """Route student forwards WITH grad through ``module`` (e.g. the DDP-wrapped transformer)."""
        self._student_module = module

    def unwrap_modules(self) -> dict:
        """The module owning the trainable parameters (for accelerate.prepare / DDP)."""
        return {"transformer": self.transformer}

    def denoiser_modules(self) -> list[torch.nn.Module]:
        return [self.transformer, *self._full_teachers.values()]

    def rebind_student(self) -> None:
        self._student_params = [p for n, p in self.transformer.named_parameters() if f".{STUDENT}." in n]

    # ---------------------------------------------------------------- prompts
    def _text_pipeline(self):
        if self._text_pipe is None:
            self._text_pipe = _diffusers_class(self.pipeline_class).from_pretrained(
                self.model_dir, **dict.fromkeys(self.text_pipeline_skips), torch_dtype=self.dtype)
            self._text_pipe.set_progress_bar_config(disable=True)
        return self._text_pipe

    def text_encoder_modules(self, load: bool = False) -> list[torch.nn.Module]:
        """The text encoders this process holds: none until the first encode (or ``load=True``,
        which loads them on the CPU, where they stay until the first encode moves them)."""
        if self._text_pipe is None and not load:
            return []
        pipe = self._text_pipeline()
        return [getattr(pipe, n) for n in _TEXT_ENCODERS if getattr(pipe, n, None) is not None]

    def set_text_encoding(self, route: Optional[TextRoute], placed: bool = False) -> None:
        """Route every encode through ``route(texts, encode_here) -> rows`` (one row per text, as
        ``encode_here`` returns them): the distributed placements of the text encoders
        (trainers/sharding.py; ``None``: encode here, the default). A route is a collective: every
        process calls :meth:`encode_prompts` the same number of times, with or without texts
        missing from its cache. ``placed``: the route has put the encoders on the device itself
        (sharded), the encode must not move them."""
        self._text_route, self._text_placed = route, placed

    @torch.no_grad()
    def _encode_here(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._text_pipeline()
        encoders = self.text_encoder_modules()
        if not self._text_placed:
            for enc in encoders:  # no-op after the first call unless offloading
                enc.to(self.device)
        rows = []
        try:
            for i in range(0, len(texts), _ENCODE_CHUNK):
                rows += list(zip(*(t.cpu() for t in self._encode_texts(pipe, texts[i:i + _ENCODE_CHUNK]))))
        finally:
            # Offloading frees ~11 GB (SD3.5 fp16) between calls but copies it both ways on every
            # call; the trainer encodes new prompts every round, so the default keeps them resident.
            if self.offload_text_encoders and self.device.type != "cpu":
                for enc in encoders:
                    enc.to("cpu")
        return rows

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Conditioning for ``prompts`` (cached per string) + the empty prompt for CFG."""
        prompts = check_prompts(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        texts = missing + ([""] if self._uncond is None else [])
        if self._text_route is not None:  # a collective: taken even with nothing to encode here
            rows = self._text_route(texts, self._encode_here)
        elif texts:
            rows = self._encode_here(texts)
        if texts:
            if self._uncond is None:
                self._uncond = rows.pop()
            self._cache.update(zip(missing, rows))
        rows = [self._cache[p] for p in prompts]
        for p in prompts:
            self._cache.move_to_end(p)
        while self._max_cached is not None and len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)

        def pack(items):
            return {k: torch.stack([r[i] for r in items]).to(self.device, self.dtype) for i, k in enumerate(self.embed_keys)}

        return PromptEmbeds(prompts, pack(rows), pack([self._uncond]))

    # ---------------------------------------------------------------- denoiser
    @contextmanager
    def _active(self, adapter: str, rows: int):
        if adapter == STUDENT or adapter in self._full_teachers:
            yield
            return
        if adapter in self.merged_teacher_bytes:  # every row through the teacher's merged weights
            with self._switch.spans([(adapter, 0, rows)]):
                yield
            return
        self._switch.activate(None if adapter == BASE else adapter)
        try:
            yield
        finally:  # the student is active again after every call (and the only trainable adapter)
            self._switch.back()

    def velocity(self, latents: torch.Tensor, sigma, embeds: PromptEmbeds, adapter: str = STUDENT,
                 guidance_scale: float = 1.0, detach_uncond: bool = False) -> torch.Tensor:
        """Velocity at (latents, sigma) under ``adapter`` (see :meth:`Policy.velocity`).

        ``sigma``: float or per-sample (B,) tensor. When ``guidance_scale`` means CFG
        (:meth:`_uses_cfg`) the uncond and cond rows run in ONE batched forward and the result is
        ``v_u + g (v_c - v_u)``.
        """
        t = sigma_rows = self.per_sample_sigma(latents, sigma, embeds, adapter)
        x = latents.to(self.device, self.dtype)
        cfg = self._uses_cfg(guidance_scale)
        cond = {k: v.to(self.dtype) for k, v in (embeds.cfg_rows() if cfg else embeds.cond).items()}
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        grad = adapter == STUDENT and torch.is_grad_enabled()
        module = self._student_module if grad else self._full_teachers.get(adapter, self.transformer)
        self._switch.input_casting(not torch.is_autocast_enabled(self.device.type))
        with self._active(adapter, x.shape[0]), torch.set_grad_enabled(grad):
            out = self._forward(module, x, t, cond, guidance_scale)
        if cfg:
            v_u, v_c = out.chunk(2)
            out = self._guided(v_u.detach() if detach_uncond else v_u, v_c, self._cfg_scale(guidance_scale, sigma_rows))
        return out.to(latents.dtype)

    def velocity_mixed(self, latents: torch.Tensor, sigma, embeds: PromptEmbeds, adapters: Sequence[str],
                       guidance_scales: Sequence[float]) -> torch.Tensor:
        """Per-row adapters and guidance in ONE forward of the shared transformer (see
        :meth:`Policy.velocity_mixed`). The forward's rows are ordered by adapter, each adapter's
        CFG uncond copies right before its cond rows, so every adapter owns one contiguous span
        of rows (LoRA teachers and merged teachers alike: :meth:`AdapterSwitch.spans`); runs of
        consecutive rows are moved as slices, never gathered by index. Teachers held as separate
        transformers (``kind="transformer"``), the student, and guidance that feeds an embedding
        rather than CFG take the one-forward-per-group default."""
        adapters, scales = list(adapters), [float(g) for g in guidance_scales]
        b = latents.shape[0]
        if not len(adapters) == len(scales) == len(embeds) == b:
            raise ValueError(f"velocity_mixed: {b} latents, {len(embeds)} embeddings, {len(adapters)} adapters, "
                             f"{len(scales)} guidance scales: give one of each per row")
        valid = [BASE, *self._teacher_names]
        unknown = sorted(set(adapters) - set(valid))
        if unknown:
            raise ValueError(f"velocity_mixed: unknown adapter(s) {unknown}; valid: {valid}")
        if set(adapters) & set(self._full_teachers) or (self.guidance_mode != "true_cfg" and len(set(scales)) > 1):
            return super().velocity_mixed(latents, sigma, embeds, adapters, scales)
        t = self.per_sample_sigma(latents, sigma, embeds, BASE)
        x = latents.to(self.device, self.dtype)
        runs = _runs(adapters, scales)  # (adapter, scale, start, stop) of consecutive equal rows
        layout, spans, rows = [], [], 0  # layout: (run, uncond?) in forward order
        for adapter in dict.fromkeys(a for a, _, _, _ in runs):
            mine = [r for r in runs if r[0] == adapter]
            parts = [(r, True) for r in mine if self._uses_cfg(r[1])] + [(r, False) for r in mine]
            size = sum(r[3] - r[2] for r, _ in parts)
            spans.append((None if adapter == BASE else adapter, rows, rows + size))
            layout += parts
            rows += size
        cond = _mixed_rows(embeds, layout, self.dtype)
        x_in = torch.cat([x[r[2]:r[3]] for r, _ in layout]) if len(layout) > 1 else x
        t_in = torch.cat([t[r[2]:r[3]] for r, _ in layout]) if len(layout) > 1 else t
        self._switch.input_casting(not torch.is_autocast_enabled(self.device.type))
        with torch.no_grad(), self._switch.spans(spans):
            out = self._forward(self.transformer, x_in, t_in, cond, scales[0])
        offsets, at = {}, 0
        for r, uncond in layout:
            offsets[(r, uncond)], at = at, at + r[3] - r[2]
        pieces = []
        with torch.no_grad():
            for r in runs:
                n, c = r[3] - r[2], offsets[(r, False)]
                if self._uses_cfg(r[1]):
                    u = offsets[(r, True)]
                    scale = self._cfg_scale(r[1], t[r[2]:r[3]])
                    pieces.append(self._guided(out[u:u + n], out[c:c + n], scale).to(latents.dtype))
                else:
                    pieces.append(out[c:c + n].to(latents.dtype))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _vae_model(self):
        """The family's VAE (class named by :attr:`vae_class`), loaded on first use only."""
        if self._vae is None:
            self._vae = _diffusers_class(self.vae_class).from_pretrained(self.model_dir, subfolder="vae",
                                                                         torch_dtype=self.dtype)
            self._vae.requires_grad_(False).eval().to(self.device)
        return self._vae

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Rollout latents -> images (B, 3, H, W) in [-1, 1]: ``z = latents / scaling_factor +
        shift_factor`` (the VAE config's constants: SD3 1.5305 / 0.0609, FLUX 0.3611 / 0.1159),
        then the VAE decoder."""
        vae = self._vae_model()
        z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents -> images ("pil": list of PIL images; "pt": float (B, 3, H, W) in [0, 1])."""
        from diffusers.image_processor import VaeImageProcessor

        images = self._vae_decode(latents.to(self.device, self.dtype))
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor).postprocess(images, output_type=output_type)

    # ---------------------------------------------------------------- student weights
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the student's LoRA parameters."""
        return list(self._student_params)

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """Student LoRA weights, peft names (``<module>.lora_A.weight``), detached clones."""
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer, adapter_name=STUDENT, save_embedding_layers=False)
        return {k: v.detach().clone() for k, v in state.items()}

    def _check_state(self, state: dict) -> None:
        missing, extra = self._student_keys - set(state), set(state) - self._student_keys
        if missing or extra:
            raise ValueError(f"student state dict mismatch: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]} ({len(missing)} / {len(extra)} keys)")

    def load_student_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (peft names, as from :meth:`student_state_dict`) into the student in place."""
        from peft import set_peft_model_state_dict

        self._check_state(state)
        set_peft_model_state_dict(self.transformer, state, adapter_name=STUDENT)

    def save_student(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers format, LoraConfig in its metadata).

        Loads with the family pipeline's ``load_lora_weights(directory)``
        (``StableDiffusion3Pipeline`` / ``FluxPipeline``).
        """
        state = self.student_state_dict() if state is None else state
        self._check_state(state)
        config = self.transformer.peft_config[STUDENT].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        _diffusers_class(self.pipeline_class).save_lora_weights(
            directory, transformer_lora_layers={k: v.detach().cpu().contiguous() for k, v in state.items()},
            transformer_lora_adapter_metadata=config)

    def save_merged_pipeline(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write a full pipeline folder with the student LoRA merged into the transformer weights.

        Loads a second copy of the pipeline on the CPU (an export tool, not for the training loop).
        """
        with tempfile.TemporaryDirectory() as tmp:
            self.save_student(tmp, state)
            pipe = _diffusers_class(self.pipeline_class).from_pretrained(self.model_dir, torch_dtype=self.dtype)
            pipe.load_lora_weights(tmp, adapter_name=STUDENT)
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
        pipe.unload_lora_weights()
        pipe.save_pretrained(directory)
