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
from typing import Any, Union

from .errors import ConfigError

__all__ = ["check_writable_folder", "json_safe", "json_line", "sha256_file", "write_json"]


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


def json_line(row: dict) -> str:
    """One JSONL line (sorted keys, strict JSON, newline included)."""
    return json.dumps(json_safe(row), sort_keys=True, allow_nan=False) + "\n"


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
