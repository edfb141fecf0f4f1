"""Building blocks every round-based recipe shares: processes, policy, optimizer, gradient sync,
non-finite guard, checkpoint save/load. ``trainers/run.py`` assembles them into one run.
"""
from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from ..config import to_dict
from ..errors import ConfigError, UserError
from ..models.specs import LORA_INIT_WORDS
from . import checkpoint as ckpt
from . import sharding
from .ema import EMA
from .run_dir import aside_folder

BUILTIN = "builtin:"
RECIPE_STATE = "recipe_state.pt"


@dataclass
class RunState:
    """What resume restores besides tensors: where the run is and where its samplers are."""

    round: int = 0
    nan_streak: int = 0
    samplers: dict = field(default_factory=dict)
    wandb_id: Optional[str] = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # kept on resume; checkpoints are pruned per run


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


class NonFiniteError(UserError, FloatingPointError):
    """Training diverged (non-finite loss, gradients or weights); nothing non-finite was saved."""

    exit_code = 1


class NonFiniteGuard:
    """Skip a round whose loss or gradient norm is NaN/inf (no step: the weights stay finite);
    stop with a clear error after ``patience`` such rounds in a row."""

    def __init__(self, patience: int, streak: int = 0):
        self.patience = patience
        self.streak = streak

    def should_skip(self, loss: float, round_idx: int, grad_norm: float = 0.0) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= self.patience:
            raise NonFiniteError(
                f"round {round_idx}: the loss was non-finite for {self.streak} rounds in a row "
                f"(train.nan_patience={self.patience}); no step was taken in those rounds. Lower "
                "train.learning_rate, check the teachers' outputs, or resume from the last checkpoint."
            )
        return True


def check_finite_weights(params, ema_shadow: Optional[list], round_idx: int) -> None:
    """Refuse to checkpoint non-finite weights: resuming from them could only fail again."""
    tensors = list(params) + list(ema_shadow or [])
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"round {round_idx}: the student's weights are not finite; no checkpoint was written. "
                             "Resume from the last checkpoint (resume_from=latest) with a lower train.learning_rate")


def save_checkpoint(accelerator: Accelerator, config, policy, optimizer, scheduler, ema: Optional[EMA],
                    state: RunState, recipe_state: Optional[dict] = None) -> Optional[str]:
    """Everything resume needs, written atomically (see trainers/checkpoint.py): weights, EMA,
    optimizer, scheduler, the fp16 loss scaler, every rank's RNG, sampler positions, round.
    ``recipe_state``: what the recipe carries across rounds besides the student (e.g.
    DiffusionNFT's old policy)."""
    # Gathered on every process (under fsdp a collective; under ddp the tensors as they are): the
    # files are the same whatever the strategy, and any strategy / world size can resume them.
    student = sharding.gather(policy.student_state_dict())
    ema_student = ema_state = None
    if ema is not None:
        with ema.swapped_in():  # no key bookkeeping: the live adapter holding the EMA
            ema_student = sharding.gather(policy.student_state_dict())
        ema_state = sharding.gather(ema.state_dict())
    optimizer_state = sharding.gather(optimizer.state_dict())
    check_finite_weights(list(student.values()), ema_state and ema_state["shadow"], state.round)
    tmp = ckpt.temporary_dir(config.output_dir, state.round)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial one of this run, left by a crash
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    ckpt.save_rank_rng(tmp, accelerator.process_index)
    if accelerator.is_main_process:
        policy.save_student(tmp, student)  # pytorch_lora_weights.safetensors, diffusers format
        policy.save_student_peft(os.path.join(tmp, "lora"), student)  # the peers' PeftModel format
        save_file({k: v.contiguous() for k, v in student.items()}, os.path.join(tmp, "student_raw.safetensors"))
        if ema is not None:
            policy.save_student(os.path.join(tmp, "ema"), ema_student)
            policy.save_student_peft(os.path.join(tmp, "ema", "lora"), ema_student)
            torch.save(ema_state, os.path.join(tmp, "ema_state.pt"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if recipe_state:
            torch.save(recipe_state, os.path.join(tmp, RECIPE_STATE))
        if accelerator.scaler is not None:  # fp16: the loss scale continues where it was
            torch.save(accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        ckpt.write_json(os.path.join(tmp, "config.json"), to_dict(config))
        ckpt.write_json(os.path.join(tmp, "trainer_state.json"),
                        {**asdict(state), "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    final = (ckpt.publish(config.output_dir, state.round, config.keep_last, state.run_id)
             if accelerator.is_main_process else None)
    accelerator.wait_for_everyone()
    return final


def resume_checkpoint(config, accelerator: Accelerator) -> Optional[str]:
    """The checkpoint ``resume_from`` names, verified on the main process (``latest`` skips
    damaged ones, saying which file and why), or None for a fresh run."""
    from accelerate.utils import broadcast_object_list

    found: list = [None, ""]
    if accelerator.is_main_process:
        try:
            found[0] = ckpt.resolve_resume(config.resume_from, config.output_dir, warn=accelerator.print)
            if config.resume_from and found[0] is None and ckpt.list_checkpoints(config.output_dir):
                raise ckpt.CheckpointError(f"resume_from: latest, but no checkpoint under "
                                           f"{ckpt.checkpoint_root(config.output_dir)} is intact (see the warnings "
                                           "above); restore one, or start over with overwrite=true")
            if found[0]:
                reached, rounds = ckpt.round_of(found[0]), config.train.num_rounds
                if reached > rounds:
                    raise ckpt.CheckpointError(
                        f"train.num_rounds: {rounds}, but {found[0]} is at round {reached}: nothing would train. "
                        f"Raise train.num_rounds above {reached} to continue, or rewind with "
                        f"resume_from={ckpt.checkpoint_root(config.output_dir)}/round-N (N < {rounds})")
                if reached == rounds:
                    accelerator.print(f"[resume] {found[0]} is at round {reached} = train.num_rounds: nothing to "
                                      "train (raise train.num_rounds to continue)")
                set_aside_later_checkpoints(config.output_dir, found[0], accelerator.print)
            elif config.resume_from == "latest":
                accelerator.print(f"[resume] resume_from=latest: no checkpoint under {config.output_dir} yet; "
                                  "starting a new run")
        except ckpt.CheckpointError as err:
            found[1] = str(err)
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    if found[1]:
        raise ckpt.CheckpointError(found[1])
    return found[0]


def set_aside_later_checkpoints(output_dir: str, resumed: str, say: Callable[[str], None]) -> Optional[str]:
    """Move this run's checkpoints after ``resumed`` (a rewind abandons them) and damaged ones
    (their run cannot be read) out of the way, with a copy of ``metrics.jsonl`` (whose later
    rows the resumed run drops), into ``<output_dir>.previous-<time>/``: none of them may be
    taken as "latest" if the resumed run is interrupted, or block its own checkpoint of that
    round. Nothing is deleted. Returns the folder, or None when nothing was later."""
    run_id = ckpt.run_id_of(resumed)
    later = [p for r, p in ckpt.round_folders(output_dir)
             if r > ckpt.round_of(resumed) and ckpt.run_id_of(p) in (run_id, None)]
    if not later:
        return None
    dest = os.path.join(aside_folder(output_dir), "checkpoints")
    os.makedirs(dest)
    for path in later:
        os.replace(path, os.path.join(dest, os.path.basename(path)))
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        shutil.copy2(metrics, os.path.dirname(dest))
    say(f"[resume] warning: resuming from {resumed}: moved the later or damaged checkpoints "
        f"({', '.join(os.path.basename(p) for p in later)}) and a copy of metrics.jsonl to {os.path.dirname(dest)}; "
        "the metrics rows after the resumed round are dropped")
    return os.path.dirname(dest)


def load_checkpoint(path: str, accelerator: Accelerator, policy, optimizer, scheduler, ema: Optional[EMA],
                    recipe_state: Optional[Callable[[dict], None]] = None) -> RunState:
    try:
        return _load_checkpoint(path, accelerator, policy, optimizer, scheduler, ema, recipe_state)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as err:  # a checkpoint of another model / config
        raise ckpt.CheckpointError(f"resume_from: {path} cannot be restored into this run "
                                   f"({type(err).__name__}: {ckpt.first_line(err)})") from None


def _load_checkpoint(path: str, accelerator: Accelerator, policy, optimizer, scheduler, ema: Optional[EMA],
                     recipe_state: Optional[Callable[[dict], None]] = None) -> RunState:
    import json

    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    policy.load_student_state_dict(load_file(os.path.join(path, "student_raw.safetensors"), device="cpu"))
    # gathered moments, cut like this run's parameters (sharded under fsdp, whole under ddp)
    opt_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(sharding.shard_optimizer_state(opt_state, policy.trainable_parameters()))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    scaler_path = os.path.join(path, "scaler.pt")
    if accelerator.scaler is not None and os.path.isfile(scaler_path):
        accelerator.scaler.load_state_dict(torch.load(scaler_path, weights_only=False))
    elif accelerator.scaler is not None or os.path.isfile(scaler_path):
        accelerator.print(f"[resume] warning: {path} was saved {'with' if os.path.isfile(scaler_path) else 'without'} "
                          "an fp16 loss scaler and this run uses "
                          f"{'none' if accelerator.scaler is None else 'one'}: the loss scale starts afresh")
    if ema is not None:
        ema_path = os.path.join(path, "ema_state.pt")
        if not os.path.isfile(ema_path):
            raise FileNotFoundError(f"{ema_path} missing: the checkpoint was saved without EMA (train.ema_decay=0)")
        ema.load_state_dict(torch.load(ema_path, map_location="cpu", weights_only=False))
    if recipe_state is not None and os.path.isfile(os.path.join(path, RECIPE_STATE)):
        recipe_state(torch.load(os.path.join(path, RECIPE_STATE), map_location="cpu", weights_only=False))
    if saved.get("world_size") != accelerator.num_processes:
        accelerator.print(f"[resume] checkpoint world size {saved.get('world_size')} != {accelerator.num_processes}: "
                          "prompt order and RNG streams will differ from the original run")
    elif not ckpt.load_rank_rng(path, accelerator.process_index):
        accelerator.print(f"[resume] no RNG state for rank {accelerator.process_index} in {path}")
    return RunState(round=saved["round"], nan_streak=saved["nan_streak"], samplers=saved["samplers"],
                    wandb_id=saved.get("wandb_id"), run_id=saved.get("run_id") or RunState().run_id)
