"""Setting a run up from its config: the processes (accelerate), the policy (builtin tiny models
built on the spot, the student's starting adapter checked), the optimizer and its learning-rate
schedule, and the one flat gradient all-reduce / parameter broadcast of data parallelism.
``trainers/run.py`` assembles them into one run; checkpoints are ``trainers/checkpoint.py``'s.
"""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..errors import ConfigError
from ..models.specs import LORA_INIT_WORDS
from . import sharding

BUILTIN = "builtin:"


def make_accelerator(config) -> Accelerator:
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if cpu and config.cpu_threads > 0:
        torch.set_num_threads(config.cpu_threads)
    # distributed.strategy against the accelerate config and the world size, before anything loads;
    # under fsdp the trainer shards itself (trainers/sharding.py) and precision is FSDP2's policy
    sharding.check_launch(config)
    sharding.check_strategy(config, int(os.environ.get("WORLD_SIZE", "1")))
    fsdp = sharding.is_fsdp(config)
    from accelerate.utils import ProjectConfiguration

    from .trackers import logging_dir, tracker_names

    trackers = tracker_names(config)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if fsdp else config.mixed_precision, log_with=trackers or None,
                              project_config=ProjectConfiguration(project_dir=config.output_dir,
                                                                  logging_dir=logging_dir(config.output_dir)))
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # The student is a LoRA of a few MB and the frozen backbone is shared with the teachers
        # through peft adapters: accelerate's own wrappers would shard them apart.
        raise ConfigError(
            f"accelerate distributed type {accelerator.distributed_type}: the trainer synchronises or shards the "
            f"model itself; launch with {sharding.ACCELERATE_CONFIGS[config.distributed.strategy]}"
        )
    return accelerator


def resolve_builtin_paths(config, accelerator: Accelerator) -> tuple[str, dict[str, dict]]:
    """``builtin:tiny-sd3`` / ``builtin:tiny-flux`` / ``builtin:tiny-teacher:<seed>`` -> folders built
    offline in seconds under ``<output_dir>/builtin`` (main process builds, the others wait); other
    paths unchanged."""
    from ..models.tiny import TINY_BUILDERS, write_random_teacher_lora

    root = os.path.join(config.output_dir, "builtin")
    model_path = config.model.path
    teachers = {name: dict(t) for name, t in config.teachers.items()}
    if model_path.startswith(BUILTIN):
        name = model_path[len(BUILTIN):]
        if name not in TINY_BUILDERS:
            valid = ", ".join(BUILTIN + n for n in TINY_BUILDERS)
            raise ConfigError(f"model.path: unknown builtin {model_path!r}; valid: {valid}")
        model_path = os.path.join(root, name)
        if accelerator.is_main_process and not os.path.isfile(os.path.join(model_path, "model_index.json")):
            TINY_BUILDERS[name](model_path, seed=0)
        accelerator.wait_for_everyone()
    for name, spec in teachers.items():
        if spec["path"].startswith(BUILTIN):
            kind, _, seed = spec["path"][len(BUILTIN):].partition(":")
            if kind != "tiny-teacher" or not seed.isdigit():
                raise ConfigError(f"teachers.{name}.path: unknown builtin {spec['path']!r}; valid: builtin:tiny-teacher:<seed>")
            out = os.path.join(root, f"teacher-{seed}")
            if accelerator.is_main_process and not os.path.isdir(out):
                # tiny teachers share a component (seed 0), like real teachers fine-tuned from one base
                write_random_teacher_lora(model_path, out, seed=int(seed), shared_seed=0)
            accelerator.wait_for_everyone()
            spec["path"] = out
    return model_path, teachers


def read_student_init(config):
    """The adapter ``model.student_init`` names, checked against ``lora.*`` (ConfigError on a conflict)."""
    from ..config import base_config
    from ..models.family import read_student_init as read
    from ..models.lora import lora_conflicts

    m = config.model
    if not m.student_init:
        return None
    try:
        adapter = read(dict(path=m.student_init, subfolder=m.student_init_subfolder))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.student_init: {err}") from None
    conflicts = lora_conflicts(adapter, dict(config.lora), dict(base_config().lora))
    if conflicts:
        raise ConfigError(f"{conflicts[0].split('=')[0]}: conflicts with model.student_init ({adapter.source}): "
                          f"{'; '.join(conflicts)}. The student takes rank, alpha and targets from the adapter: "
                          "drop the lora.* setting")
    return adapter


def build_policy_from_config(config, accelerator: Accelerator):
    from ..models import build_policy

    student_init = read_student_init(config)
    model_path, teachers = resolve_builtin_paths(config, accelerator)
    policy = build_policy(
        model_path,
        revision=config.model.revision or None,
        dtype=config.model.dtype,
        device=accelerator.device,
        lora=dict(rank=config.lora.rank, alpha=config.lora.alpha, init=LORA_INIT_WORDS.get(config.lora.init, config.lora.init),
                  target_modules=list(config.lora.target_modules)),
        teachers=[dict(name=n, path=t["path"], subfolder=t["subfolder"] or None,
                       weight_name=t["weight_name"] or None, kind=t["kind"]) for n, t in teachers.items()],
        gradient_checkpointing=config.model.gradient_checkpointing,
        max_sequence_length=config.model.max_sequence_length,
        offload_text_encoders=config.model.offload_text_encoders,
        guidance=config.model.guidance,
        embedded_guidance=config.model.embedded_guidance,
        student_init=student_init,
        merge_teachers=config.perf.merge_teachers,
        num_frames=config.sample.num_frames or None,
        guidance_scale_2=config.model.guidance_scale_2 or None,
    )
    if compile_enabled(config, accelerator.device):
        n = policy.compile_blocks(backend=config.perf.compile_backend, dynamic=config.perf.compile_dynamic)
        accelerator.print(f"[perf] torch.compile on {n} repeated transformer blocks (backend "
                          f"{config.perf.compile_backend}); the first round compiles" if n else
                          f"[perf] perf.compile: {type(policy).__name__} has no repeated blocks; nothing compiled")
    return policy


def compile_enabled(config, device: torch.device) -> bool:
    """perf.compile: "auto" compiles on CUDA only (on the CPU compilation costs more than it saves)."""
    if sharding.is_fsdp(config):  # "on" is refused before loading (trainers/sharding.py)
        return False
    return config.perf.compile == "on" or (config.perf.compile == "auto" and device.type == "cuda")


def build_optimizer(params, config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the student's parameters and its learning-rate schedule (trainers/schedule.py)."""
    from .schedule import build_scheduler

    train = config.train
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay)
    return optimizer, build_scheduler(optimizer, config)


def optimizer_settings(optimizer, scheduler) -> dict[str, float]:
    """The optimizer's hyper-parameters by config key (first param group; all are built alike)."""
    group = optimizer.param_groups[0]
    return {"train.learning_rate": scheduler.base_lrs[0], "train.weight_decay": group["weight_decay"],
            "train.adam_beta1": group["betas"][0], "train.adam_beta2": group["betas"][1],
            "train.adam_eps": group["eps"]}


def restore_settings(optimizer, scheduler, wanted: dict[str, float]) -> dict[str, tuple[float, float]]:
    """After a checkpoint's optimizer and scheduler states are loaded (they carry the saved run's
    hyper-parameters): set this run's ``wanted`` ones (``optimizer_settings`` of the freshly built
    optimizer) back, so a resumed run trains with what its config records. The current lr is
    recomputed as LambdaLR computes it (base lr x the schedule's factor at its step), which is
    the saved lr exactly when nothing changed. Returns {key: (saved, now)} of what changed."""
    saved = optimizer_settings(optimizer, scheduler)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = wanted["train.learning_rate"]
        group["weight_decay"] = wanted["train.weight_decay"]
        group["betas"] = (wanted["train.adam_beta1"], wanted["train.adam_beta2"])
        group["eps"] = wanted["train.adam_eps"]
        group["lr"] = wanted["train.learning_rate"] * factor(scheduler.last_epoch)
    scheduler.base_lrs = [wanted["train.learning_rate"]] * len(optimizer.param_groups)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    return {key: (saved[key], value) for key, value in wanted.items() if saved[key] != value}


def all_reduce_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average the LoRA gradients over processes in ONE flat all-reduce, once per round.

    Only the student's parameters are synchronised, and nothing is communicated during the
    round's many micro-steps (the equivalent of DDP's no_sync until the last backward).
    """
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).to(g.dtype).clone()
        offset += g.numel()


@torch.no_grad()
def broadcast_parameters(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Start every process from rank 0's student weights (what DDP does at construction)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    flat = broadcast(torch.cat([p.detach().reshape(-1).float() for p in params]), from_process=0)
    offset = 0
    for p in params:
        p.copy_(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
