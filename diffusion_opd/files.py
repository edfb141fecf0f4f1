"""Files every part of the library writes the same way: strict JSON with one NaN policy,
SHA-256 file hashes, and the check that an output folder can be written at all.

NaN policy: JSON has no NaN / inf, so a non-finite number is written as ``null`` everywhere
(metrics.jsonl, checkpoints' JSON, evaluation results and summaries); readers treat ``null``
as "no finite value". Tensors and numpy scalars become plain Python numbers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

from .errors import ConfigError, UserError

__all__ = ["MANIFEST", "DamagedFileError", "check_against_manifest", "check_manifest_entry", "check_writable_folder",
           "json_safe", "json_line", "replace_atomically", "sha256_file", "write_json"]

MANIFEST = "manifest.json"  # {"files": {relative path: {"bytes", "sha256"}}}, sealed into every checkpoint


class DamagedFileError(UserError, ValueError):
    """A file that is not what was written (truncated, altered) or cannot be read; names it."""


def json_safe(value: Any) -> Any:
    """``value`` with every tensor / numpy scalar made a Python number and every NaN / inf
    ``None`` (recursively through dicts, lists and tuples)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # a torch / numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(row: dict, sort_keys: bool = True) -> str:
    """One JSONL line (strict JSON, newline included)."""
    return json.dumps(json_safe(row), sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(path: Union[str, Path], data: Any, *, indent: int = 2, sort_keys: bool = True) -> None:
    """Write ``data`` as strict JSON atomically (a temporary file renamed into place): a crash
    leaves the old file or the new one, never half of one."""
    path = str(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(json_safe(data), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")
    os.replace(tmp, path)


def sha256_file(path: Union[str, Path]) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable_folder(key: str, path: str) -> None:
    """Refuse, naming ``key``, a ``path`` that is a file, lies below a file, or whose nearest
    existing folder takes no new files (read-only, no permission, /proc...). Creates nothing
    but an empty probe file, removed at once."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a file, not a folder; choose a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}: {path} is below {existing}, which is a file; choose a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{key}: cannot create files in {existing} ({err.strerror}); choose a writable folder") from None


def check_manifest_entry(path: Union[str, Path], meta: dict) -> None:
    """Raise :class:`DamagedFileError` naming ``path`` when it is missing or its size or
    SHA-256 differs from its manifest entry ``meta`` ({"bytes", "sha256"})."""
    path = str(path)
    if not os.path.isfile(path):
        raise DamagedFileError(f"{path}: missing")
    size = os.path.getsize(path)
    if size != meta["bytes"]:
        raise DamagedFileError(f"{path}: {size} bytes, {meta['bytes']} written (truncated or overwritten)")
    if sha256_file(path) != meta["sha256"]:
        raise DamagedFileError(f"{path}: content differs from what was written (SHA-256 mismatch)")


def check_against_manifest(path: Union[str, Path], levels: int = 3) -> bool:
    """Check ``path`` against the manifest of the folder it was sealed in, if any: a manifest
    in its folder or up to ``levels - 1`` folders above (a checkpoint's ``round-N/`` holds
    ``lora/`` and ``ema/``, a two-expert student's ``lora/transformer_2/``). Returns whether a manifest listed it; raises
    :class:`DamagedFileError` when it differs, so a damaged file is named before it is read."""
    path = os.path.abspath(str(path))
    folder = os.path.dirname(path)
    for _ in range(levels):
        manifest = os.path.join(folder, MANIFEST)
        if os.path.isfile(manifest):
            try:
                with open(manifest) as f:
                    files = json.load(f)["files"]
            except (ValueError, KeyError, TypeError) as err:
                raise DamagedFileError(f"{manifest}: unreadable ({type(err).__name__}: {err})") from None
            meta = files.get(os.path.relpath(path, folder))
            if meta is None:
                return False
            check_manifest_entry(path, meta)
            return True
        folder = os.path.dirname(folder)
    return False


def replace_atomically(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the new file to a temporary name in the same folder (same extension,
    for writers that pick the format from it), which is then renamed over ``path``: readers and
    a crash see the old file or the new one, never half of one."""
    root, ext = os.path.splitext(str(path))
    tmp = f"{root}.partial{ext}"
    try:
        write(tmp)
        os.replace(tmp, str(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
