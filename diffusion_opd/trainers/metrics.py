"""Round metrics: always ``<output_dir>/metrics.jsonl`` (one JSON object per round), the source of
truth; experiment trackers (trainers/trackers.py) get a copy.

A run killed while appending leaves a half-written last line: readers drop it with a warning
(and a resumed run rewrites the file without it); a bad line anywhere else is an error naming it.
"""
from __future__ import annotations

import json
import os
import resource
import time
import warnings
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..files import json_line


class MetricsLog:
    """Writes on the main process only. On resume the rows after the resumed round are dropped,
    so a resumed run's file reads exactly like an uninterrupted one. ``trackers``
    (trainers/trackers.py) get a copy of each row's numbers after the row is on disk."""

    def __init__(self, output_dir: str, is_main: bool, trackers=None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.is_main = is_main
        self.trackers = trackers

    def truncate_after(self, round_idx: int) -> None:
        if not self.is_main or not os.path.isfile(self.path):
            return
        rows = [r for r in _read_rows(self.path) if r["round"] <= round_idx]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json_line(r) for r in rows)
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        line = json_line(row)  # NaN / inf -> null (diffusion_opd/files.py)
        with open(self.path, "a") as f:
            f.write(line)
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.finish()


def _read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "round" not in row:
                raise ValueError("not a metrics row (no 'round')")
        except ValueError as err:
            if i == len(lines) - 1:  # the process was killed while writing it
                warnings.warn(f"{path}:{n}: dropped a half-written last line ({err})", stacklevel=3)
                break
            raise UserError(f"{path}:{n}: not a JSON metrics row ({err}); fix or remove that line") from None
        rows.append(row)
    return rows


def read_metrics(output_dir: str) -> list[dict]:
    """The rows of ``<output_dir>/metrics.jsonl`` (a half-written last line dropped with a warning)."""
    return _read_rows(os.path.join(output_dir, "metrics.jsonl"))


class PhaseTimer:
    """Exclusive wall seconds per named phase: a phase entered inside another is charged to the
    inner one only (the fused rollout's ``teacher`` and ``backward`` are not also ``rollout``),
    so the phases add up to the round.

    Honest per-phase numbers on CUDA need a synchronisation at every phase boundary (about 116
    per OPD round), which turns every CPU-side cost at a boundary into GPU idle time. So the
    timer is off unless asked for (``logging.phase_times``): disabled, ``timer(name)`` does
    nothing and :meth:`reset` returns ``{}``; the trainer then synchronises once per round for
    its wall time only.
    """

    def __init__(self, device: torch.device, enabled: bool = True, sync: bool = True):
        self.enabled = enabled
        self.sync = enabled and sync and device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, reading at the start of its current uninterrupted stretch]

    def _read(self):
        """The reading a stretch starts and ends with (a subclass may read more than the clock)."""
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _charge(self, name: str, start, end) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + end - start

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        now = self._read()
        if self._stack:  # pause the enclosing phase
            self._charge(self._stack[-1][0], self._stack[-1][1], now)
        frame = [name, now]
        self._stack.append(frame)
        try:
            yield
        finally:
            now = self._read()
            self._charge(name, frame[1], now)
            self._stack.pop()
            if self._stack:  # resume the enclosing phase
                self._stack[-1][1] = now

    def reset(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator's queued work (the one sync per round behind the wall time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (GiB) on CUDA, else this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
