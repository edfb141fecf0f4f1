"""Performance benchmark of one OPD round: the trainer's own code path, timed and FLOP-counted.

A round here is the trainer's own ``OPD.round`` on a real ``Run`` object, on one process, minus
prompt encoding (random text embeddings of the real shapes stand in for T5 / CLIP, which the
trainer caches per prompt anyway): for each of the three tasks the student rollout, teacher
queries and backward under the trainer's accelerate autocast, then ``Run.optimizer_step``
(clip, AdamW step, EMA). The geometry comes from ``config/opd.py:mopd``.

``scripts/benchmark.py`` is the command line; it runs every variant (:data:`VARIANTS`) in a
fresh process through :func:`run_variant` so memory peaks and accelerate's global state do
not leak from one row to the next.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from diffusion_opd.trainers.metrics import PhaseTimer

__all__ = ["MODELS", "EXPECTED_ONLY", "VARIANTS", "Settings", "default_variants", "resolve_variants", "prepare_models",
           "run_variant", "expected_round_flops", "matmul_peak", "PhaseProfile", "dynamo_counters", "profile_summary"]

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "opd.py")


@dataclass(frozen=True)
class ModelSpec:
    """What differs between the benchmarked models (the OPD geometry itself comes from mopd)."""

    resolution: int  # image side in pixels
    text_tokens: int  # prompt_embeds length: 77 CLIP tokens + the T5 tokens
    student_rank: int
    teacher_rank: int


MODELS = {
    # Tiny random SD3 (2 blocks, width 32): overhead-dominated, a smoke benchmark for the CPU.
    "tiny": ModelSpec(resolution=64, text_tokens=77 + 16, student_rank=8, teacher_rank=8),
    # The SD3.5-Medium transformer (random weights), 512 px, 77 + 256 text tokens, LoRA r 32.
    "sd3.5-medium": ModelSpec(resolution=512, text_tokens=77 + 256, student_rank=32, teacher_rank=32),
}
# Rounds only predicted, at their recipe's geometry (diffusion_opd.budget.RECIPES: resolution,
# frames, images, guidance, text length from config/opd.py): --expected-flops / --expected-memory.
EXPECTED_ONLY = ("sd3.5-large", "flux.1-dev", "flux.2-dev", "qwen-image", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b")


@dataclass(frozen=True)
class Settings:
    """One row of the benchmark: how the same round is run."""

    mode: str = "fused"  # fused | two_pass (trainer's train.mode)
    # adapters (3 LoRA on the backbone) | one (1 adapter for all tasks) | separate (3 full transformers)
    # | merged (perf.merge_teachers: each LoRA merged into its own backbone copy)
    teachers: str = "adapters"
    checkpointing: bool = False
    compile: bool = False  # perf.compile: torch.compile (inductor) per transformer block
    lockstep: bool = False  # perf.lockstep_tasks: all tasks in one batch
    phase_sync: bool = True  # CUDA sync at every phase boundary (per-phase seconds); False: one per round
    legacy_casts: bool = False  # peft's activation upcasts under autocast, as before issue 10
    dtype: Optional[str] = None  # None: the device default (DEFAULT_DTYPE)


VARIANTS = {
    "fused": Settings(),
    "two_pass": Settings(mode="two_pass"),
    "one_teacher": Settings(teachers="one"),
    "separate_teachers": Settings(teachers="separate"),
    "checkpointing": Settings(checkpointing=True),
    "compile": Settings(compile=True),
    "lockstep": Settings(lockstep=True),
    "merge_teachers": Settings(teachers="merged"),
    "no_phase_sync": Settings(phase_sync=False),
    "legacy_casts": Settings(legacy_casts=True),
    # every lever without a memory cost, as a production run would use them (no phase syncs)
    "lockstep_nosync": Settings(lockstep=True, phase_sync=False),  # levers without compilation (eager)
    "levers": Settings(compile=True, lockstep=True, phase_sync=False),
    "levers_merged": Settings(compile=True, lockstep=True, phase_sync=False, teachers="merged"),
    "fp32": Settings(dtype="fp32"),
    "bf16": Settings(dtype="bf16"),
    "fp16": Settings(dtype="fp16"),
}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}


def default_variants(device: str) -> list[str]:
    """Every variant except the dtype row that would repeat the baseline (``fused``)."""
    same = DEFAULT_DTYPE[device]
    return [n for n in VARIANTS if n != same and not (device == "cuda" and n == "fp32")]


def resolve_variants(names: list[str]) -> list[str]:
    """Check variant names (clear error listing the valid ones); keeps the given order."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    if not names:
        raise ValueError(f"no variant given; valid: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- models on disk
def prepare_models(model: str, workdir: str, device: str) -> dict:
    """Write (once) the pipeline folder and three teacher LoRA folders under ``workdir``.

    ``sd3.5-medium``: the tiny pipeline (text encoders / VAE never run) whose transformer is
    replaced by the SD3.5-Medium architecture with random weights (about 5 GB in bf16),
    built on ``device``. Returns ``{"pipeline": dir, "teachers": [dir, dir, dir]}``.
    """
    from diffusion_opd.models.specs import DEFAULT_LORA
    from diffusion_opd.models.tiny import build_random_transformer, build_tiny_sd3, sd35_medium_transformer_config
    from diffusion_opd.models.tiny import write_random_teacher_lora

    spec = MODELS[model]
    root = os.path.join(workdir, model)
    pipeline = os.path.join(root, "pipeline")
    marker = os.path.join(pipeline, "benchmark_ready")
    if not os.path.isfile(marker):  # a half-written folder (killed run) is rebuilt from scratch
        shutil.rmtree(root, ignore_errors=True)
        build_tiny_sd3(pipeline, seed=0)
        if model == "sd3.5-medium":
            shutil.rmtree(os.path.join(pipeline, "transformer"))
            transformer = build_random_transformer(sd35_medium_transformer_config(), dtype=torch.bfloat16,
                                                   device=device, seed=0)
            transformer.save_pretrained(os.path.join(pipeline, "transformer"))
            del transformer
            if device == "cuda":
                torch.cuda.empty_cache()
        open(marker, "w").close()
    # The values of a teacher's weights do not change its cost, so the big model loads one
    # random LoRA file under three names (each load of the 2.5 B backbone on the CPU costs
    # ~10 GB and tens of seconds); the tiny one gets three different teachers.
    n_files = 3 if model == "tiny" else 1
    teachers = []
    for i in range(n_files):
        out = os.path.join(root, f"teacher-{i}")
        if not os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
            write_random_teacher_lora(pipeline, out, seed=i + 1, rank=spec.teacher_rank, scale=0.5,
                                      target_modules=DEFAULT_LORA["target_modules"])
        teachers.append(out)
    return {"pipeline": pipeline, "teachers": [teachers[i % n_files] for i in range(3)]}


# ---------------------------------------------------------------------------- expected FLOPs
def expected_round_flops(model: str = "sd3.5-medium") -> dict:
    """FLOPs of one mopd round predicted from per-forward counts of the architecture on the
    ``meta`` device (no memory, no GPU; seconds on a CPU), composed the way the trainer runs the
    round (diffusion_opd.budget.round_flops; the tiny benchmark's exact phase FLOPs check it,
    tests/test_benchmark.py).

    tiny and sd3.5-medium: the benchmarked round's geometry (3 tasks x 3 images, CFG 4.5, teacher
    CFG 1.0 / 4.5 / 4.5, 10 steps of which 9 trained, the text length of ``MODELS``); the other
    models at their recipe's geometry (diffusion_opd.budget.RECIPES).
    """
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion_opd.budget import Geometry, expected_flops, round_flops

    if model in EXPECTED_ONLY:
        return expected_flops(model)
    from diffusion_opd.models.specs import DEFAULT_LORA
    from diffusion_opd.models.tiny import TINY_TRANSFORMER_CONFIG, build_random_transformer, sd35_medium_transformer_config

    spec = MODELS[model]
    config = sd35_medium_transformer_config() if model == "sd3.5-medium" else dict(TINY_TRANSFORMER_CONFIG)
    transformer = build_random_transformer(config, device="meta").requires_grad_(False)
    with torch.device("meta"):
        transformer.add_adapter(LoraConfig(r=spec.student_rank, lora_alpha=2 * spec.student_rank,
                                           target_modules=list(DEFAULT_LORA["target_modules"])), adapter_name="student")
    for n, p in transformer.named_parameters():
        p.requires_grad_(".student." in n)
    side = spec.resolution // 8

    def count(rows: int, grad: bool) -> tuple[int, int]:
        inputs = dict(hidden_states=torch.zeros(rows, config["in_channels"], side, side, device="meta"),
                      timestep=torch.zeros(rows, device="meta"),
                      encoder_hidden_states=torch.zeros(rows, spec.text_tokens, config["joint_attention_dim"],
                                                        device="meta"),
                      pooled_projections=torch.zeros(rows, config["pooled_projection_dim"], device="meta"))
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            out = transformer(**inputs, return_dict=False)[0]
            forward = counter.get_total_flops()
            if grad:
                out.float().square().mean().backward()
        return forward, counter.get_total_flops() - forward

    geometry = Geometry(resolution=spec.resolution, text_tokens=spec.text_tokens, rank=spec.student_rank)
    return round_flops(count, geometry, model)


# ---------------------------------------------------------------------------- timing helpers
class PhaseProfile(PhaseTimer):
    """The trainer's ``PhaseTimer`` (exclusive seconds per phase, CUDA synchronised at every
    boundary when ``sync``) that also charges exclusive FLOPs per phase while a
    ``FlopCounterMode`` is attached as ``counter``: the same stretch accounting, a second reading."""

    def __init__(self, device: torch.device, sync: bool = True):
        super().__init__(device, enabled=True, sync=sync)
        self.flops: dict[str, int] = {}
        self.counter = None  # a FlopCounterMode while counting

    def _read(self):
        return super()._read(), (self.counter.get_total_flops() if self.counter is not None else 0)

    def _charge(self, name: str, start, end) -> None:
        super()._charge(name, start[0], end[0])
        self.flops[name] = self.flops.get(name, 0) + end[1] - start[1]

    def reset(self) -> dict[str, float]:
        """Seconds per phase since the last reset (the ``PhaseTimer`` contract); clears FLOPs too."""
        self.flops = {}
        return super().reset()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[float, int]:
    """Best FLOP/s of a large square matmul (``2 n^3`` FLOPs) on ``device`` in ``dtype``: the
    achievable peak MFU is measured against, taken in the same run as the round it judges."""
    sizes = (8192,) if device.type == "cuda" else (1024, 2048)
    best, best_n = 0.0, sizes[0]
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        a @ b  # first call pays for library initialisation
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            rate = 2 * n**3 / (time.perf_counter() - start)
            if rate > best:
                best, best_n = rate, n
        del a, b
    return best, best_n


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _random_embeds(policy, batch: int, text_tokens: int, seed: int):
    """Random conditioning of the model's real widths (T5 width x tokens, pooled CLIP width)."""
    from diffusion_opd.models.base import PromptEmbeds

    cfg = policy.transformer.config
    gen = torch.Generator().manual_seed(seed)

    def draw(rows):
        return {"prompt_embeds": torch.randn(rows, text_tokens, cfg.joint_attention_dim, generator=gen),
                "pooled_prompt_embeds": torch.randn(rows, cfg.pooled_projection_dim, generator=gen)}

    to = {"device": policy.device, "dtype": policy.dtype}
    cond, uncond = draw(batch), draw(1)
    return PromptEmbeds([f"prompt {seed}-{i}" for i in range(batch)], {k: v.to(**to) for k, v in cond.items()},
                        {k: v.to(**to) for k, v in uncond.items()})


class RoundRunner:
    """The trainer's own run object (``Run`` + the ``OPD`` recipe) on fixed embeddings.

    ``round`` is ``OPD.round`` itself on the run's fixed ``embeddings`` (no prompts drawn):
    rollout, teacher queries, backward, ``Run.optimizer_step`` (clip, AdamW, EMA).
    """

    def __init__(self, config, policy, embeds: dict, task_teachers: dict, timer: PhaseProfile):
        from diffusion_opd.trainers.opd import OPD
        from diffusion_opd.trainers.run import Run

        self.run = Run(config, policy=policy, timer=timer, embeddings=embeds)
        self.recipe = OPD(self.run)
        self.recipe.task_teachers = task_teachers
        self.config, self.policy, self.accelerator, self.timer = config, policy, self.run.accelerator, timer
        self.embeds = embeds
        self.nonfinite_rounds = 0

    def round(self, round_idx: int) -> float:
        """One trainer round on this process; returns the loss."""
        metrics = self.recipe.round(round_idx)
        self.nonfinite_rounds += metrics["skipped_nonfinite"]
        return metrics["loss"]


def _config(device: str, settings: Settings, spec: ModelSpec, cpu_threads: int = 0, output_dir: str = ""):
    """mopd (the released geometry) with this variant's changes."""
    from diffusion_opd.config import load_config

    if not os.path.isfile(CONFIG_FILE):
        raise FileNotFoundError(f"{CONFIG_FILE} missing: run the benchmark from a checkout of the repository")
    c = load_config(CONFIG_FILE + ":mopd")
    c.device = device
    c.output_dir = output_dir or os.path.join("outputs", "benchmark", "run")  # nothing is saved there
    c.eval.every = 0
    c.cpu_threads = cpu_threads  # the trainer's own knob (make_accelerator applies it)
    # fp16 on the CPU: no autocast (the trainer refuses it there), fp16 weights run as they are
    c.mixed_precision = "no" if settings.dtype == "fp32" or (device, settings.dtype) == ("cpu", "fp16") \
        else settings.dtype
    c.model.dtype = settings.dtype
    c.model.gradient_checkpointing = settings.checkpointing
    c.sample.resolution = spec.resolution
    c.train.mode = settings.mode
    c.perf.lockstep_tasks = settings.lockstep
    # compiled or not by the variant alone ("auto" would compile the glue of every CUDA row)
    c.perf.compile = "on" if settings.compile else "off"
    c.perf.compile_backend = os.environ.get("BENCH_COMPILE_BACKEND", "inductor")
    c.train.nan_patience = 10**9  # random weights may overflow in fp16: count such rounds, never stop
    return c


def _task_teachers(config, settings: Settings) -> dict[str, tuple[str, float]]:
    """task -> (teacher adapter, teacher CFG). ``teachers == "one"``: every task queries the
    first teacher at its own teacher's CFG, so the work is the same with one adapter loaded."""
    first = next(iter(config.teachers))
    return {task: (first if settings.teachers == "one" else spec.teacher, config.teachers[spec.teacher].guidance_scale)
            for task, spec in config.tasks.items()}


def _geometry(config, spec: ModelSpec) -> dict:
    s, t = config.sample, config.train
    return {"resolution": s.resolution, "num_steps": s.num_steps, "trained_steps": t.num_train_steps,
            "student_guidance": s.guidance_scale, "images_per_task": t.batch_size,
            "teacher_guidance": {n: config.teachers[task.teacher].guidance_scale for n, task in config.tasks.items()},
            "images_per_round": t.batch_size * len(config.tasks), "text_tokens": spec.text_tokens,
            "student_lora_rank": spec.student_rank, "teacher_lora_rank": spec.teacher_rank}


@contextmanager
def _counting(runner: RoundRunner, device: torch.device):
    """Count FLOPs of what runs inside: plain (not checkpointed) model FLOPs, attention included
    (on the CPU the fused attention kernel has no FLOP formula, so the math kernel runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    transformer = runner.policy.transformer
    ckpt = transformer.is_gradient_checkpointing
    if ckpt:
        transformer.disable_gradient_checkpointing()
    kernel = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
    try:
        with kernel, FlopCounterMode(display=False) as counter:
            runner.timer.counter = counter
            yield counter
    finally:
        runner.timer.counter = None
        if ckpt:
            transformer.enable_gradient_checkpointing()


def run_variant(name: str, *, model: str, device: str, paths: dict, rounds: int, warmup: int,
                cpu_threads: int = 0, flops: Optional[int] = None, profile: bool = False) -> dict:
    """Build the policy for variant ``name`` and measure it; returns one JSON-able row.

    Order: FLOP-counting round (untimed, uncompiled; skipped when ``flops``, the round's known
    FLOPs, is given) -> ``warmup`` rounds (compilation happens here) -> ``rounds`` timed rounds
    with the peak-memory counter reset before them -> with ``profile``, one more round under
    torch.profiler, summarised (:func:`profile_summary`). Compiled rows record dynamo's
    counters (:func:`dynamo_counters`) after the warm-up and after the timed rounds. A variant
    that cannot run here comes back with the reason instead of raising: status "skipped" when
    torch.compile fails, "failed" for any other error in a round (e.g. a dtype the device's
    kernels do not support).
    """
    from diffusion_opd.models import build_policy
    from diffusion_opd.trainers.setup import make_accelerator

    spec = MODELS[model]
    settings = VARIANTS[name]
    settings = Settings(**{**asdict(settings), "dtype": settings.dtype or DEFAULT_DTYPE[device]})
    row = {"variant": name, "settings": asdict(settings), "status": "ok"}
    config = _config(device, settings, spec, cpu_threads, os.path.join(os.path.dirname(paths["pipeline"]), "run"))
    row["geometry"] = _geometry(config, spec)
    accelerator = make_accelerator(config)
    row["torch_threads"] = torch.get_num_threads()
    task_teachers = _task_teachers(config, settings)
    used = list(dict.fromkeys(t for t, _ in task_teachers.values()))
    kind = "transformer" if settings.teachers == "separate" else "lora"
    merged = settings.teachers == "merged"
    # separate teachers: full copies of the backbone (the pipeline's own transformer folder)
    lora_dirs = dict(zip(config.teachers, paths["teachers"]))
    teachers = [dict(name=t, kind=kind, path=paths["pipeline"] if kind == "transformer" else lora_dirs[t])
                for t in used]
    policy = build_policy(paths["pipeline"], dtype=settings.dtype, device=accelerator.device,
                          lora=dict(rank=spec.student_rank, alpha=2 * spec.student_rank),
                          teachers=teachers, gradient_checkpointing=settings.checkpointing, merge_teachers=merged)
    if settings.legacy_casts:  # keep peft's input casts (the behaviour the 2026-11-30 baseline measured)
        policy._switch.input_casting = lambda enabled: None
    row["teachers_loaded"] = used
    row["param_bytes"] = _policy_bytes(policy, used, "merged" if merged else kind)
    embeds = {task: _random_embeds(policy, config.train.batch_size, spec.text_tokens, seed=i)
              for i, task in enumerate(config.tasks)}
    runner = RoundRunner(config, policy, embeds, task_teachers, PhaseProfile(accelerator.device, settings.phase_sync))
    try:
        _measure(row, runner, settings, rounds, warmup, flops, profile)
    except Exception as err:  # noqa: BLE001 -- a compiler / kernel that cannot run here is a result
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        row.update(status="skipped" if settings.compile else "failed", reason=f"{type(err).__name__}: {first_line}")
    return row


def dynamo_counters() -> dict:
    """torch.compile's record so far in this process: graphs compiled (a recompilation is a new
    graph), graph breaks (with their most frequent reasons) and compile seconds (dynamo's
    own timer of its compile calls, the backend's code generation included; a backward graph
    compiled lazily at the first backward is not in it: see ``warmup_seconds``)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    breaks = counters.get("graph_break", {})
    return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(breaks.values())),
            "graph_break_reasons": [f"{n} x {r[:160]}" for r, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]],
            "compile_seconds": round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 3)}


def profile_summary(runner: RoundRunner, round_idx: int, timed_mean: float, top: int = 10) -> dict:
    """One round under torch.profiler, summarised as numbers (no trace file): on CUDA the
    seconds some kernel was running (the union of kernel intervals), that time over the timed
    rounds' mean (GPU busy; the profiled round itself runs slower, so busy over its own wall time
    is given too) and the ``top`` kernels by total time; on the CPU the top ops by self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = runner.accelerator.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        runner.round(round_idx)
        _sync(device)
    wall = time.perf_counter() - start
    out = {"profiled_round_seconds": round(wall, 4)}
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if kernels:
        busy_us, end = 0.0, float("-inf")
        for a, b in sorted((e.time_range.start, e.time_range.end) for e in kernels):
            if b > end:
                busy_us += b - max(a, end)
                end = b
        by_name: dict[str, list] = {}
        for e in kernels:
            entry = by_name.setdefault(e.name, [0.0, 0])
            entry[0] += e.time_range.elapsed_us()
            entry[1] += 1
        out.update(kernel_seconds=round(busy_us / 1e6, 4), kernels=len(kernels),
                   gpu_busy_of_timed_round=round(busy_us / 1e6 / timed_mean, 4),
                   gpu_busy_of_profiled_round=round(busy_us / 1e6 / wall, 4),
                   top_kernels=[{"name": n[:120], "ms": round(t / 1e3, 3), "calls": c} for n, (t, c) in
                                sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]])
    else:
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        out["top_cpu_ops"] = [{"name": e.key[:120], "ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count}
                              for e in ops]
    return out


def _measure(row: dict, runner: RoundRunner, settings: Settings, rounds: int, warmup: int,
             flops: Optional[int] = None, profile: bool = False) -> None:
    """FLOP-count (unless given), warm up, time, profile; fills ``row``."""
    from diffusion_opd.dtypes import parse_dtype
    from diffusion_opd.trainers.metrics import peak_memory_gb

    device, timer = runner.accelerator.device, runner.timer
    if flops:
        row["flops_per_round"], row["flops_source"] = int(flops), "given"
    else:
        with _counting(runner, device) as counter:
            runner.round(0)
        row["flops_per_round"], row["flops_source"] = counter.get_total_flops(), "counted"
        row["flops_by_phase"] = _phases(timer.flops)
    timer.reset()

    if settings.compile:  # after the FLOP count: FlopCounterMode does not trace compiled code
        config = runner.config
        runner.policy.compile_blocks(config.perf.compile_backend, config.perf.compile_dynamic)
        row["compile_backend"] = config.perf.compile_backend
    start = time.perf_counter()
    for r in range(1, warmup + 1):
        runner.round(r)
    _sync(device)
    row["warmup_seconds"] = time.perf_counter() - start
    if settings.compile:
        row["dynamo_after_warmup"] = dynamo_counters()
    timer.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    seconds, phases = [], []
    for r in range(warmup + 1, warmup + rounds + 1):
        _sync(device)
        start = time.perf_counter()
        loss = runner.round(r)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        phases.append(_phases(timer.reset()))
    mean = statistics.fmean(seconds)
    # The matmuls run in the weights' dtype: autocast's dtype equals it on CUDA and for bf16 on
    # the CPU; accelerate leaves autocast off for fp16 on the CPU, where fp16 weights run as is.
    compute_dtype = parse_dtype(settings.dtype)
    peak, peak_n = matmul_peak(device, compute_dtype)
    row.update({
        "seconds_per_round": {"mean": mean, "std": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
                              "values": seconds},
        "images_per_second": row["geometry"]["images_per_round"] / mean,
        "phases_seconds": {k: statistics.fmean(p[k] for p in phases) for k in phases[0]},
        "peak_memory_gb": peak_memory_gb(device),
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "matmul_peak_flops": peak,
        "matmul_peak_size": peak_n,
        "matmul_peak_dtype": str(compute_dtype).replace("torch.", ""),
        "mfu": row["flops_per_round"] / (mean * peak),
        "nonfinite_rounds": runner.nonfinite_rounds,
        "last_loss": loss if math.isfinite(loss) else str(loss),
    })
    if settings.compile:
        after = row["dynamo_after_timed"] = dynamo_counters()
        row["recompiles_after_warmup"] = after["unique_graphs"] - row["dynamo_after_warmup"]["unique_graphs"]
    if profile:
        row["profile"] = profile_summary(runner, warmup + rounds + 1, mean)


def _phases(raw: dict) -> dict:
    """Trainer phases -> the report's four: rollout (incl. the student's forwards; two_pass
    replays them as ``student_forward``), teacher, backward, optimizer."""
    return {"rollout": raw.get("rollout", 0) + raw.get("student_forward", 0), "teacher": raw.get("teacher", 0),
            "backward": raw.get("backward", 0), "optimizer": raw.get("optimizer", 0)}


def _policy_bytes(policy, teacher_names: list[str], kind: str) -> dict:
    """Parameter bytes of the backbone, the student LoRA and the teachers (adapters: their LoRA
    tensors on the shared backbone; merged: their merged layer weights; separate: each
    teacher's own transformer)."""
    named = list(policy.transformer.named_parameters())
    out = {"backbone": _param_bytes(p for n, p in named if ".lora_" not in n),
           "student": _param_bytes(policy.trainable_parameters())}
    if kind == "lora":
        out["teachers"] = _param_bytes(p for n, p in named if any(f".{t}." in n for t in teacher_names))
    elif kind == "merged":  # one merged weight per adapted layer and teacher
        out["teachers"] = sum(policy.merged_teacher_bytes.values())
    else:
        # The policy keeps full teachers private; the benchmark reads them to report their size.
        out["teachers"] = sum(_param_bytes(m.parameters()) for m in policy._full_teachers.values())
    return out
