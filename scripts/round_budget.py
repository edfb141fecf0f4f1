"""What one OPD round costs on a real-size model, predicted from the architecture on the ``meta``
device (no weights, no GPU, a few seconds of CPU): FLOPs and per-GPU memory. Tooling for
``scripts/benchmark.py --expected-flops / --expected-memory``, not library.

Memory is counted, not guessed:

* weights: the exact parameter counts of the transformer, the text encoders and the VAE
  (public configs, models/architectures.py) times their dtype size;
* the student LoRA: fp32 weights + fp32 gradients + AdamW's two fp32 moments + the fp32 EMA
  (20 bytes per parameter); each LoRA teacher: its adapter in the backbone dtype;
* activations: every tensor autograd saves for the backward of one grad-enabled student forward,
  recorded with ``torch.autograd.graph.saved_tensors_hooks`` (each tensor once) per transformer
  block. Attention is counted as a flash / memory-efficient kernel saves it (q, k, v, output and
  the fp32 log-sum-exp, no L x L matrix), which is what PyTorch's SDPA picks on an H100/H200 in
  bf16. With gradient checkpointing (the diffusers transformers checkpoint every block) the
  forward keeps each block's inputs plus what is saved outside the blocks, and the backward
  re-runs one block at a time: peak = inputs of all blocks + outside + the largest block's saved
  tensors, with that block's activation gradients (at most as large again) on top.

Not counted: the CUDA context and allocator slack (typically 0.5-2 GB), the no-grad teacher
forward's transient buffers (one block's intermediate at a time: under 0.3 GB at 512 px),
and the reward models of the periodic evaluation.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from diffusion_opd.models.architectures import ARCHITECTURES, meta_inputs, meta_student

__all__ = ["expected_flops_embedded_guidance", "expected_flops_cfg", "round_memory", "sharded_round_memory", "HUB_IDS", "fsdp_budget_line"]

GB = 1e9


def expected_flops_embedded_guidance(model: str, spec) -> dict:
    """flux_mopd's round for a guidance-distilled model: every forward is 3 rows (3 images, the
    guidance is an embedding, no uncond branch): 3 tasks x 10 rollout forwards + 27 teacher
    forwards + 27 backwards; two_pass adds 27 replayed student forwards."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = meta_student(model, spec.student_rank)
    counts = {}
    with FlopCounterMode(display=False) as counter:
        out = transformer(**meta_inputs(model, 3, spec.resolution))[0]
        counts["forward"] = counter.get_total_flops()
        out.float().square().mean().backward()
        counts["backward"] = counter.get_total_flops() - counts["forward"]
    fwd3, bwd3 = counts["forward"], counts["backward"]
    phases = {"rollout": 30 * fwd3, "teacher": 27 * fwd3, "backward": 27 * bwd3, "optimizer": 0}
    fused = sum(phases.values())
    return {"model": model, "forward_3_rows": fwd3, "backward_3_rows": bwd3, "fused_phases": phases,
            "fused": fused, "two_pass": fused + 27 * fwd3, "two_pass_over_fused": (fused + 27 * fwd3) / fused}


def expected_flops_cfg(model: str, spec) -> dict:
    """mopd's round for a model with classifier-free guidance (Qwen-Image, Wan): 3 tasks x 10
    rollout forwards of 2 x ``images`` rows (uncond + cond), 9 trained steps x (teacher rows:
    one cond-only teacher + two CFG teachers), 27 backwards of the CFG student; two_pass adds 27
    replayed student forwards. ``images`` = 3 (the recipe's images per task per GPU) unless the
    spec says otherwise."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = meta_student(model, spec.student_rank)
    images = getattr(spec, "images", 3)

    def count(rows: int, grad: bool) -> tuple[int, int]:
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            out = transformer(**meta_inputs(model, rows, spec.resolution))[0]
            forward = counter.get_total_flops()
            if grad:
                out.float().square().mean().backward()
        return forward, counter.get_total_flops() - forward

    fwd_cfg, bwd_cfg = count(2 * images, True)
    fwd_cond, _ = count(images, False)
    phases = {"rollout": 30 * fwd_cfg, "teacher": 9 * (fwd_cond + 2 * fwd_cfg), "backward": 27 * bwd_cfg,
              "optimizer": 0}
    fused = sum(phases.values())
    return {"model": model, f"forward_{2 * images}_rows": fwd_cfg, f"forward_{images}_rows": fwd_cond,
            f"backward_{2 * images}_rows": bwd_cfg, "fused_phases": phases, "fused": fused,
            "two_pass": fused + 27 * fwd_cfg, "two_pass_over_fused": (fused + 27 * fwd_cfg) / fused}


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
def _flash_like_sdpa():
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


def activation_bytes(model: str, rows: int, resolution: int, rank: int = 32) -> dict:
    """Bytes autograd saves in one grad-enabled student forward of ``rows`` images, split into
    what each block saves, the blocks' inputs, and what is saved outside the blocks."""
    transformer = meta_student(model, rank)
    blocks = [m for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
              for m in getattr(transformer, name, [])]
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
        with _flash_like_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            transformer(**meta_inputs(model, rows, resolution))
    finally:
        for h in handles:
            h.remove()
    outside = total[0] - sum(per_block)
    return {"saved_total": total[0], "block_max": max(per_block), "block_inputs": inputs[0], "outside_blocks": outside,
            "checkpointed_peak": inputs[0] + outside + 2 * max(per_block)}


def _param_bytes(modules, dtype_bytes: int) -> int:
    return sum(p.numel() for m in modules for p in m.parameters()) * dtype_bytes


def round_memory(model: str, *, resolution: int = 512, images: int = 3, rank: int = 32, teachers: int = 3,
                 weight_bytes: int = 2, checkpointing: bool = True, text_encoders_resident: bool = True) -> dict:
    """Per-GPU bytes of one round of the OPD recipe on ``model`` (``images`` per micro-batch)."""
    import diffusers

    arch = ARCHITECTURES[model]
    rows = images * (2 if arch.cfg else 1)  # CFG runs the uncond rows in the same batch (a video: one row)
    student = meta_student(model, rank)
    lora = sum(p.numel() for p in student.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    with torch.device("meta"):
        text = [cls(cfg) for cls, cfg in arch.text_encoders()]
        vae_cls, vae_cfg = arch.vae()
        vae = getattr(diffusers, vae_cls.__name__)(**vae_cfg)
    act = activation_bytes(model, rows, resolution, rank)
    parts = {
        "transformer_weights": backbone * weight_bytes,
        "text_encoders": _param_bytes(text, weight_bytes) if text_encoders_resident else 0,
        "vae": _param_bytes([vae], weight_bytes),
        "student_lora_weights_grads_adam_ema": lora * 20,
        "teacher_loras": teachers * lora * weight_bytes,
        "activations": act["checkpointed_peak"] if checkpointing else act["saved_total"],
    }
    return {"model": model, "resolution": resolution, "rows_per_forward": rows, "checkpointing": checkpointing,
            "parameters": {"transformer": backbone, "student_lora": lora,
                           "text_encoders": sum(p.numel() for m in text for p in m.parameters()),
                           "vae": sum(p.numel() for p in vae.parameters())},
            "activation_detail": act, "bytes": parts, "total_bytes": sum(parts.values()),
            "total_gb": round(sum(parts.values()) / GB, 1)}


def sharded_round_memory(model: str, world: int, **kwargs) -> dict:
    """Per-GPU bytes of one OPD round under ``distributed.strategy=fsdp`` over ``world`` GPUs
    (the other arguments as :func:`round_memory`).

    Sharded 1/world: the frozen transformer weights, the teacher LoRAs, and the student's fp32
    weights, Adam moments and EMA (16 bytes per parameter). Whole on every GPU: the student's
    accumulated gradients (4 bytes per parameter: gradient sync is off until the round's last
    backward, so each GPU keeps the unsharded sum), the all-gathered working set (the root
    module, which stays gathered through a forward, plus two blocks: the running one and the
    prefetched next one), the text encoders and the VAE (not sharded), and the activations
    (data parallel: each GPU runs its own images)."""
    flat = round_memory(model, **kwargs)
    wb = kwargs.get("weight_bytes", 2)
    student = meta_student(model, kwargs.get("rank", 32))
    blocks = [m for name in ("transformer_blocks", "single_transformer_blocks") for m in getattr(student, name, [])]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in student.parameters() if id(p) not in in_blocks and not p.requires_grad)
    block_max = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    lora = flat["parameters"]["student_lora"]
    b = flat["bytes"]
    parts = {
        "transformer_weights_shard": b["transformer_weights"] // world,
        "gathered_root_and_two_blocks": (root + 2 * block_max) * wb,
        "text_encoders": b["text_encoders"],
        "vae": b["vae"],
        "student_lora_shards_adam_ema": lora * 16 // world,
        "student_lora_grads_unsharded": lora * 4 + lora * 4 // world,
        "teacher_lora_shards": b["teacher_loras"] // world,
        "activations": b["activations"],
    }
    total = sum(parts.values())
    return {"model": model, "world": world, "bytes": parts, "total_bytes": total, "total_gb": round(total / GB, 1),
            "ddp_total_gb": flat["total_gb"]}


HUB_IDS = {  # model.path -> the architecture counted here
    "stabilityai/stable-diffusion-3.5-medium": "sd3.5-medium",
    "stabilityai/stable-diffusion-3.5-large": "sd3.5-large",
    "black-forest-labs/FLUX.1-dev": "flux.1-dev",
}


def fsdp_budget_line(config, world: int, gpu_bytes: Optional[int] = None) -> Optional[str]:
    """The per-GPU memory line ``--validate_only`` prints for an fsdp run of a counted model
    (None for other models). Raises ConfigError (one line) when ``gpu_bytes`` is known and the
    round cannot fit."""
    from diffusion_opd.errors import ConfigError

    model = HUB_IDS.get(str(config.model.path))
    if model is None or config.distributed.strategy != "fsdp":
        return None
    tasks = max(1, len(config.tasks)) if config.perf.lockstep_tasks else 1
    wb = 4 if config.model.dtype == "fp32" else 2
    mem = sharded_round_memory(model, world, resolution=config.sample.resolution,
                               images=config.train.batch_size * tasks, rank=config.lora.rank,
                               teachers=len(config.teachers), weight_bytes=wb,
                               checkpointing=config.model.gradient_checkpointing)
    line = (f"[fsdp] {model} over {world} GPUs: {mem['total_gb']} GB per GPU for a round "
            f"(ddp: {mem['ddp_total_gb']} GB; counted from the architecture, scripts/round_budget.py)")
    if gpu_bytes and mem["total_bytes"] > gpu_bytes:
        raise ConfigError(f"distributed.strategy: fsdp over {world} GPUs needs about {mem['total_gb']} GB per GPU for "
                          f"{model} but the GPU has {gpu_bytes / GB:.1f} GB; use more GPUs, "
                          "model.gradient_checkpointing=true or a smaller train.batch_size")
    return line


def main(argv=None) -> None:
    """``python scripts/round_budget.py --world 2 4 8``: per-GPU GB of an OPD round (512 px, 3
    images, 3 teacher LoRAs, bf16, checkpointing) under ddp and under fsdp over each world size,
    for every counted model, as a markdown table."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES))
    args = parser.parse_args(argv)
    print("| model | ddp | " + " | ".join(f"fsdp x{w}" for w in args.world) + " |")
    print("|---|---|" + "---|" * len(args.world))
    for model in args.models:
        cells = [f"{sharded_round_memory(model, w)['total_gb']} GB" for w in args.world]
        print(f"| {model} | {round_memory(model)['total_gb']} GB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
