"""The policy interface the trainers and the evaluation use, independent of the model family.

A policy is one denoiser backbone carrying named adapters:

* ``"student"``: the trainable LoRA (the only parameters that ever train),
* one name per teacher (frozen LoRA adapters on the same backbone, or separate frozen models),
* ``BASE`` (``"base"``): the backbone with every adapter disabled.

Everything a trainer needs is below; SD3 / SD3.5 (``models/sd3.py``) and FLUX (``models/flux.py``)
are the back ends, picked from the pipeline folder by ``models.build_policy``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..glue import fusable

BASE = "base"
STUDENT = "student"


def cfg_combine(out: torch.Tensor, guidance_scale: float, detach_uncond: bool = False) -> torch.Tensor:
    """Classifier-free guidance from one batched forward ``out = [v_u; v_c]`` (2B rows):
    ``v_u + g (v_c - v_u)`` in float32.

    ``detach_uncond=True`` stops the gradient at the unconditional branch, so the value is the
    same but the gradient is ``g dv_c`` instead of ``g dv_c + (1 - g) dv_u``: how Flow-GRPO (and
    GRPO-Guard after it) trains its CFG policy (``rl.cfg_grad=detach_uncond``).
    """
    v_u, v_c = out.chunk(2)
    return guided(v_u.detach() if detach_uncond else v_u, v_c, guidance_scale)


@fusable
def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``v_u + g (v_c - v_u)`` in float32 (one fused kernel when compiled, diffusion_opd/glue.py)."""
    v_u = v_uncond.float()
    return v_u + guidance_scale * (v_cond.float() - v_u)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts as a list, refused if empty or not all strings (every back end's
    ``encode_prompts`` starts here)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[:3]}")
    return prompts

@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of prompts, plus the empty-prompt conditioning for CFG.

    Back ends put whatever tensors they need in ``cond`` / ``uncond`` (SD3: ``prompt_embeds``
    and ``pooled_prompt_embeds``); every tensor has the batch as its first dim (``uncond`` holds
    a single row that is expanded on use).
    """

    prompts: list[str]
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.prompts)

    def cfg_rows(self) -> dict[str, torch.Tensor]:
        """Every tensor as the CFG batch ``[uncond x B, cond]`` (2B rows), built once per object.

        A rollout queries the same embeddings at every step (student and teacher): concatenating
        them once instead of at every forward saves a (2B, tokens, width) copy per call.
        """
        cached = getattr(self, "_cfg_rows", None)
        if cached is None:
            b = len(self)
            cached = {k: torch.cat([self.uncond[k].expand(b, *v.shape[1:]), v]) for k, v in self.cond.items()}
            self._cfg_rows = cached
        return cached

    @staticmethod
    def concat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Several batches as one (rows in order); they share the empty-prompt conditioning."""
        first = parts[0]
        cond = {k: torch.cat([p.cond[k] for p in parts]) for k in first.cond}
        return PromptEmbeds([q for p in parts for q in p.prompts], cond, first.uncond)

    def select(self, index: Sequence[int]) -> "PromptEmbeds":
        """The rows ``index``; a contiguous ``range`` is sliced (a view: no index tensor moved
        to the device, which would block the host until the device's queue drains)."""
        if isinstance(index, range) and index.step == 1:
            rows = slice(index.start, index.stop)
            return PromptEmbeds(self.prompts[rows], {k: v[rows] for k, v in self.cond.items()}, self.uncond)
        idx = torch.as_tensor(list(index), dtype=torch.long)
        cond = {k: v[idx.to(v.device)] for k, v in self.cond.items()}
        return PromptEmbeds([self.prompts[i] for i in index], cond, self.uncond)

    def to(self, device) -> "PromptEmbeds":
        return PromptEmbeds(
            self.prompts,
            {k: v.to(device) for k, v in self.cond.items()},
            {k: v.to(device) for k, v in self.uncond.items()},
        )


class Policy(ABC):
    """A flow-matching text-to-image model with a trainable student adapter and frozen teachers."""

    device: torch.device
    dtype: torch.dtype
    scheduler_shift: float = 1.0  # static schedule shift when a rollout gives none

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Text conditioning (cached per prompt string) and the empty prompt for CFG."""

    @abstractmethod
    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor | float,
        embeds: PromptEmbeds,
        adapter: str = STUDENT,
        guidance_scale: float = 1.0,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Velocity at (latents, sigma) under ``adapter`` with classifier-free guidance.

        ``guidance_scale`` is the family's guidance. Classifier-free guidance (SD3; FLUX with
        ``guidance="true_cfg"``): ``> 1`` runs uncond + cond in ONE batched forward and returns
        ``v_u + g (v_c - v_u)``, ``<= 1`` the conditional branch only. A guidance-distilled
        model (FLUX.1-dev) feeds it to its guidance embedding instead: one forward. Gradients flow
        only for ``adapter == "student"`` under grad mode (``detach_uncond``: not through the
        unconditional branch, see :func:`cfg_combine`); the student stays the active,
        trainable adapter after every call whatever ``adapter`` was.
        """

    def sigmas(self, num_steps: int, resolution: int, shift: Optional[float] = None) -> torch.Tensor:
        """The ``num_steps + 1`` sigmas (float64, 1 -> 0) this model samples ``resolution`` px with.

        Default: SD3's static shift (:func:`~diffusion_opd.sampling.sd3_sigmas`) with ``shift``
        or, when None, the pipeline scheduler's ``scheduler_shift``. FLUX overrides it with the
        resolution-dependent shift.
        """
        from ..sampling import sd3_sigmas

        return sd3_sigmas(num_steps, self.scheduler_shift if shift is None else shift)

    def velocity_mixed(self, latents: torch.Tensor, sigma, embeds: PromptEmbeds, adapters: Sequence[str],
                       guidance_scales: Sequence[float]) -> torch.Tensor:
        """Frozen velocities with a per-row adapter and CFG scale (no gradient): the teacher
        queries of several tasks at once. Row i equals
        ``velocity(latents[i:i+1], sigma_i, embeds.select([i]), adapters[i], guidance_scales[i])``.

        This default runs one :meth:`velocity` per (adapter, scale) group; back ends that can
        mix adapters inside one forward override it.
        """
        groups: dict[tuple[str, float], list[int]] = {}
        for i, key in enumerate(zip(adapters, guidance_scales)):
            groups.setdefault(key, []).append(i)
        sig = torch.as_tensor(sigma)
        out = None
        with torch.no_grad():
            for (adapter, scale), idx in groups.items():
                v = self.velocity(latents[idx], sig if sig.ndim == 0 else sig[idx], embeds.select(idx), adapter, scale)
                if out is None:
                    out = v.new_empty((latents.shape[0], *v.shape[1:]))
                out[idx] = v
        return out

    @abstractmethod
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, H, W) of the latent for a square image of ``resolution`` pixels."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> list:
        """Latents -> list of PIL images (loads / moves the VAE only when called)."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the student's LoRA parameters."""

    @abstractmethod
    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's LoRA weights (peft naming), detached copies."""

    @abstractmethod
    def load_student_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`student_state_dict`."""

    @abstractmethod
    def save_student(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write the student LoRA (or ``state``, e.g. its EMA) in diffusers LoRA format."""

    def student_lora_config(self):
        """The student's ``peft.LoraConfig`` (rank, alpha, targets); back ends keep the student
        as the ``"student"`` adapter of ``self.transformer``."""
        return self.transformer.peft_config[STUDENT]

    def save_student_peft(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write the student LoRA (or ``state``) in PEFT format: ``adapter_config.json`` +
        ``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained(transformer, directory)``."""
        from .lora import save_peft_adapter

        state = self.student_state_dict() if state is None else state
        save_peft_adapter(directory, state, self.student_lora_config(), getattr(self, "model_dir", ""))

    @property
    @abstractmethod
    def teacher_names(self) -> list[str]:
        """Names of the loaded teachers."""

    def adapter_names(self) -> list[str]:
        """Every name :meth:`velocity` accepts: student, base, teachers, student copies."""
        return [STUDENT, BASE, *self.teacher_names, *getattr(self, "_student_copies", [])]

    def per_sample_sigma(self, latents: torch.Tensor, sigma, embeds: PromptEmbeds, adapter: str) -> torch.Tensor:
        """Check a :meth:`velocity` call (known adapter, one embedding row per latent) and return
        ``sigma`` as a float32 (B,) tensor on the policy's device (a float is broadcast).

        A float becomes a ``torch.full`` (the value travels as a kernel argument);
        ``torch.as_tensor(float, device=cuda)`` would copy it from host memory and block the
        host until the device's queue drains, once per forward."""
        valid = self.adapter_names()
        if adapter not in valid:
            raise ValueError(f"unknown adapter {adapter!r}; valid: {valid}")
        b = latents.shape[0]
        if len(embeds) != b:
            raise ValueError(f"{len(embeds)} prompt embeddings for a batch of {b} latents")
        if not isinstance(sigma, torch.Tensor):
            return torch.full((b,), float(sigma), dtype=torch.float32, device=self.device)
        t = sigma.to(self.device, torch.float32)
        return t.expand(b) if t.ndim == 0 else t.reshape(b)

    def add_student_copy(self, name: str) -> list[torch.nn.Parameter]:
        """A second, frozen adapter ``name`` with the student's LoRA structure and current weights,
        queried as ``velocity(..., adapter=name)`` (DiffusionNFT's old sampling policy). Returns
        its parameters in the order of :meth:`trainable_parameters`: the recipe moves them (e.g.
        an EMA of the student) in place.

        Default: back ends that keep the student as the ``"student"`` peft adapter of
        ``self.transformer`` with an ``AdapterSwitch`` in ``self._switch`` (SD3, FLUX, the toy).
        """
        from .lora import add_adapter_copy

        if name in self.adapter_names():
            raise ValueError(f"adapter name {name!r} is taken ({self.adapter_names()})")
        named = {id(p): n for n, p in self.transformer.named_parameters()}
        copies = add_adapter_copy(self.transformer, STUDENT, name)
        self._switch.restore()  # the student active and the only trainable adapter again
        self.__dict__.setdefault("_student_copies", []).append(name)
        return [copies[named[id(p)]] for p in self.trainable_parameters()]

    def compile_blocks(self, backend: str = "inductor", dynamic: bool = False) -> int:
        """Regional compilation (models/compile.py) of the modules owning the student; returns
        the number of blocks compiled (0: the model has no repeated blocks)."""
        from .compile import compile_repeated_blocks

        return sum(compile_repeated_blocks(m, backend, dynamic) for m in self.unwrap_modules().values())

    def unwrap_modules(self) -> dict[str, Any]:  # optional hook for DDP wrapping
        """Modules that own trainable parameters (for accelerate.prepare)."""
        return {}

    def denoiser_modules(self) -> list[torch.nn.Module]:
        """Every denoiser module (the backbone with its adapters, separate teacher copies): what
        ``distributed.strategy=fsdp`` shards (trainers/sharding.py)."""
        return list(self.unwrap_modules().values())

    def rebind_student(self) -> None:
        """Look the student's parameters up again after the modules were sharded (fully_shard
        registers new parameter objects). Back ends that support sharding implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded (distributed.strategy=fsdp)")
