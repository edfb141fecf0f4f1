"""A toy flow-matching text-to-image model behind the :class:`Policy` interface (the demo's model).

Same contract as the SD3.5 back end, at a size that trains in seconds on a CPU:

* the "latent" is the image itself, 3 x 8 x 8 in [-1, 1], shown at 16 px (``pixel_scale`` 2,
  so that ``sample.resolution`` stays a multiple of 16 like every other family);
* the text encoder is a frozen bag-of-words embedding of the prompt's words (the empty prompt
  has its own row: classifier-free guidance works as in SD3);
* the denoiser is an MLP with adaptive layer norm (the scale and shift of every block come from
  the text and time embedding), predicting the velocity ``v = eps - x0`` at ``sigma``;
* the student and the teachers are REAL peft LoRA adapters on the one denoiser, switched with
  the same :class:`~diffusion_opd.models.lora.AdapterSwitch` as SD3, saved in the diffusers LoRA
  layout that :func:`~diffusion_opd.models.lora.read_lora_adapter` reads back (so a trained
  student is a teacher entry of another config with no conversion).

A model folder holds ``model_index.json`` (``_class_name`` "ToyFlowPipeline", which makes
:func:`~diffusion_opd.models.build_policy` pick this back end; architecture and vocabulary) and
``model.safetensors``. ``model.path = "builtin:toy"`` builds a random (untrained) one.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import BASE, STUDENT, Policy, PromptEmbeds, cfg_combine, check_prompts
from .lora import AdapterSwitch, LoraAdapter, add_lora_adapter, read_lora_adapter
from .specs import DEFAULT_LORA_TARGETS, TeacherSpec

__all__ = ["TOY_LORA_TARGETS", "ToyDenoiser", "ToyPolicy", "save_toy_model", "build_random_toy", "load_toy_model"]

TOY_LORA_TARGETS = DEFAULT_LORA_TARGETS["toy"]
_INDEX = "model_index.json"
_CLASS_NAME = "ToyFlowPipeline"
_WEIGHTS = "model.safetensors"
_LORA_FILE = "pytorch_lora_weights.safetensors"
EMPTY, UNKNOWN = "<empty>", "<unk>"


class _Block(nn.Module):
    """Residual MLP block whose layer-norm scale and shift come from the conditioning."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(c).chunk(2, dim=-1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class ToyDenoiser(nn.Module):
    """``v(x, sigma, text)``: x (B, C, H, W), sigma (B,), text (B, text_dim) -> velocity (B, C, H, W)."""

    def __init__(self, vocab: Sequence[str], image_size: int = 8, channels: int = 3, width: int = 128,
                 depth: int = 3, text_dim: int = 64, time_freqs: int = 16):
        super().__init__()
        self.vocab = list(vocab)
        self.shape = (channels, image_size, image_size)
        self.time_freqs = time_freqs
        self.text = nn.Embedding(len(self.vocab), text_dim)  # the frozen "text encoder"
        self.cond_proj = nn.Linear(text_dim + 2 * time_freqs, width)
        self.in_proj = nn.Linear(channels * image_size**2, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out_proj = nn.Linear(width, channels * image_size**2)

    def embed_text(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Bag of words: the mean embedding of each prompt's tokens (B, text_dim)."""
        device = self.text.weight.device
        flat = torch.as_tensor([i for ids in token_ids for i in ids], device=device)
        offsets = torch.as_tensor([0] + [len(ids) for ids in token_ids[:-1]], device=device).cumsum(0)
        return F.embedding_bag(flat, self.text.weight, offsets, mode="mean")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        freqs = torch.pi * 2.0 ** torch.arange(self.time_freqs, device=x.device, dtype=x.dtype)
        angles = sigma.to(x.dtype)[:, None] * freqs
        c = F.silu(self.cond_proj(torch.cat([text.to(x.dtype), angles.sin(), angles.cos()], dim=-1)))
        h = self.in_proj(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        return self.out_proj(h).view(-1, *self.shape)


def _architecture(model: ToyDenoiser) -> dict:
    return dict(image_size=model.shape[1], channels=model.shape[0], width=model.in_proj.out_features,
                depth=len(model.blocks), text_dim=model.text.embedding_dim, time_freqs=model.time_freqs)


def save_toy_model(model: ToyDenoiser, directory: str, shift: float = 1.0, pixel_scale: int = 2) -> str:
    """Write the backbone (no adapters) as ``toy_config.json`` + ``model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" not in k}
    save_file(state, os.path.join(directory, _WEIGHTS))
    config = dict(_class_name=_CLASS_NAME, **_architecture(model), shift=shift, pixel_scale=pixel_scale,
                  vocab=model.vocab)
    with open(os.path.join(directory, _INDEX), "w") as f:
        json.dump(config, f, indent=1)
    return directory


def build_random_toy(directory: str, seed: int = 0, **architecture) -> str:
    """A randomly initialised toy backbone over the demo world's vocabulary (tests, smoke runs)."""
    from ..data.toy_world import vocabulary

    torch.manual_seed(seed)
    return save_toy_model(ToyDenoiser([EMPTY, UNKNOWN, *vocabulary()], **architecture), directory)


def load_toy_model(directory: str) -> tuple[ToyDenoiser, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(directory, _INDEX)) as f:
        config = json.load(f)
    keys = ("image_size", "channels", "width", "depth", "text_dim", "time_freqs")
    model = ToyDenoiser(config["vocab"], **{k: config[k] for k in keys})
    model.load_state_dict(load_file(os.path.join(directory, _WEIGHTS)))
    return model, config


class ToyPolicy(Policy):
    """Student LoRA + frozen LoRA teachers on a :class:`ToyDenoiser`.

    Built by :func:`~diffusion_opd.models.build_policy` (arguments checked there). ``student_init``
    (``model.student_init``): the student starts as exactly that adapter (cascade stages). The
    SD3-only options (text-encoder offloading, sequence length, guidance embedding, the teacher
    merge fast path) do not apply and are ignored.
    """

    def __init__(self, model_dir: str, *, dtype: torch.dtype, device: torch.device, lora: dict,
                 teachers: Sequence[TeacherSpec] = (), student_init: Optional[LoraAdapter] = None,
                 **_not_applicable):
        from peft import LoraConfig, inject_adapter_in_model

        from .hub import resolve_adapter

        self.model_dir, self.dtype, self.device = model_dir, dtype, torch.device(device)
        model, config = load_toy_model(model_dir)
        bad = [t for t in lora["target_modules"] if t.split(".")[-1] not in TOY_LORA_TARGETS]
        if bad:
            raise ValueError(f"LoRA target_modules {bad} do not exist in the toy model; valid: {list(TOY_LORA_TARGETS)}")
        self.scheduler_shift = float(config["shift"])
        self.pixel_scale = int(config["pixel_scale"])
        self._token = {w: i for i, w in enumerate(model.vocab)}
        model.requires_grad_(False)
        if student_init is not None:
            add_lora_adapter(model, student_init, STUDENT, label="model.student_init")
            self.lora_config, self.transformer = student_init.config, model
        else:
            self.lora_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], init_lora_weights=lora["init"],
                                          target_modules=list(lora["target_modules"]))
            self.transformer = inject_adapter_in_model(self.lora_config, model, adapter_name=STUDENT)
        self._teacher_names = [t.name for t in teachers]
        for spec in teachers:
            if spec.kind != "lora":
                raise ValueError(f"teacher '{spec.name}': the toy model takes LoRA teachers only, got kind {spec.kind!r}")
            folder = resolve_adapter(spec.path, subfolder=spec.subfolder, revision=spec.revision,
                                     weight_name=spec.weight_name, what=f"teacher '{spec.name}'")
            add_lora_adapter(self.transformer, read_lora_adapter(folder, spec.weight_name), spec.name,
                             label=f"teacher '{spec.name}'")
        self.transformer.to(self.device, dtype)
        self._switch = AdapterSwitch(self.transformer, default=STUDENT)
        self._switch.restore()
        self._student = {n: p for n, p in self.transformer.named_parameters() if f".{STUDENT}." in n}
        for p in self._student.values():  # the student trains in fp32 whatever the backbone dtype
            p.data = p.data.float()
        self._student_module: nn.Module = self.transformer

    @property
    def teacher_names(self) -> list[str]:
        return list(self._teacher_names)

    def set_student_module(self, module: nn.Module) -> None:
        """Route student forwards WITH grad through ``module`` (e.g. a DDP wrapper)."""
        self._student_module = module

    def unwrap_modules(self) -> dict:
        return {"transformer": self.transformer}

    # ---------------------------------------------------------------- prompts
    def token_ids(self, prompt: str) -> list[int]:
        from ..data.toy_world import tokenize

        words = tokenize(prompt)
        return [self._token.get(w, self._token[UNKNOWN]) for w in words] or [self._token[EMPTY]]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Bag-of-words embeddings of ``prompts`` and of the empty prompt (for CFG)."""
        prompts = check_prompts(prompts)
        text = self.transformer.embed_text([self.token_ids(p) for p in prompts])
        empty = self.transformer.embed_text([[self._token[EMPTY]]])
        return PromptEmbeds(prompts, {"text": text}, {"text": empty})

    # ---------------------------------------------------------------- denoiser
    def velocity(self, latents: torch.Tensor, sigma, embeds: PromptEmbeds, adapter: str = STUDENT,
                 guidance_scale: float = 1.0, detach_uncond: bool = False) -> torch.Tensor:
        """Velocity under ``adapter`` with CFG in one batched forward (see :meth:`Policy.velocity`)."""
        t = self.per_sample_sigma(latents, sigma, embeds, adapter)
        b = latents.shape[0]
        x, text = latents.to(self.device, self.dtype), embeds.cond["text"].to(self.device)
        cfg = guidance_scale > 1.0
        if cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            text = torch.cat([embeds.uncond["text"].to(self.device).expand(b, -1), text])
        grad = adapter == STUDENT and torch.is_grad_enabled()
        module = self._student_module if grad else self.transformer
        if adapter != STUDENT:
            self._switch.activate(None if adapter == BASE else adapter)
        try:
            with torch.set_grad_enabled(grad):
                out = module(x, t, text)
        finally:  # the student is active again after every call
            if adapter != STUDENT:
                self._switch.back()
        if cfg:
            out = cfg_combine(out, guidance_scale, detach_uncond)
        return out.to(latents.dtype)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """The image itself: (3, 8, 8) for the one resolution the model draws (8 x ``pixel_scale``)."""
        c, h, w = self.transformer.shape
        if resolution != h * self.pixel_scale:
            raise ValueError(f"the toy model draws {h * self.pixel_scale} px images only, got resolution {resolution}")
        return (c, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """[-1, 1] pixels -> PIL images upscaled ``pixel_scale`` x (nearest), or (B, 3, H, W) in [0, 1]."""
        from PIL import Image

        images = ((latents.float().clamp(-1, 1) + 1) / 2).cpu()
        images = images.repeat_interleave(self.pixel_scale, -1).repeat_interleave(self.pixel_scale, -2)
        if output_type == "pt":
            return images
        arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arrays]

    # ---------------------------------------------------------------- student weights
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._student.values())

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """``<module>.lora_A.weight`` / ``lora_B`` (peft naming, adapter name dropped), clones."""
        return {n.replace(f".{STUDENT}.", "."): p.detach().clone() for n, p in self._student.items()}

    def load_student_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {n.replace(f".{STUDENT}.", "."): n for n in self._student}
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        if missing or extra:
            raise ValueError(f"student state dict mismatch: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(extra)[:3]} ({len(missing)} / {len(extra)} keys)")
        with torch.no_grad():
            for key, name in expected.items():
                self._student[name].copy_(state[key])

    def save_student(self, directory: str, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """``pytorch_lora_weights.safetensors`` in the diffusers layout (``transformer.`` keys, the
        LoraConfig in the metadata): loads back as a teacher with ``read_lora_adapter``."""
        from safetensors.torch import save_file

        state = self.student_state_dict() if state is None else state
        meta = {f"transformer.{k}": v for k, v in (("r", self.lora_config.r),
                                                   ("lora_alpha", self.lora_config.lora_alpha))}
        os.makedirs(directory, exist_ok=True)
        save_file({f"transformer.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
                  os.path.join(directory, _LORA_FILE),
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def count_parameters(model: nn.Module) -> int:
    """Backbone parameters (no adapters)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)

