"""Atomic, complete, verifiable checkpoints: ``<output_dir>/checkpoints/round-<N>/``.

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
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import UserError
from ..files import MANIFEST, DamagedFileError, check_manifest_entry, sha256_file, write_json

_ROUND_DIR = re.compile(r"^round-(\d+)$")
STATE = "trainer_state.json"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and why."""


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


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
    final = os.path.join(checkpoint_root(output_dir), f"round-{round_idx}")
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
