"""What one OPD round costs per GPU on a real-size model, counted from the architecture on the
``meta`` device (no weights, no GPU, seconds of CPU): memory under ``distributed.strategy`` =
``ddp`` or ``fsdp`` over N GPUs, and FLOPs. ``dopd-train --validate_only`` prints the memory of
the configured model and refuses a GPU it cannot fit; ``scripts/round_budget.py`` writes the
table of README / docs/benchmarks.md; ``scripts/benchmark.py --expected-flops`` the FLOPs.

Memory is counted, not guessed:

* weights: the exact parameter counts of the transformer, the text encoders and the VAE
  (public configs, models/architectures.py) times their dtype size;
* the student LoRA: fp32 weights + fp32 gradients + AdamW's two fp32 moments + the fp32 EMA
  (20 bytes per parameter); each LoRA teacher: its adapter (at the student's rank) in the
  backbone dtype; a full-transformer teacher (``kind="transformer"``): a whole backbone;
* activations: every tensor autograd saves for the backward of one grad-enabled student forward,
  recorded with ``torch.autograd.graph.saved_tensors_hooks`` (each tensor once) per transformer
  block. Attention is counted as a flash / memory-efficient kernel saves it (q, k, v, output and
  the fp32 log-sum-exp, no L x L matrix), which is what PyTorch's SDPA picks on an H100/H200 in
  bf16. With gradient checkpointing (the diffusers transformers checkpoint every block) the
  forward keeps each block's inputs plus what is saved outside the blocks, and the backward
  re-runs one block at a time: peak = inputs of all blocks + outside + the largest block's saved
  tensors, with that block's activation gradients (at most as large again) on top.

Under ``fsdp`` (trainers/sharding.py) each GPU keeps 1/N of the frozen transformer, of the teacher
adapters and of the student's fp32 weights, Adam moments and EMA; whole on every GPU: the
student's accumulated gradients (sync is off until the round's last backward, so each GPU sums
the unsharded gradient), the all-gathered working set (the root module plus two blocks: the
running one and the prefetched next), the VAE and the activations (data parallel: each GPU runs
its own samples). Text encoders are placed by ``text_encoders``: ``replicate`` (whole on every
GPU), ``shard`` (1/N each plus the largest layer gathered twice and the encoder's root), or
``rank0`` (whole on rank 0, which encodes for everyone: the busiest GPU, which is what a budget
reports, holds them whole; the others hold none).

Not counted: the CUDA context and allocator slack (typically 0.5-2 GB), the no-grad teacher
forward's transient buffers (one block's intermediates at a time), and the reward models of the
periodic evaluation.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Callable, Optional

import torch

from .config import CHOICES
from .errors import ConfigError
from .models.architectures import ARCHITECTURES, meta_inputs, meta_student
from .models.compile import nested_repeated_blocks as _blocks  # a transformer's blocks, a text encoder's layers

__all__ = ["GB", "TEXT_ENCODER_PLACEMENTS", "RECIPES", "Geometry", "geometry_of", "recipe_geometry", "round_memory",
           "allgather_volume", "round_flops", "expected_flops", "expected_flops_cfg", "expected_flops_embedded_guidance",
           "gpu_memory_bytes", "budget_line"]

GB = 1e9
TEXT_ENCODER_PLACEMENTS = CHOICES["distributed.text_encoders"]  # the config owns the names
FSDP_WORLDS = (2, 4, 8)  # the world sizes --validate_only shows next to the configured one

# Each counted architecture at its recipe's geometry (the shipped config the table row reads).
RECIPES = {
    "sd3.5-medium": "opd:mopd",
    "sd3.5-large": "opd:sd35_large_mopd",
    "flux.1-dev": "opd:flux_mopd",
    "flux.2-dev": "opd:flux2_mopd",
    "qwen-image": "opd:qwen_image_mopd",
    "wan2.1-t2v-1.3b": "opd:wan_t2v_mopd",
    "wan2.1-t2v-14b": "opd:wan_t2v_mopd",  # the same recipe on the 14B folder
    "wan2.2-t2v-a14b": "opd:wan22_t2v_mopd",
}


@dataclass(frozen=True)
class Geometry:
    """What one OPD round runs on each GPU (from a config: :func:`geometry_of`)."""

    resolution: int = 512
    frames: int = 0  # video: frames per sample (0: an image model)
    text_tokens: int = 0  # prompt_embeds length (0: the architecture's)
    images: int = 3  # samples per task per student forward (train.batch_size)
    tasks: int = 3
    lockstep: bool = False  # perf.lockstep_tasks: every task's samples in one student forward
    steps: int = 10  # rollout steps per trajectory
    trained: int = 9  # of which trained (one backward each)
    rank: int = 32  # student LoRA rank (the teachers' too)
    student_cfg: bool = True  # the student's forward runs two rows per sample (CFG)
    teacher_cfg: tuple = (False, True, True)  # per task: its teacher runs CFG (mopd: 1.0 / 4.5 / 4.5)
    lora_teachers: int = 3  # LoRA adapters on the backbone
    full_teachers: int = 0  # kind="transformer" teachers: a whole transformer each
    weight_bytes: int = 2  # the frozen backbone's dtype size (bf16 / fp16: 2, fp32: 4)
    checkpointing: bool = True
    offload_text_encoders: bool = False  # model.offload_text_encoders: off the GPU between encodes

    @property
    def rows(self) -> int:
        """Rows of one grad-enabled student forward (a video is one row)."""
        return self.images * (self.tasks if self.lockstep else 1) * (2 if self.student_cfg else 1)


def _runs_cfg(config, arch, scale: float) -> bool:
    """Whether a forward at guidance ``scale`` runs an unconditional row beside the conditional one."""
    if config.model.guidance == "embedded" or float(scale) == 1.0:
        return False
    return config.model.guidance == "true_cfg" or arch.cfg


def geometry_of(config, model: str) -> Geometry:
    """The per-GPU geometry of ``config``'s OPD round on architecture ``model``."""
    arch = ARCHITECTURES[model]
    tasks = list(config.tasks.values())
    teachers = config.teachers
    teacher_cfg = tuple(_runs_cfg(config, arch, teachers[t.teacher].guidance_scale) if t.teacher in teachers else False
                        for t in tasks)
    kinds = [t.kind for t in teachers.values()]
    text = config.model.max_sequence_length + (77 if arch.family == "sd3" else 0)  # SD3: 77 CLIP tokens first
    return Geometry(resolution=config.sample.resolution, frames=config.sample.num_frames, text_tokens=text,
                    images=config.train.batch_size, tasks=max(1, len(tasks)), lockstep=bool(config.perf.lockstep_tasks),
                    steps=config.sample.num_steps, trained=config.train.num_train_steps, rank=config.lora.rank,
                    student_cfg=_runs_cfg(config, arch, config.sample.guidance_scale), teacher_cfg=teacher_cfg,
                    lora_teachers=kinds.count("lora"), full_teachers=kinds.count("transformer"),
                    weight_bytes=4 if config.model.dtype == "fp32" else 2,
                    checkpointing=bool(config.model.gradient_checkpointing),
                    offload_text_encoders=bool(config.model.offload_text_encoders))


def recipe_geometry(model: str) -> Geometry:
    """``model`` at the geometry of its shipped recipe (:data:`RECIPES`)."""
    from .config import load_config

    return geometry_of(load_config(RECIPES[model], []), model)


# ------------------------------------------------------------------------------- activations
class _FlashLikeAttention(torch.autograd.Function):
    """SDPA with the saved tensors of a flash kernel: q, k, v, out and the fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def flash_like_sdpa():
    """``scaled_dot_product_attention`` replaced by :class:`_FlashLikeAttention` (meta tensors only)."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _FlashLikeAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def activation_bytes(model: str, geo: Geometry) -> dict:
    """Bytes autograd saves in one grad-enabled student forward of ``geo.rows`` rows, split into
    what each block saves, the blocks' inputs, and what is saved outside the blocks."""
    transformer = meta_student(model, geo.rank)
    blocks = _blocks(transformer)
    seen: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so ids stay unique)
    total = [0]

    def pack(t):
        if id(t) not in seen:
            seen[id(t)] = t
            total[0] += _nbytes(t)
        return t

    per_block, inputs, input_ids, marks = [], [0], set(), {}

    def pre(module, args, kwargs):
        for t in _tensors((args, kwargs)):
            if id(t) not in input_ids:
                input_ids.add(id(t))
                seen.setdefault(id(t), t)
                inputs[0] += _nbytes(t)
        marks[id(module)] = total[0]

    def post(module, args, kwargs, out):
        per_block.append(total[0] - marks[id(module)])

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(post, with_kwargs=True) for b in blocks]
    try:
        with flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            transformer(**meta_inputs(model, geo.rows, geo.resolution, frames=geo.frames, text_tokens=geo.text_tokens))
    finally:
        for h in handles:
            h.remove()
    outside = total[0] - sum(per_block)
    return {"saved_total": total[0], "block_max": max(per_block), "block_inputs": inputs[0], "outside_blocks": outside,
            "checkpointed_peak": inputs[0] + outside + 2 * max(per_block)}


# ------------------------------------------------------------------------------------ memory
def _numel(module: torch.nn.Module, trainable: Optional[bool] = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _shape(module: torch.nn.Module) -> dict:
    """A model's parameters as FSDP would group them: in total, in its largest repeated layer,
    and outside the repeated layers (the root group, gathered for the whole forward)."""
    blocks = _blocks(module)
    return {"total": _numel(module), "largest_layer": max((_numel(b) for b in blocks), default=0),
            "root": _numel(module) - sum(_numel(b) for b in blocks)}


@lru_cache(maxsize=16)
def _counts(model: str, geo: Geometry) -> dict:
    """Everything the memory of a round needs, counted once per architecture and geometry."""
    import diffusers

    arch = ARCHITECTURES[model]
    student = meta_student(model, geo.rank)
    frozen = _blocks(student)
    with torch.device("meta"):
        text = [cls(cfg) for cls, cfg in arch.text_encoders()]
        vae_cls, vae_cfg = arch.vae()
        vae = getattr(diffusers, vae_cls.__name__)(**vae_cfg)
    in_blocks = {id(p) for b in frozen for p in b.parameters()}
    # Several experts (Wan 2.2 A14B): each holds its weights and its LoRAs, one runs per forward
    # (the activations and the gathered blocks are one expert's).
    e = arch.experts
    return {"experts": e, "backbone": e * _numel(student, trainable=False), "student_lora": e * _numel(student, trainable=True),
            "root": e * sum(p.numel() for p in student.parameters() if id(p) not in in_blocks and not p.requires_grad),
            "block_max": max(_numel(b) for b in frozen),
            "text_encoders": [_shape(t) for t in text], "vae": _numel(vae),
            "activations": activation_bytes(model, geo)}


def round_memory(model: str, geo: Geometry = Geometry(), strategy: str = "ddp", world: int = 1,
                 text_encoders: str = "replicate") -> dict:
    """Per-GPU bytes of one OPD round on ``model`` under ``strategy`` over ``world`` GPUs (the
    busiest GPU: rank 0 under ``text_encoders="rank0"``)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy {strategy!r}: ddp or fsdp")
    if text_encoders not in TEXT_ENCODER_PLACEMENTS:
        raise ValueError(f"text_encoders {text_encoders!r}: one of {', '.join(TEXT_ENCODER_PLACEMENTS)}")
    c, wb, n = _counts(model, geo), geo.weight_bytes, world
    lora, act = c["student_lora"], c["activations"]
    encoders = c["text_encoders"]
    text_whole = sum(e["total"] for e in encoders) * wb
    if geo.offload_text_encoders:
        text_bytes = 0
    elif text_encoders == "shard":  # encoders run one at a time: one gathered working set
        text_bytes = text_whole // n + max((e["root"] + 2 * e["largest_layer"] for e in encoders), default=0) * wb
    else:
        text_bytes = text_whole
    if strategy == "ddp":
        parts = {
            "transformer_weights": c["backbone"] * wb,
            "full_teacher_weights": geo.full_teachers * c["backbone"] * wb,
            "student_lora_weights_grads_adam_ema": lora * 20,
            "teacher_loras": geo.lora_teachers * lora * wb,
        }
    else:
        parts = {
            "transformer_weights": (1 + geo.full_teachers) * c["backbone"] * wb // n,
            "gathered_root_and_two_blocks": (c["root"] + 2 * c["block_max"]) * wb,
            "student_lora_shards_adam_ema": lora * 16 // n,
            "student_lora_grads_unsharded": lora * 4 + lora * 4 // n,
            "teacher_loras": geo.lora_teachers * lora * wb // n,
        }
    parts.update({"text_encoders": text_bytes, "vae": c["vae"] * wb,
                  "activations": act["checkpointed_peak"] if geo.checkpointing else act["saved_total"]})
    total = sum(parts.values())
    return {"model": model, "strategy": strategy, "world": n, "text_encoders_placement": text_encoders,
            "geometry": asdict(geo), "rows_per_forward": geo.rows,
            "parameters": {"transformer": c["backbone"], "student_lora": lora,
                           "text_encoders": sum(e["total"] for e in encoders), "vae": c["vae"]},
            "activation_detail": act, "bytes": parts, "total_bytes": total, "total_gb": round(total / GB, 1)}


def allgather_volume(model: str, geo: Geometry = Geometry(), world: int = 8, bandwidth: float = 360e9) -> dict:
    """What FSDP2 moves per GPU in one round (``reshard_after_forward=true``): every forward and
    every backward all-gathers the whole transformer with its adapters (the student LoRA and the
    LoRA teachers, at the compute dtype), each GPU receiving ``(N-1)/N`` of it; per task (all
    tasks at once under lockstep) ``steps`` rollout forwards, ``trained`` teacher forwards and
    ``trained`` backwards (the checkpointed recompute runs inside the backward's gather). The
    student's fp32 LoRA gradients are reduce-scattered once. ``bandwidth``: the all-gather bus
    bandwidth assumed (bytes/s; 360e9 = ~80% of NVLink 4's 450 GB/s per direction). A gather moves
    one expert of a two-expert model (the one its step runs), whose LoRA gradients are then
    reduce-scattered at every backward (trainers/sharding.py ReduceOnce)."""
    c = _counts(model, geo)
    e = c["experts"]
    per_gather = (c["backbone"] + (1 + geo.lora_teachers) * c["student_lora"]) * geo.weight_bytes // e
    batches = 1 if geo.lockstep else geo.tasks
    gathers = batches * (geo.steps + 2 * geo.trained)
    received = gathers * per_gather * (world - 1) // world
    reduces = 1 if e == 1 else batches * geo.trained
    return {"model": model, "world": world, "gathers_per_round": gathers, "bytes_per_gather": per_gather,
            "received_per_gpu": received, "seconds_at_bandwidth": received / bandwidth, "bandwidth": bandwidth,
            "lora_reduce_scatter_bytes": reduces * c["student_lora"] // e * 4 * (world - 1) // world}


# ------------------------------------------------------------------------------------- FLOPs
def round_flops(count: Callable[[int, bool], tuple[int, int]], geo: Geometry, model: str = "") -> dict:
    """FLOPs of one round composed the way the trainer runs it, from ``count(rows, grad)`` =
    (forward, backward) FLOPs of one student forward over ``rows`` rows: per task ``steps``
    rollout forwards of the student, ``trained`` teacher forwards and ``trained`` backwards;
    two_pass adds the replayed student forwards; gradient checkpointing re-runs each trained
    forward inside its backward. The tiny benchmark's measured phase FLOPs check this
    composition (tests/test_benchmark.py)."""
    rows = geo.images * (2 if geo.student_cfg else 1)
    fwd, bwd = count(rows, True)
    forwards = {rows: fwd}
    for cfg in geo.teacher_cfg:
        r = geo.images * (2 if cfg else 1)
        if r not in forwards:
            forwards[r] = count(r, False)[0]
    teacher = sum(forwards[geo.images * (2 if cfg else 1)] for cfg in geo.teacher_cfg)
    trained = geo.tasks * geo.trained
    phases = {"rollout": geo.tasks * geo.steps * fwd, "teacher": geo.trained * teacher, "backward": trained * bwd,
              "optimizer": 0}
    fused = sum(phases.values())
    return {"model": model, **{f"forward_{r}_rows": f for r, f in sorted(forwards.items(), reverse=True)},
            f"backward_{rows}_rows": bwd, "fused_phases": phases, "fused": fused, "two_pass": fused + trained * fwd,
            "two_pass_over_fused": (fused + trained * fwd) / fused, "checkpointing_recompute": trained * fwd}


def _meta_count(model: str, geo: Geometry) -> Callable[[int, bool], tuple[int, int]]:
    from torch.utils.flop_counter import FlopCounterMode

    transformer = meta_student(model, geo.rank)

    def count(rows: int, grad: bool) -> tuple[int, int]:
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            out = transformer(**meta_inputs(model, rows, geo.resolution, frames=geo.frames,
                                            text_tokens=geo.text_tokens))[0]
            forward = counter.get_total_flops()
            if grad:
                out.float().square().mean().backward()
        return forward, counter.get_total_flops() - forward
    return count


def expected_flops_cfg(model: str, geo: Geometry = Geometry()) -> dict:
    """The round of a model with classifier-free guidance (SD3.5, Qwen-Image's true CFG, Wan):
    the student's forwards run two rows per sample (uncond + cond), each teacher two rows at a
    scale other than 1, one at 1."""
    return round_flops(_meta_count(model, geo), replace(geo, student_cfg=True), model)


def expected_flops_embedded_guidance(model: str, geo: Geometry = Geometry()) -> dict:
    """The round of a guidance-distilled model (FLUX.1-dev, FLUX.2-dev): every forward is one row
    per sample, the guidance scale is an embedding (no uncond branch)."""
    geo = replace(geo, student_cfg=False, teacher_cfg=(False,) * len(geo.teacher_cfg))
    return round_flops(_meta_count(model, geo), geo, model)


def expected_flops(model: str, geo: Optional[Geometry] = None) -> dict:
    """``model``'s round at ``geo`` (default: its recipe's geometry), CFG or embedded guidance
    as the architecture runs it."""
    geo = geo or recipe_geometry(model)
    count = expected_flops_cfg if ARCHITECTURES[model].cfg else expected_flops_embedded_guidance
    return {**count(model, geo), "geometry": asdict(geo)}


# --------------------------------------------------------------------------- --validate_only
def gpu_memory_bytes(config) -> Optional[int]:
    """The memory of the GPU this process will run on: ``distributed.gpu_memory_gb`` when set
    (planning a run from another machine), else CUDA's device properties, else None (unknown)."""
    if config.distributed.gpu_memory_gb > 0:
        return int(config.distributed.gpu_memory_gb * GB)
    if str(config.device) != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    return None


def _has_second_expert(path: str, revision: Optional[str]) -> bool:
    """Whether the pipeline has a ``transformer_2`` (Wan 2.2 A14B), from its config file alone."""
    from .models.backbone import transformer_config

    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "transformer_2", "config.json"))
    try:
        return transformer_config(path, revision, subfolder="transformer_2") is not None
    except ConfigError:  # the Hub repo has no transformer_2/config.json
        return False


def budget_line(config, world: int, gpu_bytes: Optional[int] = None) -> Optional[str]:
    """The per-GPU memory line ``--validate_only`` prints for an OPD config whose backbone is a
    counted architecture (None otherwise: the tiny and toy models, stage-1 recipes). Raises a
    one-line ConfigError when ``gpu_bytes`` is known and the configured strategy over ``world``
    GPUs does not fit it."""
    from .models.architectures import architecture_of
    from .models.backbone import BUILTIN, transformer_config

    path = str(config.model.path)
    if config.recipe != "opd" or path.startswith(BUILTIN):
        return None
    cfg = transformer_config(path, config.model.revision or None)
    if not cfg:
        return None
    model = architecture_of(cfg, experts=2 if _has_second_expert(path, config.model.revision or None) else 1)
    if model is None:
        return None
    geo = geometry_of(config, model)
    placement = config.distributed.text_encoders
    strategy = config.distributed.strategy
    worlds = sorted(set(FSDP_WORLDS) | ({world} if world >= 2 else set()))
    fsdp = {n: round_memory(model, geo, "fsdp", n, placement) for n in worlds}
    ddp = round_memory(model, geo, "ddp", world, placement)
    this = ddp if strategy == "ddp" else fsdp.get(world) or round_memory(model, geo, "fsdp", world, placement)
    shape = f"{geo.frames} frames of " if geo.frames else ""
    line = (f"[budget] {model}, {shape}{geo.resolution} px, {geo.rows} rows per student forward: ddp {ddp['total_gb']} GB"
            f" per GPU, fsdp " + ", ".join(f"x{n} {m['total_gb']} GB" for n, m in fsdp.items())
            + f" (text encoders: {placement}; this run: {strategy} x{world}; counted from the architecture by "
              "diffusion_opd/budget.py, CUDA context not included)")
    if gpu_bytes and this["total_bytes"] > gpu_bytes:
        fits = [n for n, m in fsdp.items() if m["total_bytes"] <= gpu_bytes and (strategy, world) != ("fsdp", n)]
        levers = ([f"distributed.strategy=fsdp over {fits[0]} GPUs ({fsdp[fits[0]]['total_gb']} GB)"] if fits else []) \
            + ([] if geo.checkpointing else ["model.gradient_checkpointing=true"]) \
            + ([] if geo.offload_text_encoders else ["model.offload_text_encoders=true"]) \
            + (["a smaller train.batch_size"] if geo.images > 1 else [])
        raise ConfigError(f"distributed.strategy: {strategy} over {world} GPU{'s' * (world > 1)} needs about "
                          f"{this['total_gb']} GB per GPU for {model} at this geometry but the GPU has "
                          f"{gpu_bytes / GB:.1f} GB (distributed.gpu_memory_gb, else CUDA's); "
                          f"use {' or '.join(levers) or 'a GPU with more memory'}")
    return line
