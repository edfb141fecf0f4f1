"""Atomic, complete, verifiable checkpoints: ``<output_dir>/checkpoints/round-<N>/``. This module
owns that layout: its names, :func:`save` / :func:`load` of a run, choosing what to resume, and the
readers evaluation, export, the demo and cascades use (:func:`round_dir`, :func:`latest`,
:func:`student_folder`, :func:`read_student`, :func:`read_config`).

One checkpoint holds: ``pytorch_lora_weights.safetensors`` (the student, diffusers format),
``lora/`` (the same as a PEFT folder, the peers' format), ``student_raw.safetensors`` (the exact
tensors resume loads), ``ema/`` (the EMA weights, both formats, when ``train.ema_decay > 0``),
optimizer / scheduler / fp16-scaler / EMA / recipe state, every rank's RNG, ``config.json``,
``trainer_state.json`` (round, samplers, run id) and ``manifest.json``.

A checkpoint is written into a hidden temporary folder and renamed into place only when every
file (and every rank's RNG state) is on disk, so a crash never leaves a half checkpoint that
``resume_from="latest"`` would pick. ``manifest.json`` records every file's size and SHA-256:
a checkpoint damaged later (a truncated copy, a full disk, a flipped bit) is recognised before
anything is loaded from it; ``latest`` then falls back to the newest intact one, saying which
file was wrong. Only the last ``keep_last`` checkpoints OF THIS RUN (its ``run_id``) are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..files import MANIFEST, DamagedFileError, check_manifest_entry, sha256_file, write_json
from .stop import NonFiniteError

if TYPE_CHECKING:
    from .run import Run

_ROUND_DIR = re.compile(r"^round-(\d+)$")
STATE = "trainer_state.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the student in diffusers format
PEFT_DIR = "lora"  # the student as a PEFT folder (also the peers' checkpoint-N/lora)
EMA_DIR = "ema"  # the EMA weights, in both formats
RAW_STUDENT = "student_raw.safetensors"  # the exact student tensors resume loads
RECIPE_STATE = "recipe_state.pt"  # what a recipe carries across rounds (e.g. DiffusionNFT's old policy)
CONFIG = "config.json"
# Files a LoRA folder may hold: PEFT's, then diffusers'.
LORA_FILES = ("adapter_model.safetensors", "adapter_model.bin", LORA_WEIGHTS, "pytorch_lora_weights.bin")


@dataclass
class RunState:
    """What resume restores besides tensors: where the run is and where its samplers are."""

    round: int = 0
    nan_streak: int = 0
    samplers: dict = field(default_factory=dict)
    wandb_id: Optional[str] = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # kept on resume; checkpoints are pruned per run


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and why."""


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def round_dir(output_dir: str, round_idx: int) -> str:
    """Where the checkpoint of round ``round_idx`` is (or will be)."""
    return os.path.join(checkpoint_root(output_dir), f"round-{round_idx}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (round, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ROUND_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def round_folders(output_dir: str) -> list[tuple[int, str]]:
    """Every ``round-N`` folder as (round, path), complete or not, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    return sorted((int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
                  if (m := _ROUND_DIR.match(name)))


def round_of(ckpt_dir: str) -> int:
    """N of a ``round-N`` folder (-1 for another name)."""
    m = _ROUND_DIR.match(os.path.basename(os.path.normpath(ckpt_dir)))
    return int(m.group(1)) if m else -1


def run_id_of(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, STATE)) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return None


def write_manifest(ckpt_dir: str) -> None:
    """Size and SHA-256 of every file under ``ckpt_dir`` (written last, before the rename)."""
    files = {}
    for folder, _, names in os.walk(ckpt_dir):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ckpt_dir)
            if rel != MANIFEST:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    write_json(os.path.join(ckpt_dir, MANIFEST), {"files": files})


def verify(ckpt_dir: str) -> None:
    """Raise :class:`CheckpointError` naming the first missing, truncated or altered file.

    Checkpoints written before manifests existed are checked by loading each file instead.
    """
    manifest = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(manifest):
        _verify_by_loading(ckpt_dir)
        return
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{manifest}: unreadable ({err})") from None
    for rel, meta in sorted(files.items()):
        try:
            check_manifest_entry(os.path.join(ckpt_dir, rel), meta)
        except DamagedFileError as err:
            raise CheckpointError(str(err)) from None


def _verify_by_loading(ckpt_dir: str) -> None:
    from safetensors.torch import load_file

    for folder, _, names in os.walk(ckpt_dir):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                if name.endswith(".safetensors"):
                    load_file(path)
                elif name.endswith(".pt"):
                    torch.load(path, map_location="cpu", weights_only=False)
                elif name.endswith(".json"):
                    with open(path) as f:
                        json.load(f)
            except Exception as err:  # any failure to read is the reason this checkpoint is skipped
                raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {first_line(err)})") from None


def resolve_resume(resume_from: str, output_dir: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """"" -> None; "latest" -> the newest checkpoint that verifies (each damaged newer one is
    skipped with a warning naming the file and why), None if there is none; a path -> that
    path, which must verify (else :class:`CheckpointError` naming the file)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        for _, path in reversed(list_checkpoints(output_dir)):
            try:
                verify(path)
                return path
            except CheckpointError as err:
                warn(f"[resume] warning: skipping {path}: {err}")
        return None
    if not os.path.isfile(os.path.join(resume_from, STATE)):
        raise CheckpointError(
            f"resume_from: {resume_from} is not a complete checkpoint (no {STATE}); "
            f"complete ones under {checkpoint_root(output_dir)}: {[p for _, p in list_checkpoints(output_dir)]}"
        )
    try:
        verify(resume_from)
    except CheckpointError as err:
        raise CheckpointError(f"resume_from: {err}; resume from another checkpoint") from None
    return resume_from


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_dir(output_dir: str, round_idx: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f".tmp-round-{round_idx}")


def save_rank_rng(tmp_dir: str, rank: int) -> None:
    torch.save(rng_state(), os.path.join(tmp_dir, f"rng_state_rank{rank}.pt"))


def load_rank_rng(ckpt_dir: str, rank: int) -> bool:
    path = os.path.join(ckpt_dir, f"rng_state_rank{rank}.pt")
    if not os.path.isfile(path):
        return False
    set_rng_state(torch.load(path, weights_only=False))  # our own file
    return True


def publish(output_dir: str, round_idx: int, keep_last: int, run_id: Optional[str] = None) -> str:
    """Seal the finished temporary folder (manifest), rename it into place, then prune this
    run's old checkpoints. Another run's checkpoints are never touched."""
    tmp = temporary_dir(output_dir, round_idx)
    write_manifest(tmp)
    final = round_dir(output_dir, round_idx)
    if os.path.exists(final):
        if run_id_of(final) != run_id:
            raise CheckpointError(f"{final}: exists and belongs to another run (run_id {run_id_of(final)}); "
                                  "not replaced. Move it away or choose another output_dir")
        shutil.rmtree(final)  # this run's own, from before a rewind to an earlier checkpoint
    os.replace(tmp, final)
    own = [path for _, path in list_checkpoints(output_dir) if run_id_of(path) == run_id]
    for old in own[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- readers
def latest(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint of ``output_dir`` (None if there is none)."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def student_folder(ckpt_dir: str, ema: bool = False) -> str:
    """The folder holding the student's diffusers-format weights (``LORA_WEIGHTS``): the round
    itself, or its ``ema/``."""
    return os.path.join(ckpt_dir, EMA_DIR) if ema else ckpt_dir


def evaluated_folder(ckpt_dir: str) -> str:
    """The weights a run evaluates, a teacher is and a cascade's next stage starts from: the
    round's ``ema/`` when the run kept an EMA, else the round itself."""
    ema = student_folder(ckpt_dir, ema=True)
    return ema if os.path.isdir(ema) else ckpt_dir


def read_student(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The student's exact tensors (what :meth:`Policy.load_student_state_dict` takes)."""
    return load_file(os.path.join(ckpt_dir, RAW_STUDENT), device="cpu")


def read_config(ckpt_dir: str) -> dict:
    """The training config a checkpoint was written with ({} if it has none)."""
    path = os.path.join(ckpt_dir, CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- what to evaluate / export
_PEER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
NEITHER = ("is neither a checkpoint of this repo (<output_dir>/checkpoints/round-N/ holding {weights}) nor a "
           "Flow-GRPO / DiffusionNFT one (checkpoint-N/lora/ holding adapter_config.json); for any other LoRA "
           "folder use --lora_path")


def _is_peft_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and any((folder / n).is_file() for n in LORA_FILES[:2])


def _newest_peer_checkpoint(root: Path) -> Optional[Path]:
    """The newest ``checkpoints/checkpoint-N`` (peers' layout) holding a PEFT ``lora/``."""
    found = [(int(m.group(1)), d) for d in (root / "checkpoints").iterdir()
             if (m := _PEER_CHECKPOINT.match(d.name)) and _is_peft_folder(d / PEFT_DIR)]
    return max(found)[1] if found else None


def resolve_checkpoint(path: str, use_ema: bool = False) -> tuple[str, str, dict]:
    """(folder holding the LoRA weights, the checkpoint folder, its training config) of a checkpoint.

    Accepted: our ``<output_dir>/checkpoints/round-N`` (or its PEFT copy ``round-N/lora``) or a
    training ``output_dir`` (its newest complete round); the peers' (Flow-GRPO, DiffusionNFT)
    ``checkpoint-N/`` or ``checkpoint-N/lora`` or their ``save_dir`` (newest ``checkpoint-N``).
    Raises ``FileNotFoundError`` saying where it looked and what it expected.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--checkpoint_path: no folder at {root.resolve()}. Training writes checkpoints to "
            f"<output_dir>/checkpoints/round-N/ (every save_every rounds and at the end).")
    if root.name == PEFT_DIR and (root.parent / LORA_WEIGHTS).is_file():
        root = root.parent  # our round-N/lora: the round itself (its EMA and config are beside)
    if not (root / LORA_WEIGHTS).is_file() and (root / "checkpoints").is_dir():
        found = list_checkpoints(str(root))
        peer = None if found else _newest_peer_checkpoint(root)
        if not found and peer is None:
            raise FileNotFoundError(f"--checkpoint_path: no complete checkpoint under {(root / 'checkpoints').resolve()} "
                                    "(neither round-N/ of this repo nor checkpoint-N/lora/ of Flow-GRPO / DiffusionNFT)")
        root = Path(found[-1][1]) if found else peer
    if not (root / LORA_WEIGHTS).is_file():  # the peers' layout: one PEFT folder, no separate EMA
        folder = root / PEFT_DIR if _is_peft_folder(root / PEFT_DIR) else root
        if not _is_peft_folder(folder):
            raise FileNotFoundError(f"--checkpoint_path: {root.resolve()} " + NEITHER.format(weights=LORA_WEIGHTS))
        if use_ema:
            raise FileNotFoundError(
                f"--checkpoint_path: {folder.resolve()} is a Flow-GRPO / DiffusionNFT checkpoint: it holds one set of "
                "LoRA weights (already the EMA ones when that run used EMA); drop --use_ema")
        return str(folder), str(root), {}
    folder = Path(student_folder(str(root), use_ema))
    if (root / MANIFEST).is_file():  # ours: every file as it was written, else the damaged one named
        try:
            verify(str(root))
        except CheckpointError as err:
            raise DamagedFileError(f"--checkpoint_path: {err}; use another checkpoint") from None
    if not (folder / LORA_WEIGHTS).is_file():
        hint = (" (the run was trained without EMA: train.ema_decay=0; drop --use_ema)"
                if use_ema and (root / LORA_WEIGHTS).is_file() else
                ". Expected a folder written by training (<output_dir>/checkpoints/round-N/); for any other LoRA "
                "folder use --lora_path")
        raise FileNotFoundError(f"--checkpoint_path: no LoRA weights at {(folder / LORA_WEIGHTS).resolve()}{hint}")
    return str(folder), str(root), read_config(str(root))


def model_of_checkpoint(config: dict, checkpoint: str) -> Optional[str]:
    """The backbone a checkpoint was trained on (its config's model.path), if usable here."""
    path = (config.get("model") or {}).get("path")
    if not path:
        return None
    if path.startswith("builtin:"):  # a tiny model the trainer built under <output_dir>/builtin/<name>
        built = Path(checkpoint).parents[1] / "builtin" / path[len("builtin:"):]
        return str(built) if (built / "model_index.json").is_file() else None
    return path


# ----------------------------------------------------------------------------- a run
def check_finite_weights(params, ema_shadow: Optional[list], round_idx: int) -> None:
    """Refuse to checkpoint non-finite weights: resuming from them could only fail again."""
    tensors = list(params) + list(ema_shadow or [])
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"round {round_idx}: the student's weights are not finite; no checkpoint was written. "
                             "Resume from the last checkpoint (resume_from=latest) with a lower train.learning_rate")


def save(run: "Run", recipe_state: Optional[dict] = None) -> Optional[str]:
    """Everything resume needs of ``run`` at ``run.state.round``, written atomically: weights,
    EMA, optimizer, scheduler, the fp16 loss scaler, every rank's RNG, sampler positions, round.
    ``recipe_state``: what the recipe carries across rounds besides the student (e.g.
    DiffusionNFT's old policy). Returns the checkpoint folder (main process) or None."""
    from ..config import to_dict
    from . import sharding

    accelerator, config, policy, ema, state = run.accelerator, run.config, run.policy, run.ema, run.state
    optimizer, scheduler = run.optimizer, run.scheduler
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
    tmp = temporary_dir(config.output_dir, state.round)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial one of this run, left by a crash
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    save_rank_rng(tmp, accelerator.process_index)
    if accelerator.is_main_process:
        policy.save_student(tmp, student)  # pytorch_lora_weights.safetensors, diffusers format
        policy.save_student_peft(os.path.join(tmp, PEFT_DIR), student)  # the peers' PeftModel format
        save_file({k: v.contiguous() for k, v in student.items()}, os.path.join(tmp, RAW_STUDENT))
        if ema is not None:
            policy.save_student(os.path.join(tmp, EMA_DIR), ema_student)
            policy.save_student_peft(os.path.join(tmp, EMA_DIR, PEFT_DIR), ema_student)
            torch.save(ema_state, os.path.join(tmp, "ema_state.pt"))
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if recipe_state:
            torch.save(recipe_state, os.path.join(tmp, RECIPE_STATE))
        if accelerator.scaler is not None:  # fp16: the loss scale continues where it was
            torch.save(accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        write_json(os.path.join(tmp, CONFIG), to_dict(config))
        write_json(os.path.join(tmp, STATE),
                        {**asdict(state), "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    final = (publish(config.output_dir, state.round, config.keep_last, state.run_id)
             if accelerator.is_main_process else None)
    accelerator.wait_for_everyone()
    return final


def resume_path(config, accelerator) -> Optional[str]:
    """The checkpoint ``resume_from`` names, verified on the main process (``latest`` skips
    damaged ones, saying which file and why), or None for a fresh run."""
    from accelerate.utils import broadcast_object_list

    found: list = [None, ""]
    if accelerator.is_main_process:
        try:
            found[0] = resolve_resume(config.resume_from, config.output_dir, warn=accelerator.print)
            if config.resume_from and found[0] is None and list_checkpoints(config.output_dir):
                raise CheckpointError(f"resume_from: latest, but no checkpoint under "
                                           f"{checkpoint_root(config.output_dir)} is intact (see the warnings "
                                           "above); restore one, or start over with overwrite=true")
            if found[0]:
                reached, rounds = round_of(found[0]), config.train.num_rounds
                if reached > rounds:
                    raise CheckpointError(
                        f"train.num_rounds: {rounds}, but {found[0]} is at round {reached}: nothing would train. "
                        f"Raise train.num_rounds above {reached} to continue, or rewind with "
                        f"resume_from={checkpoint_root(config.output_dir)}/round-N (N < {rounds})")
                if reached == rounds:
                    accelerator.print(f"[resume] {found[0]} is at round {reached} = train.num_rounds: nothing to "
                                      "train (raise train.num_rounds to continue)")
                set_aside_later_checkpoints(config.output_dir, found[0], accelerator.print)
            elif config.resume_from == "latest":
                accelerator.print(f"[resume] resume_from=latest: no checkpoint under {config.output_dir} yet; "
                                  "starting a new run")
        except CheckpointError as err:
            found[1] = str(err)
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    if found[1]:
        raise CheckpointError(found[1])
    return found[0]


def set_aside_later_checkpoints(output_dir: str, resumed: str, say: Callable[[str], None]) -> Optional[str]:
    """Move this run's checkpoints after ``resumed`` (a rewind abandons them) and damaged ones
    (their run cannot be read) out of the way, with a copy of ``metrics.jsonl`` (whose later
    rows the resumed run drops), into ``<output_dir>.previous-<time>/``: none of them may be
    taken as "latest" if the resumed run is interrupted, or block its own checkpoint of that
    round. Nothing is deleted. Returns the folder, or None when nothing was later."""
    from .run_dir import aside_folder

    run_id = run_id_of(resumed)
    later = [p for r, p in round_folders(output_dir)
             if r > round_of(resumed) and run_id_of(p) in (run_id, None)]
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


def load(run: "Run", path: str, recipe_state: Optional[Callable[[dict], None]] = None) -> RunState:
    """Restore checkpoint ``path`` into ``run`` (student, optimizer, scheduler, scaler, EMA, this
    rank's RNG) and ``recipe_state``; returns the saved :class:`RunState`. A checkpoint of
    another model or config is a :class:`CheckpointError` naming it."""
    try:
        return _load(run, path, recipe_state)
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as err:  # a checkpoint of another model / config
        raise CheckpointError(f"resume_from: {path} cannot be restored into this run "
                                   f"({type(err).__name__}: {first_line(err)})") from None


def _load(run: "Run", path: str, recipe_state: Optional[Callable[[dict], None]] = None) -> RunState:
    from . import sharding

    accelerator, policy, optimizer, scheduler, ema = run.accelerator, run.policy, run.optimizer, run.scheduler, run.ema
    import json

    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    policy.load_student_state_dict(read_student(path))
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
    elif not load_rank_rng(path, accelerator.process_index):
        accelerator.print(f"[resume] no RNG state for rank {accelerator.process_index} in {path}")
    return RunState(round=saved["round"], nan_streak=saved["nan_streak"], samplers=saved["samplers"],
                    wandb_id=saved.get("wandb_id"), run_id=saved.get("run_id") or RunState().run_id)
