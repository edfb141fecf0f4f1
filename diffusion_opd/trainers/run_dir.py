"""Who owns ``output_dir``: one run at a time, and never another run's files.

* A lock (``<output_dir>/run.lock``, an ``flock`` held for the run's lifetime) names the
  holder's PID, host and start time. A second run on the folder fails at once naming them. The
  kernel drops the flock when its process dies, so a lock left by a killed run is taken over
  (with a warning naming the dead holder) without anyone deleting files by hand.
* A new run (no ``resume_from``) into a folder that already holds a run (metrics or
  checkpoints) is refused with one line offering ``resume_from=latest`` or ``overwrite=true``;
  ``overwrite=true`` MOVES the old files to ``<output_dir>.previous-<UTC time>/``.

Only the main process locks and moves; the others learn the outcome from it.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Optional

from ..errors import ConfigError, UserError
from .checkpoint import checkpoint_root, list_checkpoints

LOCK_NAME = "run.lock"


class OutputDirBusyError(UserError):
    """Another live run holds ``output_dir``."""


def _metrics_rows(output_dir: str) -> int:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def describe_previous_run(output_dir: str) -> str:
    """"" when ``output_dir`` holds no run, else what it holds (for messages)."""
    rows = _metrics_rows(output_dir)
    rounds = [r for r, _ in list_checkpoints(output_dir)]
    root = checkpoint_root(output_dir)
    partial = os.path.isdir(root) and any(n.startswith(".tmp-round-") for n in os.listdir(root))
    parts = []
    if rows:
        parts.append(f"metrics.jsonl with {rows} rows")
    if rounds:
        parts.append(f"checkpoints up to round-{rounds[-1]}")
    elif partial:
        parts.append("a partly written checkpoint")
    return ", ".join(parts)


def check_output_dir(config) -> None:
    """Refuse, before anything loads, a folder another live run holds, and a new run into a
    folder holding another run's files (reads only; the lock is taken by :func:`claim_output_dir`)."""
    RunLock(config.output_dir).check_free()
    _check_previous_run(config)


def _check_previous_run(config) -> None:
    held = describe_previous_run(config.output_dir)
    if not held or config.overwrite:
        return
    if not config.resume_from:
        raise ConfigError(
            f"output_dir: {config.output_dir} already holds a run ({held}); continue it with resume_from=latest, "
            f"or start a new one there with overwrite=true (moves the old files to "
            f"{config.output_dir.rstrip(os.sep)}.previous-<time>/), or choose another output_dir"
        )
    if config.resume_from == "latest" and not list_checkpoints(config.output_dir):
        raise ConfigError(
            f"resume_from: latest, but {config.output_dir} holds no complete checkpoint to resume ({held}); "
            "start a new run there with overwrite=true (moves the old files aside) or choose another output_dir"
        )


def aside_folder(output_dir: str) -> str:
    """A new, empty sibling ``<output_dir>.previous-<UTC time>[-n]/`` for files set aside."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest = f"{output_dir.rstrip(os.sep)}.previous-{stamp}"
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{output_dir.rstrip(os.sep)}.previous-{stamp}-{n}"
    os.makedirs(dest)
    return dest


def move_aside(output_dir: str) -> str:
    """Move every entry of ``output_dir`` but the lock into a new sibling folder; returns it."""
    dest = aside_folder(output_dir)
    for name in os.listdir(output_dir):
        if name != LOCK_NAME:
            os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest


class RunLock:
    """An exclusive ``flock`` on ``<output_dir>/run.lock`` whose content names the holder."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: Optional[int] = None
        self.previous: dict = {}  # the content a dead holder left (a stale lock taken over)
        self.written = False
        self.created_folder = self.created_file = False  # by acquire(): what abandon() may remove

    def check_free(self) -> None:
        """Raise :class:`OutputDirBusyError` if a live run holds the lock (takes it for an instant)."""
        if os.path.isfile(self.path):
            self.acquire(write=False)
            self.release()

    def acquire(self, write: bool = True) -> "RunLock":
        self.created_folder = not os.path.isdir(os.path.dirname(self.path))
        self.created_file = not os.path.exists(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirBusyError(
                    f"output_dir: {os.path.dirname(self.path)} is in use by another run (PID {holder.get('pid', '?')} "
                    f"on {holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to end, "
                    "stop it, or choose another output_dir"
                ) from None
            try:  # the file may have been replaced between open and flock: lock the one on disk
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.previous = _read_holder(fd)
        if not write:
            return self
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.written = True
        return self

    def release(self) -> None:
        """Clear the holder's name and drop the lock (the file stays: unlinking it would race)."""
        if self.fd is None:
            return
        try:
            if self.written:
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
            self.fd = None

    def abandon(self) -> None:
        """Release after a run that failed before it started: remove the lock file (and the
        folder) when this run created them and nothing else was written there."""
        if self.fd is None:
            return
        if self.created_file:
            os.unlink(self.path)  # still holding the flock: no other run can be between
        folder = os.path.dirname(self.path)
        self.written = False
        self.release()
        if self.created_folder and not os.listdir(folder):
            os.rmdir(folder)

    def __del__(self):  # a run object dropped without close() (e.g. failed while loading) is gone too
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def claim_output_dir(config, accelerator) -> Optional[RunLock]:
    """Lock ``output_dir`` for this run (main process), moving an old run aside when
    ``overwrite=true``. Every process raises the same error when the folder is not ours."""
    from accelerate.utils import broadcast_object_list

    lock, outcome = None, [None, ""]
    if accelerator.is_main_process:
        try:  # the lock first: a live run is named as such, not as "a folder holding a run"
            lock = RunLock(config.output_dir).acquire()
            if lock.previous.get("pid"):
                p = lock.previous
                accelerator.print(f"[run] warning: took over a stale lock of {config.output_dir} left by PID "
                                  f"{p.get('pid')} on {p.get('host')} (started {p.get('started')}), which is gone")
            _check_previous_run(config)  # under the lock: no other run can change the folder meanwhile
            if config.overwrite and describe_previous_run(config.output_dir):
                dest = move_aside(config.output_dir)
                accelerator.print(f"[run] overwrite=true: moved the previous run's files to {dest}")
        except UserError as err:
            if lock is not None:
                lock.release()
            outcome = [type(err).__name__, str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[0]:
        raise (OutputDirBusyError if outcome[0] == "OutputDirBusyError" else ConfigError)(outcome[1])
    return lock
